// Fused row kernels of the sparse attention core (sparsemax, 1.5-entmax, alpha-entmax).
//
// One call handles a block of rows of scores `x` (row-major, `rows x n`); each row is read a few times
// while it sits in the L1 cache, instead of the 15-40 full-block passes of the torch-op kernels.
// Built at first use by `hopformer/functional/_native/__init__.py` (plain C++, no torch headers) and
// called through ctypes, which releases the GIL, so the CPU worker threads run blocks in parallel.
// Arithmetic is in the rows' own precision T (float32 or float64), like the torch-op kernels; every loop
// over a row is a plain vectorisable reduction (one horizontal sum per loop and row).
//
// Forward, per row (Martins & Astudillo 2016; Peters et al. 2019, "Sparse sequence-to-sequence models"):
//   shift = max x (0 for an all -inf row), y = x - shift (large scores keep their precision),
//   sparsemax:  tau with sum (y - tau)_+ = 1, exact: Michelot's support iteration from a lower bound,
//               stopped when the support's own threshold keeps every support entry above it;
//   1.5-entmax: tau with sum (y - tau)_+^2 = 1, exact: Newton from the left on ||(y - tau)_+||_2 = 1 and,
//               at every iterate, the closed-form threshold of the support (Peters et al. 2019, Alg. 2),
//               accepted when it reproduces that support;
//   alpha:      Newton from the left on ||(y - tau)_+||_e = 1, e = 1 / (alpha - 1), on rows longer than
//               COMPACT only over the entries above the current bound; the step taken at
//               | ||.||_e - 1 | <= tol is the last (or it stops when it stalls); the row is renormalised
//               (`norm`).
//   p = (y - tau)_+^e / norm.
// Backward, per row, from the saved (shift, tau, norm): eq. 10 of Peters et al. 2019,
//   ds = gppr * (g - <g, gppr> / sum gppr), gppr = p^(2 - alpha) (the support indicator for sparsemax),
// and for a learnable alpha the row's d loss / d alpha (Correia et al. 2019, eq. 12-14).
//
// Return value of the forward: 0 on success, 1 if a row holds NaN or +inf (the caller raises).

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int SPARSEMAX = 0;

template <typename T>
constexpr T inf() {
  return std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------- powers and logarithms of a row
// Float rows: 16 lanes at a time with GCC/clang vector extensions (lowered to AVX-512, AVX2 or SSE),
// log2 and exp2 by polynomials (a few ulps, like the exp-log power of the torch-op kernels): libm's
// scalar logf/expf made general-alpha rows 5-10x slower, and the auto-vectoriser kept the loops scalar.
// Double rows (tests, gradcheck): libm, one entry at a time.

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t LANES = 16;

inline vf splat(float v) { return vf{} + v; }

inline vf select(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

inline vf log2_pos(vf x) {  // x positive normal floats
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 255) - 127;
  vf m = (vf)((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const vi high = m > splat(1.41421356f);
  m = select(high, m * 0.5f, m);  // [0.71, 1.41]
  e = e - high;  // high is -1 where true
  const vf t = (m - 1.0f) / (m + 1.0f), t2 = t * t;  // ln m = 2 atanh t, |t| <= 0.172
  const vf ln_m = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  return __builtin_convertvector(e, vf) + ln_m * 1.44269504f;
}

inline vf exp2_clamped(vf x) {  // 2^x for x in [-126, 127] (clamped)
  x = select(x < splat(-126.0f), splat(-126.0f), x);
  x = select(x > splat(127.0f), splat(127.0f), x);
  const vf fn = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const vf f = (x - fn) * 0.693147181f;  // 2^(x - n) = e^f, |f| <= 0.347
  const vf poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 +
                  f * (1.0f / 720 + f * (1.0f / 5040)))))));
  return poly * (vf)((__builtin_convertvector(fn, vi) + 127) << 23);
}

// out[j] = r^y with r = (x[j] - shift) - tau for r > 0 (r clamped to the smallest normal number), else 0
// (the subtraction in this order everywhere: forward and backward see the same r).
// Loads / stores of a chunk of up to LANES floats (a short tail through a zero-padded copy).
inline vf load(const float* x, int64_t len) {
  vf v;
  if (len == LANES) {
    __builtin_memcpy(&v, x, sizeof(vf));
  } else {
    float tmp[LANES] = {};
    for (int64_t j = 0; j < len; ++j) tmp[j] = x[j];
    __builtin_memcpy(&v, tmp, sizeof(vf));
  }
  return v;
}

inline void store(float* out, vf v, int64_t len) {
  if (len == LANES) {
    __builtin_memcpy(out, &v, sizeof(vf));
  } else {
    float tmp[LANES];
    __builtin_memcpy(tmp, &v, sizeof(vf));
    for (int64_t j = 0; j < len; ++j) out[j] = tmp[j];
  }
}

inline void powers(const float* x, int64_t n, float shift, float tau, float y, float* out) {
  const float tiny = std::numeric_limits<float>::min();
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf r = (load(x + j0, len) - shift) - tau;  // a padded tail gives some r: not stored
    const vf val = exp2_clamped(y * log2_pos(select(r > splat(tiny), r, splat(tiny))));
    store(out + j0, select(r > splat(0.0f), val, splat(0.0f)), len);
  }
}

inline void powers(const double* x, int64_t n, double shift, double tau, double y, double* out) {
  const double tiny = std::numeric_limits<double>::min();
  for (int64_t j = 0; j < n; ++j) {
    const double r = (x[j] - shift) - tau;
    out[j] = r > 0.0 ? std::exp(y * std::log(r > tiny ? r : tiny)) : 0.0;
  }
}

// out[j] = log p[j] for p[j] > 0, else 0.
// Sums over a row of r^(e-1) and r^e, r = ((x - shift) - tau)_+, and (when `out` is given) r^e into out:
// one fused pass (Newton's evaluations and the forward's final weights).
inline void power_sums(const float* x, int64_t n, float shift, float tau, float em1, float* out, double* s_em1,
                       double* f) {
  const float tiny = std::numeric_limits<float>::min();
  vi lane;
  for (int j = 0; j < LANES; ++j) lane[j] = j;
  vf s_acc = splat(0.0f), f_acc = splat(0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf r = (load(x + j0, len) - shift) - tau;
    const vi in = (r > splat(0.0f)) & (lane < static_cast<int32_t>(len));  // padded lanes of a tail: out
    const vf pw = select(in, exp2_clamped(em1 * log2_pos(select(r > splat(tiny), r, splat(tiny)))), splat(0.0f));
    const vf re = pw * select(in, r, splat(0.0f));
    s_acc += pw;
    f_acc += re;
    if (out != nullptr) store(out + j0, re, len);
  }
  double s = 0, fs = 0;
  for (int j = 0; j < LANES; ++j) {
    s += s_acc[j];
    fs += f_acc[j];
  }
  *s_em1 = s;
  *f = fs;
}

inline void power_sums(const double* x, int64_t n, double shift, double tau, double em1, double* out, double* s_em1,
                       double* f) {
  double s = 0, fs = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double r = (x[j] - shift) - tau;
    const double pw = r > 0.0 ? std::exp(em1 * std::log(r)) : 0.0;
    const double re = r > 0.0 ? pw * r : 0.0;
    s += pw;
    fs += re;
    if (out != nullptr) out[j] = re;
  }
  *s_em1 = s;
  *f = fs;
}

inline void logs(const float* p, int64_t n, float* out) {
  const float tiny = std::numeric_limits<float>::min();
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t len = n - j0 < LANES ? n - j0 : LANES;
    const vf v = load(p + j0, len);
    const vf lg = log2_pos(select(v > splat(tiny), v, splat(tiny))) * 0.693147181f;
    store(out + j0, select(v > splat(0.0f), lg, splat(0.0f)), len);
  }
}

inline void logs(const double* p, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] > 0.0 ? std::log(p[j]) : 0.0;
}

// A scalar power r^y (r > 0), for per-row quantities (float: the vector polynomials on one lane).
inline float pow_scalar(float r, float y) { return r > 0.0f ? exp2_clamped(splat(y) * log2_pos(splat(r)))[0] : 0.0f; }

inline double pow_scalar(double r, double y) { return r > 0.0 ? std::exp(y * std::log(r)) : 0.0; }

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

// Exact sparsemax threshold of y = x - shift.
template <typename T>
inline T sparsemax_tau(const T* __restrict x, int64_t n, T shift, T total) {
  T tau = -1;  // max y - 1 <= tau*
  const T mean_bound = (total - 1) / static_cast<T>(n);
  if (mean_bound > tau) tau = mean_bound;  // false for -inf
  for (int64_t it = 0; it < n + 2; ++it) {
    T cnt = 0, sum = 0, lo = inf<T>();
#pragma omp simd reduction(+ : cnt, sum) reduction(min : lo)
    for (int64_t j = 0; j < n; ++j) {
      const T y = x[j] - shift;
      const bool in = y > tau;
      cnt += in ? T(1) : T(0);
      sum += in ? y : T(0);
      lo = (in && y < lo) ? y : lo;
    }
    if (cnt == T(0)) break;  // an all -inf row
    const T next = (sum - 1) / cnt;  // >= tau (tau is a lower bound), <= tau*
    if (next < lo) return next > tau ? next : tau;  // the support reproduces itself: exact
    if (!(next > tau)) break;  // float rounding: no progress
    tau = next;
  }
  return tau;
}

// 1.5-entmax threshold of y = x - shift (x already scaled by alpha - 1 = 1/2); *exact = false when the
// closed form never reproduced its support (then the caller renormalises).
template <typename T>
inline T entmax15_tau(const T* __restrict x, int64_t n, T shift, T total, int max_iter, bool* exact) {
  T tau = -1;
  const T mean_bound = total / static_cast<T>(n) - T(1) / std::sqrt(static_cast<T>(n));
  if (mean_bound > tau) tau = mean_bound;
  *exact = false;
  for (int it = 0; it < max_iter; ++it) {
    T cnt = 0, s1 = 0, f = 0, lo = inf<T>(), hi_out = -inf<T>();
#pragma omp simd reduction(+ : cnt, s1, f) reduction(min : lo) reduction(max : hi_out)
    for (int64_t j = 0; j < n; ++j) {
      const T y = x[j] - shift;
      const T r = y - tau;
      const bool in = r > T(0);
      cnt += in ? T(1) : T(0);
      s1 += in ? r : T(0);
      f += in ? r * r : T(0);
      lo = (in && y < lo) ? y : lo;
      hi_out = (!in && y > hi_out) ? y : hi_out;
    }
    if (cnt == T(0)) {  // an all -inf row
      *exact = true;
      return tau;
    }
    const T mean = s1 / cnt;
    const T disc = (T(1) - f) / cnt + mean * mean;
    if (disc >= T(0)) {
      const T cf = tau + mean - std::sqrt(disc);
      if (cf < lo && hi_out <= cf) {
        *exact = true;
        return cf;
      }
    }
    const T big_f = std::sqrt(f);
    const T next = tau + (big_f - T(1)) * big_f / s1;
    if (!(next > tau)) return tau;
    tau = next;
  }
  return tau;
}

// alpha-entmax threshold of y = x - shift (x scaled by alpha - 1), e = 1 / (alpha - 1). Newton from
// the left: every iterate is a lower bound, so only the candidates y > tau can be in the support; on long
// rows (n > COMPACT) the iteration continues on those (`cand`, n entries of scratch).
constexpr int64_t COMPACT = 128;

template <typename T>
inline T entmax_tau(const T* __restrict x, int64_t n, T shift, T total, T e, T tol, int max_iter,
                    T* __restrict cand) {
  const T em1 = e - T(1);
  T tau = -1;
  const T mean_bound = total / static_cast<T>(n) - pow_scalar(static_cast<T>(n), -T(1) / e);
  if (mean_bound > tau) tau = mean_bound;
  const T* y = x;  // the entries iterated on, minus `base`
  T base = shift;
  int64_t k = n;
  for (int it = 0; it < max_iter; ++it) {
    double s_em1, f;
    power_sums(y, k, base, tau, em1, static_cast<T*>(nullptr), &s_em1, &f);
    if (f <= 0) break;  // an all -inf row
    const T big_f = pow_scalar(static_cast<T>(f), T(1) / e);
    const T next = tau + (big_f - T(1)) * static_cast<T>(f) / (big_f * static_cast<T>(s_em1));
    if (!(next > tau)) break;  // Newton from the left only moves right: a step back is float rounding
    tau = next;
    if (std::fabs(big_f - T(1)) <= tol) break;  // within tol: that last (quadratic) step without a check
    if (n > COMPACT) {  // keep the candidates above the new bound
      int64_t kept = 0;
      for (int64_t j = 0; j < k; ++j) {
        const T v = y[j] - base;
        cand[kept] = v;
        kept += v > tau ? 1 : 0;
      }
      y = cand;
      base = T(0);
      k = kept;
    }
  }
  return tau;
}

// The alpha search of GROUP short rows (n <= COMPACT) in lockstep: the rows are independent, so while
// one row's powers wait on the polynomial chains of its last pass, the out-of-order core works on the
// others (one row at a time, each pass waits for the previous pass's sums and was latency-bound: 2-3x
// slower on rows of 65).
constexpr int GROUP = 4;

template <typename T>
inline void entmax_tau_group(const T* const* rows, int count, int64_t n, const T* shift, const T* total,
                             const T* e, T tol, int max_iter, T* tau) {
  T em1[GROUP];
  bool live[GROUP];
  for (int r = 0; r < count; ++r) {
    em1[r] = e[r] - T(1);
    tau[r] = -1;
    const T mean_bound = total[r] / static_cast<T>(n) - pow_scalar(static_cast<T>(n), -T(1) / e[r]);
    if (mean_bound > tau[r]) tau[r] = mean_bound;
    live[r] = true;
  }
  for (int it = 0; it < max_iter; ++it) {
    double s_em1[GROUP], f[GROUP];
    for (int r = 0; r < count; ++r) {
      if (live[r]) power_sums(rows[r], n, shift[r], tau[r], em1[r], static_cast<T*>(nullptr), &s_em1[r], &f[r]);
    }
    bool any = false;
    for (int r = 0; r < count; ++r) {  // the same Newton step and stopping rules as entmax_tau
      if (!live[r]) continue;
      if (f[r] <= 0) {
        live[r] = false;
        continue;
      }
      const T fr = static_cast<T>(f[r]);
      const T big_f = pow_scalar(fr, T(1) / e[r]);
      const T next = tau[r] + (big_f - T(1)) * fr / (big_f * static_cast<T>(s_em1[r]));
      if (!(next > tau[r])) {
        live[r] = false;
        continue;
      }
      tau[r] = next;
      live[r] = !(std::fabs(big_f - T(1)) <= tol);
      any = any || live[r];
    }
    if (!any) break;
  }
}

// Sparsemax thresholds of GROUP short rows in lockstep (as entmax_tau_group; the same iteration as
// sparsemax_tau).
template <typename T>
inline void sparsemax_tau_group(const T* const* rows, int count, int64_t n, const T* shift, const T* total, T* tau) {
  bool live[GROUP];
  for (int r = 0; r < count; ++r) {
    tau[r] = -1;
    const T mean_bound = (total[r] - 1) / static_cast<T>(n);
    if (mean_bound > tau[r]) tau[r] = mean_bound;
    live[r] = true;
  }
  for (int64_t it = 0; it < n + 2; ++it) {
    T cnt[GROUP], sum[GROUP], lo[GROUP];
    for (int r = 0; r < count; ++r) {
      if (!live[r]) continue;
      const T* __restrict x = rows[r];
      const T sh = shift[r], t = tau[r];
      T c = 0, sm = 0, l = inf<T>();
#pragma omp simd reduction(+ : c, sm) reduction(min : l)
      for (int64_t j = 0; j < n; ++j) {
        const T y = x[j] - sh;
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
      if (cnt[r] == T(0)) continue;
      const T next = (sum[r] - 1) / cnt[r];
      if (next < lo[r]) {
        if (next > tau[r]) tau[r] = next;
        continue;
      }
      if (!(next > tau[r])) continue;
      tau[r] = next;
      live[r] = true;
      any = true;
    }
    if (!any) break;
  }
}

// The weights and the final threshold's normaliser of a general-alpha row (as the backward recomputes them).
template <typename T>
inline T entmax_weights(const T* __restrict xi, T* __restrict pi, int64_t n, T shift, T tau, T em1) {
  double s_em1, sum;
  power_sums(xi, n, shift, tau, em1, pi, &s_em1, &sum);
  const T norm = sum > 0 ? static_cast<T>(sum) : T(1);
  const T inv = T(1) / norm;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) pi[j] *= inv;
  return norm;
}

template <typename T>
int forward(const T* __restrict x, T* __restrict p, int64_t rows, int64_t n, int kind, const T* alpha_rows,
            double alpha_f, double tol, int max_iter, T* tau_out, T* shift_out, T* norm_out) {
  std::vector<T> cand(kind == SPARSEMAX ? 0 : n);
  // general-alpha short rows wait here and run in groups (entmax_tau_group)
  int64_t waiting[GROUP];
  T w_total[GROUP];
  int count = 0;
  auto flush = [&]() {
    const T* w_rows[GROUP];
    T w_shift[GROUP], w_e[GROUP], w_tau[GROUP];
    for (int r = 0; r < count; ++r) {
      const int64_t i = waiting[r];
      const T alpha = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
      w_rows[r] = x + i * n;
      w_shift[r] = shift_out[i];
      w_e[r] = T(1) / (alpha - T(1));
    }
    entmax_tau_group(w_rows, count, n, w_shift, w_total, w_e, static_cast<T>(tol), max_iter, w_tau);
    for (int r = 0; r < count; ++r) {
      const int64_t i = waiting[r];
      tau_out[i] = w_tau[r];
      norm_out[i] = entmax_weights(x + i * n, p + i * n, n, w_shift[r], w_tau[r], w_e[r] - T(1));
    }
    count = 0;
  };
  int64_t s_waiting[GROUP];
  T s_total[GROUP];
  int s_count = 0;
  auto s_flush = [&]() {
    const T* s_rows[GROUP];
    T s_shift[GROUP], s_tau[GROUP];
    for (int r = 0; r < s_count; ++r) {
      s_rows[r] = x + s_waiting[r] * n;
      s_shift[r] = shift_out[s_waiting[r]];
    }
    sparsemax_tau_group(s_rows, s_count, n, s_shift, s_total, s_tau);
    for (int r = 0; r < s_count; ++r) {
      const int64_t i = s_waiting[r];
      const T* __restrict xi = x + i * n;
      T* __restrict pi = p + i * n;
      const T sh = s_shift[r], t = s_tau[r];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T v = xi[j] - sh - t;
        pi[j] = v > T(0) ? v : T(0);
      }
      tau_out[i] = t;
      norm_out[i] = T(1);
    }
    s_count = 0;
  };
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict xi = x + i * n;
    T* __restrict pi = p + i * n;
    bool bad = false;
    T total;
    const T shift = row_stats(xi, n, &bad, &total);
    if (bad) return 1;
    shift_out[i] = shift;
    const T alpha = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
    T tau, norm = 1;
    if ((kind == SPARSEMAX || alpha == T(2)) && n <= COMPACT) {
      s_waiting[s_count] = i;
      s_total[s_count] = total;
      if (++s_count == GROUP) s_flush();
      continue;
    }
    if (kind == SPARSEMAX || alpha == T(2)) {
      tau = sparsemax_tau(xi, n, shift, total);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T r = xi[j] - shift - tau;
        pi[j] = r > T(0) ? r : T(0);
      }
    } else if (alpha == T(1.5) && alpha_rows == nullptr) {
      bool exact = true;
      tau = entmax15_tau(xi, n, shift, total, max_iter, &exact);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const T r = xi[j] - shift - tau;
        const T r2 = r > T(0) ? r * r : T(0);
        sum += r2;
        pi[j] = r2;
      }
      if (!exact && sum > T(0)) {
        norm = sum;
        const T inv = T(1) / norm;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pi[j] *= inv;
      }
    } else if (n <= COMPACT) {
      waiting[count] = i;
      w_total[count] = total;
      if (++count == GROUP) flush();
      continue;
    } else {
      const T e = T(1) / (alpha - T(1));
      tau = entmax_tau(xi, n, shift, total, e, static_cast<T>(tol), max_iter, cand.data());
      norm = entmax_weights(xi, pi, n, shift, tau, e - T(1));
    }
    tau_out[i] = tau;
    norm_out[i] = norm;
  }
  if (count > 0) flush();
  if (s_count > 0) s_flush();
  return 0;
}

// x: the block's scores (scaled by alpha - 1), overwritten with the weights p; g: d loss / d p;
// ds: d loss / d x (written); dalpha (nullable): d loss / d alpha per row (written).
template <typename T>
void backward(T* __restrict x, const T* __restrict g, T* __restrict ds, int64_t rows, int64_t n, int kind,
              const T* alpha_rows, double alpha_f, const T* tau_in, const T* shift_in, const T* norm_in,
              T* dalpha) {
  const T tiny = std::numeric_limits<T>::min();
  std::vector<T> lg(dalpha != nullptr ? n : 0);
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict xi = x + i * n;
    const T* __restrict gi = g + i * n;
    T* __restrict di = ds + i * n;
    const T shift = shift_in[i], tau = tau_in[i], norm = norm_in[i];
    const T alpha = alpha_rows != nullptr ? alpha_rows[i] : static_cast<T>(alpha_f);
    T s_gppr = 0, g_gppr = 0;
    if (kind == SPARSEMAX || alpha == T(2)) {  // gppr: the support indicator
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
    } else if (alpha == T(1.5) && alpha_rows == nullptr) {  // gppr = sqrt(p) = r / sqrt(norm)
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
      powers(xi, n, shift, tau, em1, di);  // r^(e - 1) into ds, scaled below
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
      logs(xi, n, lg.data());
      double g_p = 0, plogp = 0, g_plogp = 0;
#pragma omp simd reduction(+ : g_p, plogp, g_plogp)
      for (int64_t j = 0; j < n; ++j) {
        const double pj = xi[j];
        const double t = pj * static_cast<double>(lg[j]);
        g_p += gi[j] * pj;
        plogp += t;
        g_plogp += gi[j] * t;
      }
      const double am1 = static_cast<double>(alpha) - 1.0, qd = static_cast<double>(q);
      dalpha[i] = static_cast<T>((g_p - qd) / (am1 * am1) - (g_plogp - qd * plogp) / am1);
    }
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

int hop_abi_version() { return 1; }

}  // extern "C"
