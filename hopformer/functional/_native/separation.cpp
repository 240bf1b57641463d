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
#include <vector>

#include "rows.h"
#include "vectors.h"

namespace {

using namespace hop;

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

int hop_abi_version() { return 4; }

}  // extern "C"
