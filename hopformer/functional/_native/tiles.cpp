// Tile kernels of the sparse attention core: short rows, LANES rows at a time, one row per vector lane.
//
// A block of scores arrives transposed, xt (G, m, n): entry j (a key) of row i (a query) of group g at
// xt[(g m + j) n + i], as the matmul k q^T writes it. LANES consecutive rows of a group are one tile: every
// pass over the rows is m vector operations with no horizontal sum, and the threshold searches of the
// tile's rows run in lockstep (a lane whose search has ended keeps its threshold while the others go on).
// On rows of 65 scores, the row kernels' passes were short (four vectors and a one-entry tail, then a
// horizontal sum and a division whose result the next pass waits for); here they are long and independent.
// The maps, searches and formulas are those of separation.cpp (same papers), per lane:
//   sparsemax (Martins & Astudillo 2016): Michelot's support iteration from the mean bound;
//   1.5-entmax (Peters et al. 2019, Alg. 2): Newton from the left with the support's closed form;
//   alpha-entmax (Peters et al. 2019; per-row alpha, Correia et al. 2019): Newton from the left on
//   ||(y - tau)_+||_e = 1.
// The searches' sums run in T, one lane's over the whole row (the row kernels' over 16 lanes each), so the
// weights of both entmax maps are renormalised by a sum taken in double (float32 rows as close to the
// float64 result as the row kernels'). A tile whose rows have a tensor alpha takes the general map on every
// lane (alpha = 2 is sparsemax there: r^0 = 1 on the support). Backward: eq. 10 of Peters et al. 2019 and,
// for alpha, Correia et al. 2019, eq. 12-14, from the saved (shift, tau, norm), as in separation.cpp (the
// attention core takes it for a general alpha; sparsemax and 1.5-entmax rows go back to the row backward), or
// from the weights themselves when the forward kept them (any map).

#include <vector>

#include "vectors.h"

namespace {

using namespace hop;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(LANES * sizeof(T))));
};
template <typename T>
using V = typename Vec<T>::type;
template <typename T>
struct VecU {  // the same vector at any address of a T (unaligned loads and stores)
  typedef T type __attribute__((vector_size(LANES * sizeof(T)), aligned(sizeof(T))));
};
typedef double vd16 __attribute__((vector_size(LANES * sizeof(double))));

constexpr int U = 4;  // independent accumulators per pass (the adds' latency, not their count, bounds a pass)

template <typename T>
inline V<T> vs(T v) {
  return V<T>{} + v;
}

template <typename T, typename M>
inline V<T> pick(M mask, V<T> a, V<T> b) {
  return mask ? a : b;
}

template <typename M>
inline bool any_lane(M mask) {
  bool r = false;
  for (int l = 0; l < LANES; ++l) r |= mask[l] != 0;
  return r;
}

inline V<float> vabs(V<float> v) { return (V<float>)((vi)v & 0x7fffffff); }

inline V<double> vabs(V<double> v) {
  typedef int64_t vl __attribute__((vector_size(LANES * sizeof(double))));
  return (V<double>)((vl)v & 0x7fffffffffffffffLL);
}

template <typename T>
inline V<T> vmin(V<T> a, V<T> b) {
  return a < b ? a : b;
}

template <typename T>
inline V<T> vmax(V<T> a, V<T> b) {
  return a > b ? a : b;
}

inline V<float> vsqrt(V<float> v) {
#if defined(__AVX512F__)
  return (V<float>)_mm512_sqrt_ps((__m512)v);
#else
  for (int l = 0; l < LANES; ++l) v[l] = std::sqrt(v[l]);
  return v;
#endif
}

inline V<double> vsqrt(V<double> v) {
  for (int l = 0; l < LANES; ++l) v[l] = std::sqrt(v[l]);
  return v;
}

// r^y per lane for r > 0, 0 for r <= 0 (float: the polynomial power of vectors.h; double: libm), and its log2 r
// into `log2_r` when asked (used on the support).
inline V<float> vpow(V<float> r, V<float> y, V<float>* log2_r = nullptr) { return pow_pos(r, y, log2_r); }

inline V<double> vpow(V<double> r, V<double> y, V<double>* log2_r = nullptr) {
  V<double> out;
  for (int l = 0; l < LANES; ++l) {
    double l2 = 0.0;
    out[l] = pow_pos(r[l], y[l], &l2);
    if (log2_r != nullptr) (*log2_r)[l] = l2;
  }
  return out;
}

// log p per lane for p > 0, else 0.
inline V<float> vlog(V<float> p) {
  const vf tiny = splat(std::numeric_limits<float>::min());
  return select(p > splat(0.0f), log2_pos(select(p > tiny, p, tiny)) * 0.693147181f, splat(0.0f));
}

inline V<double> vlog(V<double> p) {
  V<double> out;
  for (int l = 0; l < LANES; ++l) out[l] = p[l] > 0.0 ? std::log(p[l]) : 0.0;
  return out;
}

template <typename T>
inline vd16 to_double(V<T> v) {
  return __builtin_convertvector(v, vd16);
}

template <typename T>
inline V<T> load_lanes(const T* x, int w) {  // w < LANES: the other lanes 0
  if (w == LANES) return *reinterpret_cast<const typename VecU<T>::type*>(x);
  V<T> v = vs<T>(T(0));
  for (int l = 0; l < w; ++l) v[l] = x[l];
  return v;
}

template <typename T>
inline void store_lanes(T* out, V<T> v, int w) {
  if (w == LANES) {
    *reinterpret_cast<typename VecU<T>::type*>(out) = v;
  } else {
    for (int l = 0; l < w; ++l) out[l] = v[l];
  }
}

#if defined(__AVX512F__)
template <>
inline V<float> load_lanes<float>(const float* x, int w) {  // a tail: one masked load
  return (V<float>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << w) - 1u), x);
}

template <>
inline void store_lanes<float>(float* out, V<float> v, int w) {
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>(w == LANES ? 0xffffu : (1u << w) - 1u), (__m512)v);
}
#endif

// The map of a call's tiles: a tensor alpha takes the general map on every lane.
template <typename T>
Map tile_map(int kind, const T* alpha_rows, double alpha_f) {
  if (kind == SPARSEMAX || (alpha_rows == nullptr && alpha_f == 2.0)) return Map::sparsemax;
  return alpha_rows == nullptr && alpha_f == 1.5 ? Map::entmax15 : Map::general;
}

// ---------------------------------------------------------------- threshold searches on a tile
// Every search starts from the larger of its mean bound and max y - 1 = -1; a mean bound that is -inf (a row
// with -inf) or NaN (its sum overflowed on the way) leaves -1.
template <typename T>
inline V<T> start_tau(V<T> mean_bound) {
  return pick<T>(mean_bound > T(-1), mean_bound, vs<T>(T(-1)));
}

// tile[j] (j < mp, a multiple of U; entries from m on are -inf) holds entry j of the tile's rows; y = tile - shift.

template <typename T>
V<T> sparsemax_tau(const V<T>* tile, int64_t m, int64_t mp, V<T> shift, V<T> total) {
  V<T> tau = start_tau<T>((total - T(1)) / static_cast<T>(m));
  auto live = tau == tau;
  for (int64_t it = 0; it < m + 2; ++it) {
    V<T> cnt[U], sum[U], lo[U];
    for (int u = 0; u < U; ++u) cnt[u] = sum[u] = vs<T>(T(0)), lo[u] = vs<T>(inf<T>());
    for (int64_t j = 0; j < mp; j += U) {
      for (int u = 0; u < U; ++u) {
        const V<T> y = tile[j + u] - shift;
        const auto in = y > tau;  // the updates below are masked adds and a masked min
        cnt[u] = pick<T>(in, cnt[u] + T(1), cnt[u]);
        sum[u] = pick<T>(in, sum[u] + y, sum[u]);
        lo[u] = pick<T>(in, vmin<T>(lo[u], y), lo[u]);
      }
    }
    const V<T> c = (cnt[0] + cnt[1]) + (cnt[2] + cnt[3]), s = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    const V<T> l = vmin<T>(vmin<T>(lo[0], lo[1]), vmin<T>(lo[2], lo[3]));
    const auto empty = c == T(0);  // an all -inf row
    const V<T> next = (s - T(1)) / pick<T>(empty, vs<T>(T(1)), c);  // >= tau (a lower bound), <= tau*
    const auto exact = next < l;  // the support reproduces itself
    const auto step = live & ~empty & (next > tau);  // no progress: float rounding
    tau = pick<T>(step, next, tau);
    live = step & ~exact;
    if (!any_lane(live)) break;
  }
  return tau;
}

template <typename T>
V<T> entmax15_tau(const V<T>* tile, int64_t m, int64_t mp, V<T> shift, V<T> total, int max_iter) {
  const T nm = static_cast<T>(m);
  V<T> tau = start_tau<T>(total / nm - T(1) / std::sqrt(nm));
  auto live = tau == tau;
  for (int it = 0; it < max_iter; ++it) {
    V<T> cnt[U], s1[U], f[U], lo[U], hi[U];
    for (int u = 0; u < U; ++u) {
      cnt[u] = s1[u] = f[u] = vs<T>(T(0));
      lo[u] = vs<T>(inf<T>());
      hi[u] = vs<T>(-inf<T>());
    }
    for (int64_t j = 0; j < mp; j += U) {
      for (int u = 0; u < U; ++u) {
        const V<T> y = tile[j + u] - shift;
        const V<T> r = y - tau;
        const auto in = r > T(0);
        cnt[u] = pick<T>(in, cnt[u] + T(1), cnt[u]);
        s1[u] = pick<T>(in, s1[u] + r, s1[u]);
        f[u] = pick<T>(in, f[u] + r * r, f[u]);
        lo[u] = pick<T>(in, vmin<T>(lo[u], y), lo[u]);
        hi[u] = pick<T>(in, hi[u], vmax<T>(hi[u], y));
      }
    }
    const V<T> c = (cnt[0] + cnt[1]) + (cnt[2] + cnt[3]), a = (s1[0] + s1[1]) + (s1[2] + s1[3]);
    const V<T> b = (f[0] + f[1]) + (f[2] + f[3]);
    const V<T> l = vmin<T>(vmin<T>(lo[0], lo[1]), vmin<T>(lo[2], lo[3]));
    const V<T> h = vmax<T>(vmax<T>(hi[0], hi[1]), vmax<T>(hi[2], hi[3]));
    const auto empty = c == T(0);
    const V<T> cs = pick<T>(empty, vs<T>(T(1)), c);
    const V<T> mean = a / cs;
    const V<T> disc = (T(1) - b) / cs + mean * mean;
    const V<T> cf = tau + mean - vsqrt(vmax<T>(disc, vs<T>(T(0))));
    const auto closed = live & ~empty & (disc >= T(0)) & (cf < l) & (h <= cf);
    tau = pick<T>(closed, cf, tau);
    const V<T> big_f = vsqrt(b);
    const V<T> next = tau + (big_f - T(1)) * big_f / pick<T>(empty, vs<T>(T(1)), a);
    const auto step = live & ~empty & ~closed & (next > tau);
    tau = pick<T>(step, next, tau);
    live = step;
    if (!any_lane(live)) break;
  }
  return tau;
}

template <typename T>
V<T> entmax_tau(const V<T>* tile, int64_t m, int64_t mp, V<T> shift, V<T> total, V<T> e, T tol, int max_iter) {
  const V<T> em1 = e - T(1), inv_e = T(1) / e;
  V<T> tau = start_tau<T>(total / static_cast<T>(m) - vpow(vs<T>(static_cast<T>(m)), -inv_e));
  auto live = tau == tau;
  for (int it = 0; it < max_iter; ++it) {
    V<T> s_em1[U], f[U];
    for (int u = 0; u < U; ++u) s_em1[u] = f[u] = vs<T>(T(0));
    for (int64_t j = 0; j < mp; j += U) {
      for (int u = 0; u < U; ++u) {
        const V<T> r = (tile[j + u] - shift) - tau;
        const V<T> pw = vpow(r, em1);  // 0 off the support
        s_em1[u] += pw;
        f[u] += pw * pick<T>(r > T(0), r, vs<T>(T(0)));
      }
    }
    const V<T> s = (s_em1[0] + s_em1[1]) + (s_em1[2] + s_em1[3]), fr = (f[0] + f[1]) + (f[2] + f[3]);
    const auto empty = ~(fr > T(0));  // an all -inf row
    const V<T> fs = pick<T>(empty, vs<T>(T(1)), fr);
    const V<T> big_f = vpow(fs, inv_e);
    const V<T> next = tau + (big_f - T(1)) * fs / (big_f * pick<T>(empty, vs<T>(T(1)), s));
    const auto step = live & ~empty & (next > tau);  // from the left only rightwards: a step back is rounding
    tau = pick<T>(step, next, tau);
    const V<T> dev = big_f - T(1);
    const auto within = pick<T>(dev < T(0), -dev, dev) <= tol;  // that last (quadratic) step: no check after it
    live = step & ~within;
    if (!any_lane(live)) break;
  }
  return tau;
}

// ---------------------------------------------------------------- the tiles of a block
// Where a tile's rows live in a (G, m, n) block: entry j of lane l at base[start + l + j * n] (a group's own
// tiles: one contiguous load per entry) or base[idx[l] + j * n] (gathered). The rows past a group's last full
// tile (n % LANES of them) are gathered across groups into tiles of their own, so a group of 65 rows costs four
// tiles and a sixteenth, not five (its one-row tail took a whole tile's passes: 13-15% of the forward on the
// ViT blocks).
template <typename T, bool gathered>
struct Lanes {
  int64_t n;
  int w;  // lanes in use
  int64_t start;  // own tiles: lane l's entry 0 at base + start + l
  int64_t row[LANES];  // the row (g n + i) of each lane in use
  vi idx;  // gathered tiles: lane l's entry 0 at base + idx[l] (blocks of fewer than 2^31 scores)

  V<T> load(const T* base, int64_t j) const {
    if (!gathered) return load_lanes(base + start + j * n, w);
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == sizeof(float)) {
      return (V<T>)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), lane_mask(), to_m512i(idx), base + j * n, 4);
    }
#endif
    V<T> v = vs<T>(T(0));
    for (int l = 0; l < w; ++l) v[l] = base[idx[l] + j * n];
    return v;
  }

  void store(T* base, int64_t j, V<T> v) const {
    if (!gathered) return store_lanes(base + start + j * n, v, w);
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == sizeof(float)) {
      return _mm512_mask_i32scatter_ps(base + j * n, lane_mask(), to_m512i(idx), (__m512)v, 4);
    }
#endif
    for (int l = 0; l < w; ++l) base[idx[l] + j * n] = v[l];
  }

  // a per-row value of each lane (alpha, tau, ...); lanes past w repeat lane 0's (or `fill` without values)
  V<T> per_row(const T* values, T fill) const {
    V<T> a = vs<T>(fill);
    if (values != nullptr) {
      for (int l = 0; l < LANES; ++l) a[l] = values[row[l < w ? l : 0]];
    }
    return a;
  }

#if defined(__AVX512F__)
  __mmask16 lane_mask() const { return static_cast<__mmask16>((1u << w) - 1u); }
  static __m512i to_m512i(vi v) {
    __m512i r;
    __builtin_memcpy(&r, &v, sizeof(r));
    return r;
  }
#endif
};

// Calls tile(lanes) for every tile of a (G, m, n) block: each group's own tiles, then (when `gather`) the
// groups' remaining rows gathered. Gathered rows cost about 1.6x contiguous ones on the sparsemax and 1.5-entmax
// searches (a gather per entry against a load), so callers gather those maps' tails only up to half a tile; the
// general map's powers outweigh that. Stops at the first non-zero return (and returns it).
template <typename T, typename F>
int for_each_tile(int64_t groups, int64_t m, int64_t n, bool gather, F tile) {
  gather = gather && groups * m * n < (int64_t(1) << 31);  // 32-bit gather indices
  const int64_t own = gather ? n / LANES * LANES : n;  // rows in each group's own tiles
  Lanes<T, false> tiles{n, LANES, 0, {}, vi{}};
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i0 = 0; i0 < own; i0 += LANES) {
      tiles.w = static_cast<int>(own - i0 < LANES ? own - i0 : LANES);
      tiles.start = g * m * n + i0;
      for (int l = 0; l < tiles.w; ++l) tiles.row[l] = g * n + i0 + l;
      if (const int status = tile(tiles)) return status;
    }
  }
  Lanes<T, true> rest{n, 0, 0, {}, vi{}};
  for (int64_t g = 0; g < groups && own < n; ++g) {
    for (int64_t i = own; i < n; ++i) {
      rest.row[rest.w] = g * n + i;
      rest.idx[rest.w++] = static_cast<int32_t>(g * m * n + i);
      if (rest.w == LANES || (g == groups - 1 && i == n - 1)) {
        if (const int status = tile(rest)) return status;
        rest.w = 0;
      }
    }
  }
  return 0;
}

// Whether a block's tails are gathered (see for_each_tile).
inline bool gather_tails(Map map, int64_t n) { return map == Map::general || n % LANES <= LANES / 2; }

// ---------------------------------------------------------------- forward

// One tile's rows: the thresholds, maxima and normalisers per lane, the weights written over the scores.
// Returns 1 on NaN / +inf in a row.
template <typename T, bool G>
int forward_tile(const Lanes<T, G>& rows, T* xt, V<T>* tile, int64_t m, int64_t mp, Map map, const T* alpha_rows,
                 double alpha_f, double tol, int max_iter, T* tau_out, T* shift_out, T* norm_out) {
  // statistics (and the copy into the tile): maximum, sum, NaN / +inf
  V<T> mx = vs<T>(-inf<T>()), sum = vs<T>(T(0)), abs_sum = vs<T>(T(0)), nan = vs<T>(T(0));
  for (int64_t j = 0; j < m; ++j) {
    const V<T> v = rows.load(xt, j);
    tile[j] = v;
    mx = vmax<T>(mx, v);
    sum += v;
    abs_sum += vabs(v);
    nan = pick<T>(v != v, vs<T>(T(1)), nan);
  }
  if (any_lane((nan != T(0)) | (mx == inf<T>()))) return 1;  // NaN or +inf in a row
  for (int64_t j = m; j < mp; ++j) tile[j] = vs<T>(-inf<T>());
  const V<T> shift = pick<T>(mx == -inf<T>(), vs<T>(T(0)), mx);
  const T nt = static_cast<T>(m);
  const V<T> total = (sum - nt * shift) - 4 * std::numeric_limits<T>::epsilon() * (abs_sum + nt * vabs(shift));
  const V<T> e = T(1) / (rows.per_row(alpha_rows, static_cast<T>(alpha_f)) - T(1));
  V<T> tau, norm = vs<T>(T(1));
  if (map == Map::sparsemax) tau = sparsemax_tau<T>(tile, m, mp, shift, total);
  if (map == Map::entmax15) tau = entmax15_tau<T>(tile, m, mp, shift, total, max_iter);
  if (map == Map::general) tau = entmax_tau<T>(tile, m, mp, shift, total, e, static_cast<T>(tol), max_iter);
  if (map == Map::sparsemax) {  // normalised already
    for (int64_t j = 0; j < m; ++j) {
      const V<T> r = (tile[j] - shift) - tau;
      rows.store(xt, j, pick<T>(r > T(0), r, vs<T>(T(0))));
    }
  } else {
    // the weights (before normalisation) into the tile, their sum per row (in double, as the row kernels' lane
    // sums: the renormalisation's accuracy)
    vd16 norm_sum = vd16{} + 0.0;
    for (int64_t j = 0; j < m; ++j) {
      const V<T> r = (tile[j] - shift) - tau;
      const V<T> rp = pick<T>(r > T(0), r, vs<T>(T(0)));
      const V<T> p = map == Map::entmax15 ? rp * rp : vpow(r, e - T(1)) * rp;
      tile[j] = p;
      norm_sum += to_double<T>(p);
    }
    norm = __builtin_convertvector(norm_sum, V<T>);
    const auto scaled = norm > T(0);  // else (an all -inf row) norm 1
    const V<T> inv = pick<T>(scaled, T(1) / pick<T>(scaled, norm, vs<T>(T(1))), vs<T>(T(1)));
    for (int64_t j = 0; j < m; ++j) rows.store(xt, j, tile[j] * inv);
    norm = pick<T>(scaled, norm, vs<T>(T(1)));
  }
  for (int l = 0; l < rows.w; ++l) {
    tau_out[rows.row[l]] = tau[l];
    shift_out[rows.row[l]] = shift[l];
    norm_out[rows.row[l]] = norm[l];
  }
  return 0;
}

template <typename T>
int forward_tiles(T* xt, int64_t groups, int64_t m, int64_t n, int kind, const T* alpha_rows, double alpha_f,
                  double tol, int max_iter, T* tau_out, T* shift_out, T* norm_out) {
  const int64_t mp = (m + U - 1) / U * U;
  std::vector<V<T>> tile(mp);
  const Map map = tile_map(kind, alpha_rows, alpha_f);
  return for_each_tile<T>(groups, m, n, gather_tails(map, n), [&](const auto& rows) {
    return forward_tile(rows, xt, tile.data(), m, mp, map, alpha_rows, alpha_f, tol, max_iter, tau_out, shift_out,
                        norm_out);
  });
}

// ---------------------------------------------------------------- backward
// From the scores: the alpha-entmax backward for every lane, whatever map its forward took: gppr = p^(2 - alpha) =
// r^(e - 1) norm^(alpha - 2) is the support indicator at alpha = 2 and sqrt(p) at 1.5, so one formula serves
// (the attention core calls this for a general alpha; sparsemax and 1.5-entmax rows take the row backward).
// From the weights (tau == nullptr: the forward kept them in xt, for any map): gppr from p by the map.
// xt: the scores (as the forward saw them), overwritten with the weights, or the weights; gt: d loss / d p;
// dst: d loss / d x (written); dalpha (nullable): d loss / d alpha per row (written). All (G, m, n), transposed like
// the forward.

// One tile's rows (lanes) of the blocks x, gg, d; returns d loss / d alpha per lane when asked (else 0). Sums in
// double, as the row kernels': (alpha - 1)^-2 amplifies their rounding. `given`: x holds the weights already (the
// forward kept them) and gppr is taken from them by the lanes' map (shift, tau, norm unused); else x holds the
// scores and is overwritten with the weights. `lnp` (m vectors when d/dalpha is asked, else null): scratch for
// log p, taken from the powers' own log2 (no log of its own), where the lanes take powers.
template <typename T, bool G>
V<T> backward_tile(const Lanes<T, G>& rows, T* __restrict x, const T* __restrict gg, T* __restrict d, V<T>* lnp,
                   int64_t m, Map map, bool given, V<T> shift, V<T> tau, V<T> norm, V<T> alpha, bool need_alpha) {
  const T ln2 = T(0.6931471805599453);
  V<T> l2;
  bool logged = false;  // lnp holds log p
  vd16 s_gppr = vd16{} + 0.0, g_gppr = vd16{} + 0.0;
  auto add = [&](int64_t j, V<T> gp) {  // gppr of entry j into d, and into the sums
    rows.store(d, j, gp);
    s_gppr += to_double<T>(gp);
    g_gppr += to_double<T>(gp) * to_double<T>(rows.load(gg, j));
  };
  if (given && map == Map::sparsemax) {  // gppr: the support indicator
    for (int64_t j = 0; j < m; ++j) add(j, pick<T>(rows.load(x, j) > T(0), vs<T>(T(1)), vs<T>(T(0))));
  } else if (given && map == Map::entmax15) {  // gppr = sqrt(p)
    for (int64_t j = 0; j < m; ++j) add(j, vsqrt(rows.load(x, j)));
  } else if (given) {  // gppr = p^(2 - alpha) on the support; log p = ln 2 log2 p
    const V<T> y = T(2) - alpha;
    logged = lnp != nullptr;
    for (int64_t j = 0; j < m; ++j) {
      const V<T> p = rows.load(x, j);
      const auto in = p > T(0);
      add(j, vpow(p, y, logged ? &l2 : nullptr));  // 0 off the support
      if (logged) lnp[j] = pick<T>(in, ln2 * l2, vs<T>(T(0)));
    }
  } else {  // the weights into x; gppr = r^(e - 1) norm^(alpha - 2), whatever map the forward took;
    // log p = e ln r - ln norm
    const V<T> inv_norm = T(1) / norm, em1 = T(1) / (alpha - T(1)) - T(1), scale = vpow(norm, alpha - T(2));
    logged = lnp != nullptr;
    const V<T> e_ln2 = ln2 * (em1 + T(1)), ln_norm = logged ? vlog(norm) : vs<T>(T(0));
    for (int64_t j = 0; j < m; ++j) {
      const V<T> r = (rows.load(x, j) - shift) - tau;
      const V<T> r_em1 = vpow(r, em1, logged ? &l2 : nullptr);
      rows.store(x, j, pick<T>(r > T(0), r, vs<T>(T(0))) * r_em1 * inv_norm);
      add(j, r_em1 * scale);
      if (logged) lnp[j] = pick<T>(r > T(0), e_ln2 * l2 - ln_norm, vs<T>(T(0)));
    }
  }
  const vd16 tiny = vd16{} + static_cast<double>(std::numeric_limits<T>::min());
  const V<T> q = __builtin_convertvector(g_gppr / (s_gppr > tiny ? s_gppr : tiny), V<T>);
  for (int64_t j = 0; j < m; ++j) rows.store(d, j, rows.load(d, j) * (rows.load(gg, j) - q));
  if (!need_alpha) return vs<T>(T(0));
  // Correia et al. 2019, eq. 12-14 (see separation.cpp)
  vd16 g_p = vd16{} + 0.0, plogp = vd16{} + 0.0, g_plogp = vd16{} + 0.0;
  for (int64_t j = 0; j < m; ++j) {
    const V<T> pv = rows.load(x, j);
    const vd16 pd = to_double<T>(pv), gd = to_double<T>(rows.load(gg, j));
    const vd16 t = pd * to_double<T>(logged ? lnp[j] : vlog(pv));
    g_p += gd * pd;
    plogp += t;
    g_plogp += gd * t;
  }
  const vd16 am1 = to_double<T>(alpha) - 1.0, qd = to_double<T>(q);
  return __builtin_convertvector((g_p - qd) / (am1 * am1) - (g_plogp - qd * plogp) / am1, V<T>);
}

template <typename T>
void backward_tiles(T* xt, const T* gt, T* dst, int64_t groups, int64_t m, int64_t n, int kind, const T* alpha_rows,
                    double alpha_f, const T* tau_in, const T* shift_in, const T* norm_in, T* dalpha) {
  const bool given = tau_in == nullptr;  // xt holds the weights (see backward_tile)
  const Map map = given ? tile_map(kind, alpha_rows, alpha_f) : tile_map(ENTMAX, alpha_rows, alpha_f);
  std::vector<V<T>> lnp(dalpha != nullptr ? m : 0);  // see backward_tile
  for_each_tile<T>(groups, m, n, gather_tails(map, n), [&](const auto& rows) {
    const V<T> norm = rows.per_row(norm_in, T(1));
    const V<T> safe_norm = pick<T>(norm > T(0), norm, vs<T>(T(1)));
    const V<T> da = backward_tile(rows, xt, gt, dst, lnp.empty() ? nullptr : lnp.data(), m, map, given,
                                  rows.per_row(shift_in, T(0)), rows.per_row(tau_in, T(0)), safe_norm,
                                  rows.per_row(alpha_rows, static_cast<T>(alpha_f)), dalpha != nullptr);
    if (dalpha != nullptr) {
      for (int l = 0; l < rows.w; ++l) dalpha[rows.row[l]] = da[l];
    }
    return 0;
  });
}

}  // namespace

extern "C" {

int hop_forward_tiles_f32(float* xt, int64_t groups, int64_t m, int64_t n, int kind, const float* alpha_rows,
                          double alpha_f, double tol, int max_iter, float* tau, float* shift, float* norm) {
  return forward_tiles<float>(xt, groups, m, n, kind, alpha_rows, alpha_f, tol, max_iter, tau, shift, norm);
}

int hop_forward_tiles_f64(double* xt, int64_t groups, int64_t m, int64_t n, int kind, const double* alpha_rows,
                          double alpha_f, double tol, int max_iter, double* tau, double* shift, double* norm) {
  return forward_tiles<double>(xt, groups, m, n, kind, alpha_rows, alpha_f, tol, max_iter, tau, shift, norm);
}

int hop_backward_tiles_f32(float* xt, const float* gt, float* dst, int64_t groups, int64_t m, int64_t n, int kind,
                           const float* alpha_rows, double alpha_f, const float* tau, const float* shift,
                           const float* norm, float* dalpha) {
  backward_tiles<float>(xt, gt, dst, groups, m, n, kind, alpha_rows, alpha_f, tau, shift, norm, dalpha);
  return 0;
}

int hop_backward_tiles_f64(double* xt, const double* gt, double* dst, int64_t groups, int64_t m, int64_t n, int kind,
                           const double* alpha_rows, double alpha_f, const double* tau, const double* shift,
                           const double* norm, double* dalpha) {
  backward_tiles<double>(xt, gt, dst, groups, m, n, kind, alpha_rows, alpha_f, tau, shift, norm, dalpha);
  return 0;
}

}  // extern "C"
