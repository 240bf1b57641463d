// Products of the sparse attention core on the supports of long rows (the read-out p v and the backward's
// g v^T, ds k, ds^T q, p^T g summed over each row's nonzero weights instead of dense matmuls), for blocks whose
// supports are small. Built and loaded with separation.cpp (see `hopformer/functional/_native/__init__.py`).

#include <memory>
#include <type_traits>
#include <vector>

#include "rows.h"
#include "vectors.h"

namespace {

using namespace hop;

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
// are read at run time (W = 0). by_width(w, f) calls f(std::integral_constant<int, W>) for the width w.
template <typename F>
inline void by_width(int64_t w, F&& f) {
  switch (w) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

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
  by_width(dv, [&](auto w) { readout_rows<T, decltype(w)::value>(sup, v, out, groups, rows, m, dv, out_stride); });
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
  by_width(d == dv ? d : 0, [&](auto w) {  // one width for both products, else read at run time
    backward_rows<T, decltype(w)::value>(sup, go, q, k, v, dq, dk, dv_out, b, kind, alpha_rows, alpha_f, tau_in,
                                         shift_in, norm_in, dalpha, grad_scale);
  });
  return 0;
}

}  // namespace

extern "C" {

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

}  // extern "C"
