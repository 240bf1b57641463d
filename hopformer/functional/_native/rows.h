// Row pieces both row sources share (separation.cpp: the row kernels; supports.cpp: the products on the
// supports): the powers of a row, its logarithms, which map a row takes, and one row of the backward.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vectors.h"

namespace hop {

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

// Which map a row takes: sparsemax (also alpha = 2 rows of a per-row alpha), the exact 1.5-entmax (a float
// alpha of 1.5), or the general alpha-entmax.

template <typename T>
inline Map row_map(int kind, T alpha, bool per_row_alpha) {
  if (kind == SPARSEMAX || alpha == T(2)) return Map::sparsemax;
  if (alpha == T(1.5) && !per_row_alpha) return Map::entmax15;
  return Map::general;
}

// One row of the backward: xi (n scores, scaled by alpha - 1) overwritten with the weights p; gi: d loss / d p;
// di: d loss / d x (written); dalpha (nullable): the row's d loss / d alpha (written); lg: scratch of n entries
// (when dalpha is given). The row may be any subset of a row's entries that holds its support (supports.cpp).
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

}  // namespace hop
