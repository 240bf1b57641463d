// Vector helpers shared by the sparse attention core's kernels (separation.cpp: rows; tiles.cpp: tiles of
// LANES rows): 16-lane float vectors with GCC/clang vector extensions, powers and logarithms by polynomials,
// lane sums, loads and stores of a chunk of up to LANES floats.

#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace hop {

constexpr int SPARSEMAX = 0, ENTMAX = 1;  // the kernels' `kind` (KINDS in __init__.py)

// The separation map of a row: sparsemax, the exact 1.5-entmax or the general alpha-entmax.
enum class Map { sparsemax, entmax15, general };

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

inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }  // a blend (the bitwise and/or form was 2x slower)

inline bool any(vi mask) {  // whether a lane of a comparison's mask is set
#if defined(__AVX512F__)
  __m512i m;
  __builtin_memcpy(&m, &mask, sizeof(m));
  return _mm512_test_epi32_mask(m, m) != 0;
#else
  int32_t acc = 0;
  for (int j = 0; j < LANES; ++j) acc |= mask[j];
  return acc != 0;
#endif
}

// log2 x = e + ln_m / ln 2 for positive normal floats: the exponent e (an integer, as a float) and ln m,
// m in [0.71, 1.41].
inline void log2_parts(vf x, vf* e_out, vf* ln_m_out) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 255) - 127;
  vf m = (vf)((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const vi high = m > splat(1.41421356f);
  m = select(high, m * 0.5f, m);  // [0.71, 1.41]
  e = e - high;  // high is -1 where true
  const vf t = (m - 1.0f) / (m + 1.0f), t2 = t * t;  // ln m = 2 atanh t, |t| <= 0.172
  *ln_m_out = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  *e_out = __builtin_convertvector(e, vf);
}

inline vf log2_pos(vf x) {  // x positive normal floats
  vf e, ln_m;
  log2_parts(x, &e, &ln_m);
  return e + ln_m * 1.44269504f;
}

// 2^n e^f for integer-valued n in [-126, 127] and |f| <= 0.35.
inline vf exp2_parts(vf fn, vf f) {
  const vf poly = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 +
                  f * (1.0f / 720 + f * (1.0f / 5040)))))));
  return poly * (vf)((__builtin_convertvector(fn, vi) + 127) << 23);
}

inline vf exp2_clamped(vf x) {  // 2^x for x in [-126, 127] (clamped)
  x = select(x < splat(-126.0f), splat(-126.0f), x);
  x = select(x > splat(127.0f), splat(127.0f), x);
  const vf fn = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  return exp2_parts(fn, (x - fn) * 0.693147181f);  // 2^(x - n) = e^f, |f| <= 0.347
}

// r^y per lane for r > 0 (r clamped to the smallest normal number), 0 for r <= 0: the one power of every kernel.
// `log2_r` (when given): log2 of the clamped r, the power's own logarithm (d/dalpha's log p without a log of its own).
#if defined(__FMA__)
inline vf pow_pos(vf r, vf y, vf* log2_r = nullptr) {
  const vf tiny = splat(std::numeric_limits<float>::min());
  const vf l2 = log2_pos(select(r > tiny, r, tiny));
  if (log2_r != nullptr) *log2_r = l2;
  return select(r > splat(0.0f), exp2_clamped(y * l2), splat(0.0f));
}
#else
// Without fused multiply-adds, the float exponent y log2 r took two roundings more, which large y amplify: at
// alpha = 1.02 (y = 49) float32 rows lost twice the accuracy of torch.pow. So y (e + ln m / ln 2) is formed and
// split into 2^n e^f in double there (the vector polynomials stay in float).
inline vf pow_pos(vf r, vf y, vf* log2_r = nullptr) {
  typedef double vd16_t __attribute__((vector_size(16 * sizeof(double))));
  const vf tiny = splat(std::numeric_limits<float>::min());
  vf e, ln_m;
  log2_parts(select(r > tiny, r, tiny), &e, &ln_m);
  if (log2_r != nullptr) *log2_r = e + ln_m * 1.44269504f;
  const vd16_t yd = __builtin_convertvector(y, vd16_t);
  vd16_t x = yd * __builtin_convertvector(e, vd16_t) + yd * (__builtin_convertvector(ln_m, vd16_t) * 1.4426950408889634);
  x = x < -126.0 ? vd16_t{} - 126.0 : x;
  x = x > 127.0 ? vd16_t{} + 127.0 : x;
  const vd16_t fn = (x + 6755399441055744.0) - 6755399441055744.0;  // round to nearest (1.5 * 2^52)
  const vf f = __builtin_convertvector((x - fn) * 0.6931471805599453, vf);
  return select(r > splat(0.0f), exp2_parts(__builtin_convertvector(fn, vf), f), splat(0.0f));
}
#endif

inline vf pow_pos(vf r, float y) { return pow_pos(r, splat(y)); }

inline double pow_pos(double r, double y, double* log2_r = nullptr) {  // log2_r: as the float one's, for r > 0
  if (!(r > 0.0)) return 0.0;
  const double ln_r = std::log(r > std::numeric_limits<double>::min() ? r : std::numeric_limits<double>::min());
  if (log2_r != nullptr) *log2_r = ln_r * 1.4426950408889634;
  return std::exp(y * ln_r);
}

inline float pow_scalar(float r, float y) { return pow_pos(splat(r), y)[0]; }  // per-row quantities

inline double pow_scalar(double r, double y) { return pow_pos(r, y); }

// The sum of a vector's lanes, in double, as a tree (a serial sum of 16 lanes was a long dependency chain).
#if defined(__clang__) || __GNUC__ >= 12
typedef double vd __attribute__((vector_size(64)));

inline double lane_sum(vf v) {
  const vd c = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), vd) +
               __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), vd);
  return ((c[0] + c[4]) + (c[1] + c[5])) + ((c[2] + c[6]) + (c[3] + c[7]));
}
#else
inline double lane_sum(vf v) {
  double h[8];
  for (int j = 0; j < 8; ++j) h[j] = static_cast<double>(v[j]) + static_cast<double>(v[j + 8]);
  return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
}
#endif

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

}  // namespace hop
