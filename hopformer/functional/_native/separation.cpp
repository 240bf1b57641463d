// Fused row kernels of the sparse attention core (sparsemax, 1.5-entmax, alpha-entmax).
//
// One call handles a block of rows of scores `x` (row-major, `rows x n`); each row is read a few times
// while it sits in the L1 cache, instead of the 15-40 full-block passes of the torch-op kernels. Long rows
// (hundreds of scores and more) are searched on their candidates, the few entries within 1 of the row
// maximum (keep_above), so a row of thousands costs about three passes: statistics, candidates, weights.
// Built at first use by `hopformer/functional/_native/__init__.py` (plain C++, no torch headers) and
// called through ctypes, which releases the GIL, so the CPU worker threads run blocks in parallel.
// Arithmetic is in the rows' own precision T (float32 or float64), like the torch-op kernels; every loop
// over a row is a plain vectorisable reduction (one horizontal sum per loop and row).
//
// Forward, per row: shift = max x (0 for an all -inf row), the threshold tau of y = x - shift (large scores
// keep their precision; the searches are below, with their papers), p = (y - tau)_+^(1/(alpha-1)) / norm.
// Backward, per row, from the saved (shift, tau, norm): eq. 10 of Peters et al. 2019,
//   ds = gppr * (g - <g, gppr> / sum gppr), gppr = p^(2 - alpha) (the support indicator for sparsemax),
// and for a learnable alpha the row's d loss / d alpha (Correia et al. 2019, eq. 12-14).
//
// Return value of the forward: 0 on success, 1 if a row holds NaN or +inf (the caller raises).

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "vectors.h"

namespace {

using namespace hop;

// Sums over a row of r^(e-1) and r^e, r = ((x - shift) - tau)_+ (the subtraction in this order everywhere:
// forward and backward see the same r), and, when `out` is given, r^e into out (`r_em1` instead: r^(e-1)); when
// `log2_r` is given, log2 r into it on the support (0 elsewhere).
inline void power_sums(const float* x, int64_t n, float shift, float tau, float em1, float* out, bool r_em1,
                       double* s_em1, double* f, float* log2_r = nullptr) {
  vi lane;
  for (int j = 0; j < LANES; ++j) lane[j] = j;
  vf s_acc = splat(0.0f), f_acc = splat(0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf r = (load(x + j0, len) - shift) - tau;
    const vi in = (r > splat(0.0f)) & (lane < static_cast<int32_t>(len));  // padded lanes of a tail: out
    if (!any(in)) {  // most chunks of a long row: no power to take
      if (out != nullptr) store(out + j0, splat(0.0f), len);
      if (log2_r != nullptr) store(log2_r + j0, splat(0.0f), len);
      continue;
    }
    vf l2;
    const vf pw = select(in, pow_pos(r, splat(em1), log2_r != nullptr ? &l2 : nullptr), splat(0.0f));
    if (log2_r != nullptr) store(log2_r + j0, select(in, l2, splat(0.0f)), len);
    const vf re = pw * select(in, r, splat(0.0f));
    s_acc += pw;
    f_acc += re;
    if (out != nullptr) store(out + j0, r_em1 ? pw : re, len);
  }
  *s_em1 = lane_sum(s_acc);
  *f = lane_sum(f_acc);
}

inline void power_sums(const double* x, int64_t n, double shift, double tau, double em1, double* out, bool r_em1,
                       double* s_em1, double* f, double* log2_r = nullptr) {
  double s = 0, fs = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double r = (x[j] - shift) - tau;
    double l2 = 0.0;
    const double pw = pow_pos(r, em1, log2_r != nullptr ? &l2 : nullptr);
    if (log2_r != nullptr) log2_r[j] = l2;
    const double re = r > 0.0 ? pw * r : 0.0;
    s += pw;
    fs += re;
    if (out != nullptr) out[j] = r_em1 ? pw : re;
  }
  *s_em1 = s;
  *f = fs;
}

// out[j] = log p[j] for p[j] > 0, else 0.
inline void logs(const float* p, int64_t n, float* out) {
  const float tiny = std::numeric_limits<float>::min();
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf v = load(p + j0, len);
    if (!any(v > splat(0.0f))) {
      store(out + j0, splat(0.0f), len);
      continue;
    }
    const vf lg = log2_pos(select(v > splat(tiny), v, splat(tiny))) * 0.693147181f;
    store(out + j0, select(v > splat(0.0f), lg, splat(0.0f)), len);
  }
}

inline void logs(const double* p, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] > 0.0 ? std::log(p[j]) : 0.0;
}

// Long rows are searched on their candidates: every map's threshold of y = x - shift is at least
// max y - 1 = -1 ((y_max - tau)^e <= sum_j (y_j - tau)_+^e = 1), so only the entries y > -1 can be in the
// support (a few dozen on rows of thousands of attention scores). One pass (keep_above) copies them to scratch
// (room for n + LANES entries) and sums them (any superset of the support gives the searches' mean bound); the
// searches' passes then run over those instead of the row, which at the attention core's block sizes streams
// from the L2 or L3 cache on long rows.
// Rows from COMPACT[map] entries on are compacted (below that the row's own passes, in L1, cost less).
constexpr int64_t COMPACT[] = {512, 192, 129};  // sparsemax, entmax15, general
constexpr int64_t COMPACT_MIN = 129;  // the smallest of them: rows from here on need scratch

// The entries v = y[j] - base above `bound`, copied to `out` (which may be y: in place) and counted; *total (when
// given) is their sum minus a bound on its rounding for |v| <= 1.
template <typename T>
inline int64_t keep_above_scalar(const T* y, int64_t n, T base, T bound, T* out, int64_t k, double* sum) {
  for (int64_t j = 0; j < n; ++j) {
    const T v = y[j] - base;
    out[k] = v;
    const bool in = v > bound;
    *sum += in ? static_cast<double>(v) : 0.0;
    k += in ? 1 : 0;
  }
  return k;
}

template <typename T>
inline void rounded_total(double sum, int64_t k, T* total) {
  if (total != nullptr) *total = static_cast<T>(sum) - 4 * std::numeric_limits<T>::epsilon() * static_cast<T>(k);
}

template <typename T>
inline int64_t keep_above(const T* y, int64_t n, T base, T bound, T* out, T* total) {
  double sum = 0;
  const int64_t k = keep_above_scalar(y, n, base, bound, out, 0, &sum);
  rounded_total(sum, k, total);
  return k;
}

#if defined(__AVX512F__)
template <>
inline int64_t keep_above<float>(const float* y, int64_t n, float base, float bound, float* out, float* total) {
  const __m512 sh = _mm512_set1_ps(base), lo = _mm512_set1_ps(bound);
  __m512d acc = _mm512_setzero_pd();
  int64_t k = 0, j = 0;
  for (; j + LANES <= n; j += LANES) {  // in place: the store at k <= j only overwrites entries already read
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(y + j), sh);
    const __mmask16 in = _mm512_cmp_ps_mask(v, lo, _CMP_GT_OQ);
    if (in) {  // on long rows most chunks hold no candidate
      const __m512 c = _mm512_maskz_compress_ps(in, v);
      _mm512_storeu_ps(out + k, c);
      if (total != nullptr) {
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(c)));
        acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1))));
      }
      k += __builtin_popcount(static_cast<unsigned>(in));
    }
  }
  double sum = _mm512_reduce_add_pd(acc);
  k = keep_above_scalar(y + j, n - j, base, bound, out, k, &sum);
  rounded_total(sum, k, total);
  return k;
}
#endif

// ---------------------------------------------------------------- thresholds
// Which map a row takes: sparsemax (also alpha = 2 rows of a per-row alpha), the exact 1.5-entmax (a float
// alpha of 1.5), or the general alpha-entmax.

template <typename T>
inline Map row_map(int kind, T alpha, bool per_row_alpha) {
  if (kind == SPARSEMAX || alpha == T(2)) return Map::sparsemax;
  if (alpha == T(1.5) && !per_row_alpha) return Map::entmax15;
  return Map::general;
}

// One pass over a row: its maximum `shift` (0 for an all -inf row), *bad when it holds NaN or +inf, and
// *total = sum (x - shift) minus a bound on that sum's rounding error (so the thresholds' mean bounds below
// stay lower bounds; -inf when the row holds -inf).
template <typename T>
inline T row_stats(const T* __restrict x, int64_t n, bool* bad, T* total) {
  T m = -inf<T>(), sum = 0, abs_sum = 0;
  int flag = 0;
#pragma omp simd reduction(max : m) reduction(| : flag) reduction(+ : sum, abs_sum)
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j];
    flag |= (v != v) | (v == inf<T>());
    m = v > m ? v : m;
    sum += v;
    abs_sum += std::fabs(v);
  }
  *bad = flag != 0;
  const T shift = m == -inf<T>() ? T(0) : m;
  const T nt = static_cast<T>(n);
  const T slack = 4 * std::numeric_limits<T>::epsilon() * (abs_sum + nt * std::fabs(shift));
  *total = (sum - nt * shift) - slack;
  return shift;
}

// The threshold searches run on a group of up to GROUP rows in lockstep: the rows are independent, so while
// one row's pass waits on its sums (each pass of a row needs the previous pass's threshold), the
// out-of-order core works on the others. One row at a time, the passes of short rows were latency-bound:
// grouped, the forward took 0.70-0.84x the time for sparsemax and 0.88-0.92x for a general alpha on rows
// of 65 (1.5-entmax: 1.0x, its closed form ends most rows after one or two passes).
constexpr int GROUP = 4;

// Exact sparsemax thresholds of y = x - shift (Martins & Astudillo 2016): Michelot's support iteration from
// the lower bound max(max y - 1, (sum y - 1) / n), stopped when the support's own threshold keeps every
// support entry above it.
template <typename T>
inline void sparsemax_tau(const T* const* x, int count, const int64_t* len, const T* shift, const T* total, T* tau) {
  bool live[GROUP];
  int64_t longest = 0;
  for (int r = 0; r < count; ++r) {
    tau[r] = -1;  // max y - 1 <= tau*
    const T mean_bound = (total[r] - 1) / static_cast<T>(len[r]);
    longest = len[r] > longest ? len[r] : longest;
    if (mean_bound > tau[r]) tau[r] = mean_bound;  // false for -inf
    live[r] = true;
  }
  for (int64_t it = 0; it < longest + 2; ++it) {
    T cnt[GROUP], sum[GROUP], lo[GROUP];
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      const T* __restrict xr = x[r];
      const T sh = shift[r], t = tau[r];
      const int64_t n = len[r];
      T c = 0, sm = 0, l = inf<T>();
#pragma omp simd reduction(+ : c, sm) reduction(min : l)
      for (int64_t j = 0; j < n; ++j) {
        const T y = xr[j] - sh;
        const bool in = y > t;
        c += in ? T(1) : T(0);
        sm += in ? y : T(0);
        l = (in && y < l) ? y : l;
      }
      cnt[r] = c;
      sum[r] = sm;
      lo[r] = l;
    }
    bool any = false;
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      live[r] = false;
      if (cnt[r] == T(0)) continue;  // an all -inf row
      const T next = (sum[r] - 1) / cnt[r];  // >= tau (tau is a lower bound), <= tau*
      if (next < lo[r]) {  // the support reproduces itself: exact
        if (next > tau[r]) tau[r] = next;
        continue;
      }
      if (!(next > tau[r])) continue;  // float rounding: no progress
      tau[r] = next;
      live[r] = any = true;
    }
    if (!any) break;
  }
}

// 1.5-entmax thresholds of y = x - shift (x scaled by alpha - 1 = 1/2): Newton from the left on
// ||(y - tau)_+||_2 = 1 and, at every iterate, the closed-form threshold of the support (Peters et al.
// 2019, Alg. 2), accepted when it reproduces that support (exact[r]; else the caller renormalises).
template <typename T>
inline void entmax15_tau(const T* const* x, int count, const int64_t* len, const T* shift, const T* total,
                         int max_iter, T* tau, bool* exact) {
  bool live[GROUP];
  for (int r = 0; r < count; ++r) {
    tau[r] = -1;
    const T mean_bound = total[r] / static_cast<T>(len[r]) - T(1) / std::sqrt(static_cast<T>(len[r]));
    if (mean_bound > tau[r]) tau[r] = mean_bound;
    live[r] = true;
    exact[r] = false;
  }
  for (int it = 0; it < max_iter; ++it) {
    T cnt[GROUP], s1[GROUP], f[GROUP], lo[GROUP], hi[GROUP];
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      const T* __restrict xr = x[r];
      const T sh = shift[r], t = tau[r];
      const int64_t n = len[r];
      T c = 0, a = 0, b = 0, l = inf<T>(), h = -inf<T>();
#pragma omp simd reduction(+ : c, a, b) reduction(min : l) reduction(max : h)
      for (int64_t j = 0; j < n; ++j) {
        const T y = xr[j] - sh;
        const T rr = y - t;
        const bool in = rr > T(0);
        c += in ? T(1) : T(0);
        a += in ? rr : T(0);
        b += in ? rr * rr : T(0);
        l = (in && y < l) ? y : l;
        h = (!in && y > h) ? y : h;
      }
      cnt[r] = c;
      s1[r] = a;
      f[r] = b;
      lo[r] = l;
      hi[r] = h;
    }
    bool any = false;
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      live[r] = false;
      if (cnt[r] == T(0)) {  // an all -inf row
        exact[r] = true;
        continue;
      }
      const T mean = s1[r] / cnt[r];
      const T disc = (T(1) - f[r]) / cnt[r] + mean * mean;
      if (disc >= T(0)) {
        const T cf = tau[r] + mean - std::sqrt(disc);
        if (cf < lo[r] && hi[r] <= cf) {
          exact[r] = true;
          tau[r] = cf;
          continue;
        }
      }
      const T big_f = std::sqrt(f[r]);
      const T next = tau[r] + (big_f - T(1)) * big_f / s1[r];
      if (!(next > tau[r])) continue;
      tau[r] = next;
      live[r] = any = true;
    }
    if (!any) break;
  }
}

// A start for the alpha-entmax search on long rows, above its mean bound: a Newton step (as in entmax_tau) on
// the maxima of the candidates' 16 lanes (entry j in lane j mod 16). The threshold of any subset of a row's
// entries is a lower bound on the row's, and Newton from the left on a subset stays below the subset's (a step
// that would go back, where the subset's threshold is below tau already, is not taken). The candidates above
// the start are then all the search sees (on attention rows of 256 / 1024 scores at alpha = 1.3 about a third
// of the candidates: two steps left 79 / 160 of 177 / 554), and it takes about one pass fewer. The forward took
// 0.84-0.93x the time on rows of 256 and 1024 at alpha = 1.3 and 1.6. The steps of a group's rows are
// independent chains (their latency, a power, a lane sum and a power again, overlaps).
constexpr int SUBSET_STEPS = 1;  // a second step: 0.92-0.95x instead of 0.84-0.93x

// lm[l] = the maximum of y[j] - base over the entries j = l mod LANES (-inf for a lane without entries).
// Float rows: one vector (a scalar loop like the double one made the forward 1.08-1.11x slower); double: tests.
inline void lane_maxima(const double* y, int64_t n, double base, double* lm) {
  for (int l = 0; l < LANES; ++l) lm[l] = -inf<double>();
  for (int64_t j = 0; j < n; ++j) lm[j % LANES] = std::max(lm[j % LANES], y[j] - base);
}

inline void lane_maxima(const float* y, int64_t n, float base, float* lm) {
  vi lane;
  for (int j = 0; j < LANES; ++j) lane[j] = j;
  vf m = splat(-inf<float>());
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf v = select(lane < static_cast<int32_t>(len), load(y + j0, len) - base, splat(-inf<float>()));
    m = select(v > m, v, m);
  }
  store(lm, m, LANES);
}

// Newton's step on ||(y - tau)_+||_e = 1 from the power sums s = sum r^(e-1), f = sum r^e > 0 at tau; *big_f
// (when given) = f^(1/e), the norm.
template <typename T>
inline T newton_step(T tau, double s, double f, T e, T* big_f = nullptr) {
  const T fr = static_cast<T>(f), norm = pow_scalar(fr, T(1) / e);
  if (big_f != nullptr) *big_f = norm;
  return tau + (norm - T(1)) * fr / (norm * static_cast<T>(s));
}

// One Newton step from tau on the LANES values lm (tau itself when it would not move right).
template <typename T>
inline T subset_step(const T* lm, T tau, T e) {
  double s, f;
  power_sums(lm, LANES, T(0), tau, e - T(1), static_cast<T*>(nullptr), false, &s, &f);
  if (!(f > 0.0)) return tau;
  const T next = newton_step(tau, s, f, e);
  return next > tau ? next : tau;
}

// alpha-entmax thresholds of y = x - shift (x scaled by alpha - 1), e = 1 / (alpha - 1): Newton from the left
// on ||(y - tau)_+||_e = 1; the step taken at | ||.||_e - 1 | <= tol is the last (or it stops when it
// stalls). Every iterate is a lower bound, so only the entries above it can be in the support: on rows with
// scratch (`cand[r]`, the row's candidates themselves or len[r] free entries) the search continues on those.
template <typename T>
inline void entmax_tau(const T* const* x, int count, const int64_t* len, const T* shift, const T* total, const T* e,
                       T tol, int max_iter, T* const* cand, T* tau) {
  const T* y[GROUP];  // the entries searched, minus base
  T base[GROUP], em1[GROUP];
  int64_t k[GROUP];
  bool live[GROUP];
  for (int r = 0; r < count; ++r) {
    y[r] = x[r];
    base[r] = shift[r];
    k[r] = len[r];
    em1[r] = e[r] - T(1);
    tau[r] = -1;
    const T nr = static_cast<T>(len[r]);
    const T mean_bound = total[r] / nr - pow_scalar(nr, -T(1) / e[r]);
    if (mean_bound > tau[r]) tau[r] = mean_bound;
    live[r] = true;
  }
  {  // long rows (with scratch): the lane-maxima start, then only the candidates above it
    T lm[GROUP][LANES], mean_bound[GROUP];
    for (int r = 0; r < count; ++r) {
      if (cand[r] != nullptr) lane_maxima(y[r], k[r], base[r], lm[r]);
      mean_bound[r] = tau[r];
    }
    for (int it = 0; it < SUBSET_STEPS; ++it) {
      for (int r = 0; r < count; ++r) {
        if (cand[r] != nullptr) tau[r] = subset_step(lm[r], tau[r], e[r]);
      }
    }
    for (int r = 0; r < count; ++r) {
      if (cand[r] != nullptr && tau[r] > mean_bound[r]) {
        k[r] = keep_above(y[r], k[r], base[r], tau[r], cand[r], static_cast<T*>(nullptr));
        y[r] = cand[r];
        base[r] = T(0);
      }
    }
  }
  for (int it = 0; it < max_iter; ++it) {
    double s_em1[GROUP], f[GROUP];
    for (int r = 0; r < count; ++r) {
      if (live[r]) power_sums(y[r], k[r], base[r], tau[r], em1[r], static_cast<T*>(nullptr), false, &s_em1[r], &f[r]);
    }
    bool any = false;
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      live[r] = false;
      if (f[r] <= 0) continue;  // an all -inf row
      T big_f;
      const T next = newton_step(tau[r], s_em1[r], f[r], e[r], &big_f);
      if (!(next > tau[r])) continue;  // Newton from the left only moves right: a step back is float rounding
      tau[r] = next;
      if (std::fabs(big_f - T(1)) <= tol) continue;  // within tol: that last (quadratic) step without a check
      live[r] = any = true;
      if (cand[r] != nullptr) {  // keep the candidates above the new bound
        k[r] = keep_above(y[r], k[r], base[r], tau[r], cand[r], static_cast<T*>(nullptr));
        y[r] = cand[r];
        base[r] = T(0);
      }
    }
    if (!any) break;
  }
}

// ---------------------------------------------------------------- forward

// The weights at a row's threshold and their normaliser (1 unless the row is renormalised), written as the
// backward recomputes them from (shift, tau, norm).
template <typename T>
inline T weights(Map map, const T* xi, T* pi, int64_t n, T shift, T tau, bool exact, T em1) {  // pi may be xi
  if (map == Map::sparsemax) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T r = xi[j] - shift - tau;
      pi[j] = r > T(0) ? r : T(0);
    }
    return T(1);
  }
  T norm = 0;
  if (map == Map::entmax15) {
#pragma omp simd reduction(+ : norm)
    for (int64_t j = 0; j < n; ++j) {
      const T r = xi[j] - shift - tau;
      const T r2 = r > T(0) ? r * r : T(0);
      norm += r2;
      pi[j] = r2;
    }
    if (exact) return T(1);
  } else {
    double s_em1, sum;
    power_sums(xi, n, shift, tau, em1, pi, false, &s_em1, &sum);
    norm = static_cast<T>(sum);
  }
  if (!(norm > T(0))) return T(1);
  const T inv = T(1) / norm;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) pi[j] *= inv;
  return norm;
}

// `p` may be `x` itself (the weights overwrite the scores row by row, after the row's search).
template <typename T>
int forward(const T* x, T* p, int64_t rows, int64_t n, int kind, const T* alpha_rows, double alpha_f, double tol,
            int max_iter, T* tau_out, T* shift_out, T* norm_out) {
  std::vector<T> cand(n >= COMPACT_MIN ? GROUP * (n + LANES) : 0);
  for (int64_t i0 = 0; i0 < rows; i0 += GROUP) {  // groups of rows; each map's rows searched together
    const int size = static_cast<int>(rows - i0 < GROUP ? rows - i0 : GROUP);
    T total[GROUP], alpha[GROUP];
    Map map[GROUP];
    for (int r = 0; r < size; ++r) {
      const int64_t i = i0 + r;
      bool bad = false;
      shift_out[i] = row_stats(x + i * n, n, &bad, &total[r]);
      if (bad) return 1;
      alpha[r] = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
      map[r] = row_map(kind, alpha[r], alpha_rows != nullptr);
    }
    for (Map m : {Map::sparsemax, Map::entmax15, Map::general}) {
      const T* ys[GROUP];  // what the search reads: the row, or its candidates (then shift 0)
      T* scratch[GROUP];
      int64_t len[GROUP];
      T shs[GROUP], tots[GROUP], es[GROUP], taus[GROUP];
      bool exact[GROUP];
      int idx[GROUP], count = 0;
      for (int r = 0; r < size; ++r) {
        if (map[r] != m) continue;
        const T* xr = x + (i0 + r) * n;
        idx[count] = r;
        es[count] = T(1) / (alpha[r] - T(1));
        exact[count] = true;
        if (n >= COMPACT[static_cast<int>(m)]) {
          scratch[count] = cand.data() + count * (n + LANES);
          len[count] = keep_above(xr, n, shift_out[i0 + r], T(-1), scratch[count], &tots[count]);
          ys[count] = scratch[count];
          shs[count] = T(0);
        } else {
          scratch[count] = nullptr;
          len[count] = n;
          ys[count] = xr;
          shs[count] = shift_out[i0 + r];
          tots[count] = total[r];
        }
        ++count;
      }
      if (count == 0) continue;
      if (m == Map::sparsemax) sparsemax_tau(ys, count, len, shs, tots, taus);
      if (m == Map::entmax15) entmax15_tau(ys, count, len, shs, tots, max_iter, taus, exact);
      if (m == Map::general) entmax_tau(ys, count, len, shs, tots, es, static_cast<T>(tol), max_iter, scratch, taus);
      for (int c = 0; c < count; ++c) {
        const int64_t i = i0 + idx[c];
        tau_out[i] = taus[c];
        norm_out[i] = weights(m, x + i * n, p + i * n, n, shift_out[i], taus[c], exact[c], es[c] - T(1));
      }
    }
  }
  return 0;
}

// One row of the backward: xi (n scores, scaled by alpha - 1) overwritten with the weights p; gi: d loss / d p;
// di: d loss / d x (written); dalpha (nullable): the row's d loss / d alpha (written); lg: scratch of n entries
// (when dalpha is given). The row may be any subset of a row's entries that holds its support (`support` below).
template <typename T>
void backward_row(T* __restrict xi, const T* __restrict gi, T* __restrict di, int64_t n, int kind, T alpha,
                  bool per_row_alpha, T tau, T shift, T norm, T* dalpha, T* lg) {
  const T tiny = std::numeric_limits<T>::min();
  T s_gppr = 0, g_gppr = 0;
  bool log2_r = false;  // lg holds log2 r on the support (general rows): log p = e ln r - ln norm
  const Map map = row_map(kind, alpha, per_row_alpha);
  if (map == Map::sparsemax) {  // gppr: the support indicator
    const T inv_norm = T(1) / norm;
#pragma omp simd reduction(+ : s_gppr, g_gppr)
    for (int64_t j = 0; j < n; ++j) {
      const T r = xi[j] - shift - tau;
      const bool in = r > T(0);
      xi[j] = in ? r * inv_norm : T(0);
      di[j] = in ? T(1) : T(0);
      s_gppr += in ? T(1) : T(0);
      g_gppr += in ? gi[j] : T(0);
    }
  } else if (map == Map::entmax15) {  // gppr = sqrt(p) = r / sqrt(norm)
    const T inv_norm = T(1) / norm, scale = T(1) / std::sqrt(norm);
#pragma omp simd reduction(+ : s_gppr, g_gppr)
    for (int64_t j = 0; j < n; ++j) {
      const T r = xi[j] - shift - tau;
      const T rp = r > T(0) ? r : T(0);
      xi[j] = rp * rp * inv_norm;
      const T gp = rp * scale;
      di[j] = gp;
      s_gppr += gp;
      g_gppr += gp * gi[j];
    }
  } else {  // gppr = p^(2 - alpha) = r^(e - 1) norm^(alpha - 2)
    const T em1 = T(1) / (alpha - T(1)) - T(1);
    const T inv_norm = T(1) / norm, scale = pow_scalar(norm, alpha - T(2));
    double unused_s, unused_f;
    log2_r = dalpha != nullptr;  // r^(e - 1) into ds (scaled below), and log2 r for d/dalpha
    power_sums(xi, n, shift, tau, em1, di, true, &unused_s, &unused_f, log2_r ? lg : nullptr);
    double s_sum = 0, g_sum = 0;  // sums in double: (a - 1)^-2 amplifies their rounding in d/dalpha
#pragma omp simd reduction(+ : s_sum, g_sum)
    for (int64_t j = 0; j < n; ++j) {
      const T r = xi[j] - shift - tau;
      const T rp = r > T(0) ? r : T(0);
      const T r_em1 = di[j];
      xi[j] = rp * r_em1 * inv_norm;
      const T gp = r_em1 * scale;
      di[j] = gp;
      s_sum += gp;
      g_sum += static_cast<double>(gp) * gi[j];
    }
    s_gppr = static_cast<T>(s_sum);
    g_gppr = static_cast<T>(g_sum);
  }
  const T q = g_gppr / (s_gppr > tiny ? s_gppr : tiny);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) di[j] = di[j] * (gi[j] - q);
  if (dalpha != nullptr) {
    // Correia et al. 2019, eq. 12-14: dp/dalpha = (p - skew) / (a-1)^2 - (p log p - skew H) / (a-1),
    // skew = gppr / sum gppr, H = sum p log p; contracted with g (<g, skew> = q), row by row
    // (sums in double: (g_p - q) / (a-1)^2 cancels)
    // (log p from the power's own log2 r when the row took one: the same value to float rounding, no log)
    const double e_ln2 = log2_r ? 0.6931471805599453 / (static_cast<double>(alpha) - 1.0) : 1.0;
    const double ln_norm = log2_r && norm > T(0) ? std::log(static_cast<double>(norm)) : 0.0;
    if (!log2_r) logs(xi, n, lg);
    double g_p = 0, plogp = 0, g_plogp = 0;
#pragma omp simd reduction(+ : g_p, plogp, g_plogp)
    for (int64_t j = 0; j < n; ++j) {
      const double pj = xi[j];
      const double t = pj * (e_ln2 * static_cast<double>(lg[j]) - ln_norm);
      g_p += gi[j] * pj;
      plogp += t;
      g_plogp += gi[j] * t;
    }
    const double am1 = static_cast<double>(alpha) - 1.0, qd = static_cast<double>(q);
    *dalpha = static_cast<T>((g_p - qd) / (am1 * am1) - (g_plogp - qd * plogp) / am1);
  }
}

// x: the block's scores (scaled by alpha - 1), overwritten with the weights p; g: d loss / d p;
// ds: d loss / d x (written); dalpha (nullable): d loss / d alpha per row (written).
template <typename T>
void backward(T* __restrict x, const T* __restrict g, T* __restrict ds, int64_t rows, int64_t n, int kind,
              const T* alpha_rows, double alpha_f, const T* tau_in, const T* shift_in, const T* norm_in,
              T* dalpha) {
  std::vector<T> lg(dalpha != nullptr ? n : 0);
  for (int64_t i = 0; i < rows; ++i) {
    const T alpha = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
    backward_row(x + i * n, g + i * n, ds + i * n, n, kind, alpha, alpha_rows != nullptr, tau_in[i], shift_in[i],
                 norm_in[i], dalpha != nullptr ? dalpha + i : nullptr, lg.data());
  }
}

// ---------------------------------------------------------------- products on the supports
// The weights of long rows are mostly zero (on attention scores of a thousand keys: a few for sparsemax, a few
// dozen for 1.5-entmax, a hundred for alpha = 1.3), so a block whose supports are small enough (at most `limit`
// entries in all) reads out and backpropagates through its supports only: per row, the support's indices, then
// sums over them, in place of the dense matmuls with the block's weights (forward: p v; backward: g v^T, ds k,
// ds^T q, p^T g). Otherwise the kernels write nothing and return 1 (the caller takes the matmuls).

// The entries j of a row with x[j] - shift > tau (the weights' own test, (x[j] - shift) - tau > 0, for floats: a
// superset of it where subnormals flush to zero, which the row kernels' own tests then leave at 0): their indices
// into idx and their x[j] into xs (both with room for n + LANES entries); returns their count.
template <typename T>
inline int64_t support(const T* x, int64_t n, T shift, T tau, int32_t* idx, T* xs) {
  int64_t k = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T v = x[j];
    idx[k] = static_cast<int32_t>(j);
    xs[k] = v;
    k += v - shift > tau ? 1 : 0;
  }
  return k;
}

#if defined(__AVX512F__)
template <>
inline int64_t support<float>(const float* x, int64_t n, float shift, float tau, int32_t* idx, float* xs) {
  const __m512 sh = _mm512_set1_ps(shift), ta = _mm512_set1_ps(tau);
  __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(LANES);
  int64_t k = 0, j = 0;
  for (; j + LANES <= n; j += LANES, lane = _mm512_add_epi32(lane, step)) {
    const __m512 v = _mm512_loadu_ps(x + j);
    const __mmask16 in = _mm512_cmp_ps_mask(_mm512_sub_ps(v, sh), ta, _CMP_GT_OQ);
    if (in) {
      _mm512_storeu_ps(xs + k, _mm512_maskz_compress_ps(in, v));
      _mm512_storeu_si512(idx + k, _mm512_maskz_compress_epi32(in, lane));
      k += __builtin_popcount(static_cast<unsigned>(in));
    }
  }
  for (; j < n; ++j) {
    const float v = x[j];
    idx[k] = static_cast<int32_t>(j);
    xs[k] = v;
    k += v - shift > tau ? 1 : 0;
  }
  return k;
}
#endif

// The supports of a block's rows (rows x m; shift and tau per row, or 0 when null), gathered in one pass: row i's
// entries are idx / xs [start[i], start[i + 1]). False as soon as they pass `limit` entries.
template <typename T>
struct Supports {
  std::unique_ptr<int32_t[]> idx;  // uninitialised (a zero fill cost as much as the gathering)
  std::unique_ptr<T[]> xs;
  std::vector<int64_t> start;

  bool gather(const T* x, int64_t rows, int64_t m, const T* shift, const T* tau, int64_t limit) {
    if (limit < 0) return false;
    if (limit > rows * m) limit = rows * m;
    idx.reset(new int32_t[limit + m + LANES]);  // a row's compress stores write up to LANES entries past its count
    xs.reset(new T[limit + m + LANES]);
    start.resize(rows + 1);
    int64_t k = 0;
    for (int64_t i = 0; i < rows; ++i) {
      start[i] = k;
      k += support(x + i * m, m, shift != nullptr ? shift[i] : T(0), tau != nullptr ? tau[i] : T(0), idx.get() + k,
                   xs.get() + k);
      if (k > limit) return false;
    }
    start[rows] = k;
    return true;
  }
};

// The products' widths: head sizes d = dv of 16, 32, 64 or 128 are compile-time constants (W; loops the compiler
// unrolls, sums kept in registers: the backward on the supports took about 0.8x the time with d = 32), others
// are read at run time (W = 0).
template <typename T, int W>
inline void readout_rows(const Supports<T>& sup, const T* v, T* out, int64_t groups, int64_t rows, int64_t m,
                         int64_t dv_rt, int64_t out_stride) {
  const int64_t dv = W > 0 ? W : dv_rt;
  std::vector<T> acc(dv);
  for (int64_t g = 0; g < groups; ++g) {
    const T* vg = v + g * m * dv;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = g * rows + r;
      T* __restrict a = acc.data();
      for (int64_t t = 0; t < dv; ++t) a[t] = T(0);
      for (int64_t c = sup.start[i]; c < sup.start[i + 1]; ++c) {
        const T w = sup.xs[c];
        const T* __restrict vj = vg + static_cast<int64_t>(sup.idx[c]) * dv;
#pragma omp simd
        for (int64_t t = 0; t < dv; ++t) a[t] += w * vj[t];
      }
      T* __restrict oi = out + g * out_stride + r * dv;
      for (int64_t t = 0; t < dv; ++t) oi[t] = a[t];
    }
  }
}

// out (rows of `groups` groups, group stride out_stride, rows dv apart) = p v, from the weights p
// (groups * rows x m) and v (groups x m x dv), on the supports.
template <typename T>
int readout_support(const T* p, const T* v, T* out, int64_t groups, int64_t rows, int64_t m, int64_t dv,
                    int64_t out_stride, int64_t limit) {
  Supports<T> sup;
  if (!sup.gather(p, groups * rows, m, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), limit))
    return 1;
  switch (dv) {
    case 16: readout_rows<T, 16>(sup, v, out, groups, rows, m, dv, out_stride); break;
    case 32: readout_rows<T, 32>(sup, v, out, groups, rows, m, dv, out_stride); break;
    case 64: readout_rows<T, 64>(sup, v, out, groups, rows, m, dv, out_stride); break;
    case 128: readout_rows<T, 128>(sup, v, out, groups, rows, m, dv, out_stride); break;
    default: readout_rows<T, 0>(sup, v, out, groups, rows, m, dv, out_stride);
  }
  return 0;
}

// <a, b> over n entries (n = W when W > 0): float rows of whole vectors summed as a tree of 16-lane sums (the
// loop's own reduction added the last 16 lanes one by one).
template <typename T, int W>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && W > 0 && W % LANES == 0) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int t = LANES; t < W; t += LANES) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + t), _mm512_loadu_ps(b + t), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t t = 0; t < n; ++t) s += a[t] * b[t];
  return s;
}

struct Block {  // a block's shape and the strides of its row-sliced operands (go, q and dq)
  int64_t groups, rows, m, d, dv, go_stride, q_stride;
};

template <typename T, int W>
void backward_rows(Supports<T>& sup, const T* go, const T* q, const T* k, const T* v, T* dq, T* dk, T* dv_out,
                   Block b, int kind, const T* alpha_rows, double alpha_f, const T* tau_in, const T* shift_in,
                   const T* norm_in, T* dalpha, double grad_scale) {
  const int64_t m = b.m, d = W > 0 ? W : b.d, dv = W > 0 ? W : b.dv;
  std::vector<T> gs(m), ds(m), lg(dalpha != nullptr ? m : 0), acc(d);
  const T scale = static_cast<T>(grad_scale);
  for (int64_t g = 0; g < b.groups; ++g) {
    const T *kg = k + g * m * d, *vg = v + g * m * dv;
    T *dkg = dk + g * m * d, *dvg = dv_out + g * m * dv;
    for (int64_t r = 0; r < b.rows; ++r) {
      const int64_t i = g * b.rows + r;
      const T *__restrict goi = go + g * b.go_stride + r * dv, *__restrict qi = q + g * b.q_stride + r * d;
      const int32_t* idx = sup.idx.get() + sup.start[i];
      T* xs = sup.xs.get() + sup.start[i];
      const int64_t n = sup.start[i + 1] - sup.start[i];
      for (int64_t c = 0; c < n; ++c) {  // d loss / d p on the support: <go_i, v_j>
        gs[c] = dot<T, W>(goi, vg + static_cast<int64_t>(idx[c]) * dv, dv);
      }
      const T alpha = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
      backward_row(xs, gs.data(), ds.data(), n, kind, alpha, alpha_rows != nullptr, tau_in[i], shift_in[i],
                   norm_in[i], dalpha != nullptr ? dalpha + i : nullptr, lg.data());
      T* __restrict a = acc.data();
      for (int64_t t = 0; t < d; ++t) a[t] = T(0);
      for (int64_t c = 0; c < n; ++c) {
        const int64_t j = idx[c];
        const T dsj = ds[c], pj = xs[c], sdsj = scale * dsj;
        const T* __restrict kj = kg + j * d;
        T* __restrict dkj = dkg + j * d;
        T* __restrict dvj = dvg + j * dv;
#pragma omp simd
        for (int64_t t = 0; t < d; ++t) {
          a[t] += dsj * kj[t];
          dkj[t] += sdsj * qi[t];
        }
#pragma omp simd
        for (int64_t t = 0; t < dv; ++t) dvj[t] += pj * goi[t];
      }
      T* __restrict dqi = dq + g * b.q_stride + r * d;
      for (int64_t t = 0; t < d; ++t) dqi[t] = scale * a[t];
    }
  }
}

// The backward of a block on the supports, from its recomputed scores x (groups * rows x m, read only), the
// gradient of the read-out go, the queries q (go, q and dq: group strides go_stride, q_stride; rows dv, d apart),
// keys k and values v (groups x m x d, groups x m x dv): dq = grad_scale ds k (written), dk += grad_scale ds^T q,
// dv_out += p^T go (added) and dalpha per row (written, when given).
template <typename T>
int backward_support(const T* x, const T* go, const T* q, const T* k, const T* v, T* dq, T* dk, T* dv_out,
                     int64_t groups, int64_t rows, int64_t m, int64_t d, int64_t dv, int64_t go_stride,
                     int64_t q_stride, int kind, const T* alpha_rows, double alpha_f, const T* tau_in,
                     const T* shift_in, const T* norm_in, T* dalpha, double grad_scale, int64_t limit) {
  Supports<T> sup;
  if (!sup.gather(x, groups * rows, m, shift_in, tau_in, limit)) return 1;
  const Block b{groups, rows, m, d, dv, go_stride, q_stride};
  const int w = d == dv && (d == 16 || d == 32 || d == 64 || d == 128) ? static_cast<int>(d) : 0;
  switch (w) {
    case 16: backward_rows<T, 16>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in, shift_in,
                                  norm_in, dalpha, grad_scale); break;
    case 32: backward_rows<T, 32>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in, shift_in,
                                  norm_in, dalpha, grad_scale); break;
    case 64: backward_rows<T, 64>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in, shift_in,
                                  norm_in, dalpha, grad_scale); break;
    case 128: backward_rows<T, 128>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in, shift_in,
                                    norm_in, dalpha, grad_scale); break;
    default: backward_rows<T, 0>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in, shift_in,
                                 norm_in, dalpha, grad_scale);
  }
  return 0;
}

}  // namespace

extern "C" {

int hop_forward_f32(const float* x, float* p, int64_t rows, int64_t n, int kind, const float* alpha_rows,
                    double alpha_f, double tol, int max_iter, float* tau, float* shift, float* norm) {
  return forward<float>(x, p, rows, n, kind, alpha_rows, alpha_f, tol, max_iter, tau, shift, norm);
}

int hop_forward_f64(const double* x, double* p, int64_t rows, int64_t n, int kind, const double* alpha_rows,
                    double alpha_f, double tol, int max_iter, double* tau, double* shift, double* norm) {
  return forward<double>(x, p, rows, n, kind, alpha_rows, alpha_f, tol, max_iter, tau, shift, norm);
}

int hop_backward_f32(float* x, const float* g, float* ds, int64_t rows, int64_t n, int kind, const float* alpha_rows,
                     double alpha_f, const float* tau, const float* shift, const float* norm, float* dalpha) {
  backward<float>(x, g, ds, rows, n, kind, alpha_rows, alpha_f, tau, shift, norm, dalpha);
  return 0;
}

int hop_backward_f64(double* x, const double* g, double* ds, int64_t rows, int64_t n, int kind,
                     const double* alpha_rows, double alpha_f, const double* tau, const double* shift,
                     const double* norm, double* dalpha) {
  backward<double>(x, g, ds, rows, n, kind, alpha_rows, alpha_f, tau, shift, norm, dalpha);
  return 0;
}

int hop_readout_support_f32(const float* p, const float* v, float* out, int64_t groups, int64_t rows, int64_t m,
                            int64_t dv, int64_t out_stride, int64_t limit) {
  return readout_support<float>(p, v, out, groups, rows, m, dv, out_stride, limit);
}

int hop_readout_support_f64(const double* p, const double* v, double* out, int64_t groups, int64_t rows, int64_t m,
                            int64_t dv, int64_t out_stride, int64_t limit) {
  return readout_support<double>(p, v, out, groups, rows, m, dv, out_stride, limit);
}

int hop_backward_support_f32(const float* x, const float* go, const float* q, const float* k, const float* v, float* dq,
                             float* dk, float* dv_out, int64_t groups, int64_t rows, int64_t m, int64_t d, int64_t dv,
                             int64_t go_stride, int64_t q_stride, int kind, const float* alpha_rows, double alpha_f,
                             const float* tau, const float* shift, const float* norm, float* dalpha, double grad_scale,
                             int64_t limit) {
  return backward_support<float>(x, go, q, k, v, dq, dk, dv_out, groups, rows, m, d, dv, go_stride, q_stride, kind,
                                 alpha_rows, alpha_f, tau, shift, norm, dalpha, grad_scale, limit);
}

int hop_backward_support_f64(const double* x, const double* go, const double* q, const double* k, const double* v,
                             double* dq, double* dk, double* dv_out, int64_t groups, int64_t rows, int64_t m, int64_t d,
                             int64_t dv, int64_t go_stride, int64_t q_stride, int kind, const double* alpha_rows,
                             double alpha_f, const double* tau, const double* shift, const double* norm, double* dalpha,
                             double grad_scale, int64_t limit) {
  return backward_support<double>(x, go, q, k, v, dq, dk, dv_out, groups, rows, m, d, dv, go_stride, q_stride, kind,
                                  alpha_rows, alpha_f, tau, shift, norm, dalpha, grad_scale, limit);
}

int hop_abi_version() { return 4; }

}  // extern "C"
