// Paged decode attention on CPU. A work item is a sequence and a range of its KV heads (all of them
// when there are enough sequences to share out); it reads the cached K/V rows straight from the
// block pool (no gather copy), W tokens at a time (W = floats per SIMD register):
//   1. convert W K rows of every KV head in the range to fp32 tiles (one pass over each cache row,
//      whose heads sit side by side); scores for the G = num_heads / num_kv_heads query heads that
//      share each KV head (a tile is converted once and used G times);
//   2. softmax per head over the whole sequence (scores stay in a small per-thread buffer);
//   3. the same tiles of V; accumulate p * v per head; scale by 1 / sum and round.
// SIMD: see cpu_simd.h.
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speedx {
namespace {

using namespace simd;

// Rows are converted to fp32 in a layout private to this file: bf16 rows go in groups of 2W
// elements, even elements first, then odd ones, so a load, a shift and an and convert 2W values
// (no shuffles). Dot products do not care about the order as long as q and k share it, and
// store_row undoes it for the output. Other dtypes keep the natural order.
template <int W, typename T>
SPEEDX_INLINE void load_row(float* __restrict dst, const T* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}
template <int W>
SPEEDX_INLINE void load_row(float* __restrict dst, const bf16* __restrict src, int64_t n) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {  // dst + i is aligned: rows are whole vectors
    U x;
    std::memcpy(&x, src + i, sizeof x);
    *reinterpret_cast<F*>(dst + i) = (F)(x << 16);
    *reinterpret_cast<F*>(dst + i + W) = (F)(x & 0xffff0000u);
  }
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

template <int W, typename T>
SPEEDX_INLINE void store_row(T* __restrict dst, const float* __restrict src, float mul, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) from_f32(src[i] * mul, dst + i);
}
template <int W>
SPEEDX_INLINE void store_row(bf16* __restrict dst, const float* __restrict src, float mul, int64_t n) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {  // from_f32(float, bf16*) on vectors, re-interleaved
    const U x = round_interleave_bf16<W>(*reinterpret_cast<const F*>(src + i) * mul,
                                         *reinterpret_cast<const F*>(src + i + W) * mul);
    std::memcpy(dst + i, &x, sizeof x);
  }
  for (; i < n; ++i) from_f32(src[i] * mul, dst + i);
}

// One level of the lane-sum tree: lanes [0, W/2) of the result hold h-lane partial sums of x,
// lanes [W/2, W) those of y (h = W/2 at the first level, halving down to 1).
constexpr int tree_lane(int W, int h, int i, bool upper) {
  const int j = i % (W / 2);
  return (i < W / 2 ? 0 : W) + j / h * 2 * h + (upper ? h : 0) + j % h;
}
template <int W, int H, typename F, int... I>
SPEEDX_INLINE F tree_step(const F& x, const F& y, std::integer_sequence<int, I...>) {
  return shuffle<W>(x, y, std::integer_sequence<int, tree_lane(W, H, I, false)...>{}) +
         shuffle<W>(x, y, std::integer_sequence<int, tree_lane(W, H, I, true)...>{});
}
template <int W, int K, typename F, int... I>
SPEEDX_INLINE F rotate_lanes(const F& v, std::integer_sequence<int, I...>) {  // lane i <- lane i + K
  return shuffle<W>(v, v, std::integer_sequence<int, (I + K) % W...>{});
}
// Lane t of the result = sum of the lanes of a[t] (a[] is clobbered): W - 1 adds and 2(W - 1)
// shuffles for W tokens, instead of a horizontal reduction per dot product.
template <int W, int H = W / 2, typename F>
SPEEDX_INLINE F lane_sums(F* a) {
  for (int k = 0; k < H; ++k)  // 2H vectors in, H out
    a[k] = tree_step<W, H>(a[2 * k], a[2 * k + 1], std::make_integer_sequence<int, W>{});
  if constexpr (H == 1) return a[0];
  else return lane_sums<W, H / 2>(a);
}

// Sum (or max) of the W lanes of v, by halving: log2(W) shuffles instead of a W-long chain.
template <int W, bool Max, int K = W / 2, typename F>
SPEEDX_INLINE float lane_reduce(const F& v) {
  const F u = rotate_lanes<W, K>(v, std::make_integer_sequence<int, W>{});
  const F r = Max ? (v > u ? v : u) : v + u;
  if constexpr (K == 1) return r[0];
  else return lane_reduce<W, Max, K / 2>(r);
}

// Per-thread scratch in floats; head_dim padded to Dp = Dv * W, kv_len to Lp (both zero-padded).
// H query heads and KH KV heads per work item.
struct Scratch {
  float* q;    // [H][Dp]      q * scale
  float* acc;  // [H][Dp]      sum p * v
  float* tile; // [KH][W][Dp]  W K or V rows of each KV head in fp32
  float* s;    // [H][Lp]      scores, then unnormalised probabilities
  float* inv;  // [H]          1 / softmax denominator
};

// tiles[j] <- cache rows t0 .. t0+n-1 (n <= W) of KV head j of the range, in fp32, for j < heads; zero
// rows pad a short last tile. Row by row, so that each cache row is read in one sweep. (An inline
// function, not a lambda: a lambda body would be compiled for the baseline ISA, outside the target
// attribute.)
template <int W, typename T>
SPEEDX_INLINE void fill_tiles(float* tiles, int64_t heads, const T* cache, const int32_t* table, int64_t bs,
                              int64_t row_stride, int64_t D, int64_t Dp, int64_t t0, int64_t n) {
  int64_t blk = t0 / bs, row = t0 % bs;
  for (int64_t r = 0; r < n; ++r) {
    const T* src = cache + (int64_t(table[blk]) * bs + row) * row_stride;
    for (int64_t j = 0; j < heads; ++j) load_row<W>(tiles + (j * W + r) * Dp, src + j * D, D);
    if (++row == bs) row = 0, ++blk;
  }
  for (int64_t j = 0; j < heads; ++j) std::fill(tiles + (j * W + n) * Dp, tiles + (j + 1) * W * Dp, 0.0f);
}

// Asks for cache rows t0 .. t1-1 (bytes each, from this range's first KV head) ahead of use: blocks
// lie anywhere in the pool, so the hardware prefetchers cannot follow from one to the next.
template <typename T>
SPEEDX_INLINE void prefetch_rows(const T* cache, const int32_t* table, int64_t bs, int64_t row_stride,
                                 int64_t bytes, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const char* row = reinterpret_cast<const char*>(cache + (int64_t(table[t / bs]) * bs + t % bs) * row_stride);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
    __builtin_prefetch(row + bytes - 1);  // rows need not start on a cache line
  }
}

// DF: head_dim fixed at compile time (0: read it from a), so the common sizes get fully unrolled
// row loops. Query heads g0 * G .. g1 * G - 1 of sequence b, i.e. those of KV heads g0 .. g1 - 1.
template <typename T, int DF, int W>
SPEEDX_INLINE void attend(const PagedDecodeArgs& a, int64_t b, int64_t g0, int64_t g1, const Scratch& w) {
  using F = typename Vec<W>::f;
  const int64_t G = a.num_heads / a.num_kv_heads, KH = g1 - g0, H = KH * G;
  const int64_t D = DF ? DF : a.head_dim, Dv = (D + W - 1) / W;
  const int64_t Dp = Dv * W, bs = a.block_size, L = a.kv_lens[b], Lv = (L + W - 1) / W;
  const int64_t row_stride = a.num_kv_heads * D;  // elements between consecutive cache rows
  const int32_t* table = a.block_tables + b * a.max_blocks;
  const T* k_cache = static_cast<const T*>(a.k_cache) + g0 * D;
  const T* v_cache = static_cast<const T*>(a.v_cache) + g0 * D;
  const F* tiles = reinterpret_cast<const F*>(w.tile);
  F* s = reinterpret_cast<F*>(w.s);
  F* q = reinterpret_cast<F*>(w.q);
  F* acc = reinterpret_cast<F*>(w.acc);

  const T* q_in = static_cast<const T*>(a.q) + (b * a.num_heads + g0 * G) * D;
  for (int64_t h = 0; h < H; ++h) {  // padding lanes stay zero from allocation
    load_row<W>(w.q + h * Dp, q_in + h * D, D);
    for (int64_t c = 0; c < Dv; ++c) q[h * Dv + c] *= a.scale;
  }

  // 1. scores; query head h reads the tile of KV head h / G. Each tile prefetches the next one's
  // rows, the last K tile the first V tile's.
  const int64_t bytes = KH * D * int64_t(sizeof(T));
  prefetch_rows(k_cache, table, bs, row_stride, bytes, 0, std::min<int64_t>(W, L));
  for (int64_t t0 = 0, j = 0; t0 < L; t0 += W, ++j) {
    if (t0 + W < L) prefetch_rows(k_cache, table, bs, row_stride, bytes, t0 + W, std::min<int64_t>(t0 + 2 * W, L));
    else prefetch_rows(v_cache, table, bs, row_stride, bytes, 0, std::min<int64_t>(W, L));
    fill_tiles<W>(w.tile, KH, k_cache, table, bs, row_stride, D, Dp, t0, std::min<int64_t>(W, L - t0));
    for (int64_t h = 0; h < H; ++h) {
      const F* tile = tiles + h / G * W * Dv;
      F part[W] = {};  // per-token partial dot products, kept in registers
      for (int64_t c = 0; c < Dv; ++c) {
        const F qc = q[h * Dv + c];
        for (int r = 0; r < W; ++r) part[r] += qc * tile[r * Dv + c];
      }
      s[h * Lv + j] = lane_sums<W>(part);
    }
  }

  // 2. softmax; tokens past L get -inf, i.e. probability 0
  for (int64_t h = 0; h < H; ++h) {
    std::fill(w.s + h * Lv * W + L, w.s + (h + 1) * Lv * W, -INFINITY);
    F m = s[h * Lv];
    for (int64_t j = 1; j < Lv; ++j) m = m > s[h * Lv + j] ? m : s[h * Lv + j];
    const float mx = lane_reduce<W, true>(m);
    F sum{};
    for (int64_t j = 0; j < Lv; ++j) sum += s[h * Lv + j] = vexp(s[h * Lv + j] - mx);
    w.inv[h] = 1.0f / lane_reduce<W, false>(sum);
  }

  // 3. out = sum p v / sum p
  std::fill(acc, acc + H * Dv, F{});
  for (int64_t t0 = 0, j = 0; t0 < L; t0 += W, ++j) {
    prefetch_rows(v_cache, table, bs, row_stride, bytes, std::min<int64_t>(t0 + W, L), std::min<int64_t>(t0 + 2 * W, L));
    fill_tiles<W>(w.tile, KH, v_cache, table, bs, row_stride, D, Dp, t0, std::min<int64_t>(W, L - t0));
    for (int64_t h = 0; h < H; ++h) {
      const F* tile = tiles + h / G * W * Dv;
      const F p = s[h * Lv + j];
      for (int64_t c = 0; c < Dv; ++c) {
        F part[4] = {acc[h * Dv + c]};  // 4 chains hide the FMA latency
        for (int r = 0; r < W; ++r) part[r % 4] += p[r] * tile[r * Dv + c];
        acc[h * Dv + c] = (part[0] + part[1]) + (part[2] + part[3]);
      }
    }
  }
  T* out = static_cast<T*>(a.out) + (b * a.num_heads + g0 * G) * D;
  for (int64_t h = 0; h < H; ++h) store_row<W>(out + h * D, w.acc + h * Dp, w.inv[h], D);
}

// Entry points: one per ISA level, dtype and head_dim. The OpenMP region stays outside them:
// GCC outlines a parallel region into a separate function that would not inherit the target.
using AttendFn = void (*)(const PagedDecodeArgs&, int64_t, int64_t, int64_t, const Scratch&);
struct Kernel { AttendFn fn; int width; };

template <typename T, int DF>
void attend_baseline(const PagedDecodeArgs& a, int64_t b, int64_t g0, int64_t g1, const Scratch& w) {
  attend<T, DF, 4>(a, b, g0, g1, w);
}
#ifdef SPEEDX_X86_ISAS
template <typename T, int DF>
__attribute__((target("arch=x86-64-v3"))) void attend_avx2(const PagedDecodeArgs& a, int64_t b, int64_t g0,
                                                           int64_t g1, const Scratch& w) {
  attend<T, DF, 8>(a, b, g0, g1, w);
}
template <typename T, int DF>
__attribute__((target("arch=x86-64-v4"))) void attend_avx512(const PagedDecodeArgs& a, int64_t b, int64_t g0,
                                                             int64_t g1, const Scratch& w) {
  attend<T, DF, 16>(a, b, g0, g1, w);
}
#endif

template <typename T, int DF>
Kernel pick_isa(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return {attend_avx512<T, DF>, 16};
  if (isa == CpuIsa::kAvx2) return {attend_avx2<T, DF>, 8};
#endif
  (void)isa;
  return {attend_baseline<T, DF>, 4};
}
template <typename T>
Kernel pick(int64_t head_dim, CpuIsa isa) {
  return head_dim == 64 ? pick_isa<T, 64>(isa) : head_dim == 128 ? pick_isa<T, 128>(isa) : pick_isa<T, 0>(isa);
}

void fail(const std::string& msg) { throw std::invalid_argument("paged_decode_attention: " + msg); }

}  // namespace

void paged_decode_attention(const PagedDecodeArgs& a) {
  if (a.num_heads < 1 || a.num_kv_heads < 1 || a.num_heads % a.num_kv_heads != 0)
    fail("num_heads (" + std::to_string(a.num_heads) + ") must be a positive multiple of num_kv_heads (" +
         std::to_string(a.num_kv_heads) + ")");
  if (a.head_dim < 1) fail("head_dim must be >= 1");
  if (a.block_size < 1) fail("block_size must be >= 1");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
  if (a.batch < 0 || a.max_blocks < 0) fail("bad block_tables shape");
  if (a.batch == 0) return;
  if (!a.out || !a.q || !a.k_cache || !a.v_cache) fail("null data pointer");
  int64_t max_len = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t len = a.kv_lens[b], need = (len + a.block_size - 1) / a.block_size;
    if (len < 1) fail("kv_lens[" + std::to_string(b) + "] = " + std::to_string(len) + ", must be >= 1");
    if (need > a.max_blocks)
      fail("kv_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " needs " + std::to_string(need) +
           " blocks but block_tables has " + std::to_string(a.max_blocks) + " columns");
    for (int64_t j = 0; j < need; ++j) {
      const int64_t id = a.block_tables[b * a.max_blocks + j];
      if (id < 0 || id >= a.num_blocks)
        fail("block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(id) +
             " is outside [0, num_blocks=" + std::to_string(a.num_blocks) + ")");
    }
    max_len = std::max(max_len, len);
  }

  const CpuIsa isa = a.isa == CpuIsa::kAuto ? best_cpu_isa() : a.isa;
  const Kernel k = a.dtype == DType::kFloat32   ? pick<float>(a.head_dim, isa)
                   : a.dtype == DType::kFloat16 ? pick<f16>(a.head_dim, isa)
                                                    : pick<bf16>(a.head_dim, isa);
  // A work item is a sequence with all its KV heads when there are enough sequences to share out
  // (each cache row is then read in one sweep: its heads sit side by side), else a (sequence, KV
  // head) pair, so that a small batch still keeps every thread busy.
  const int64_t heads_per_item = a.batch >= 4 * a.num_threads ? a.num_kv_heads : 1;
  const int64_t items_per_seq = a.num_kv_heads / heads_per_item, items = a.batch * items_per_seq;
  const int64_t W = k.width, KH = heads_per_item, H = KH * (a.num_heads / a.num_kv_heads);
  const int64_t Dp = (a.head_dim + W - 1) / W * W, Lp = (max_len + W - 1) / W * W;
#ifdef _OPENMP
  const int nt = int(std::min<int64_t>(a.num_threads, items));
#else
  const int nt = 1;
#endif
  // Floats, a multiple of W, so that every buffer below stays vector-aligned.
  const int64_t per_thread = 2 * H * Dp + KH * W * Dp + H * Lp + (H + 15) / 16 * 16;
  // Zeroed (padding lanes must be 0, not NaN); 64-byte aligned by hand.
  std::vector<float> buf(size_t(per_thread * nt + 16));
  float* scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    float* base = scratch + per_thread * omp_get_thread_num();
#else
    float* base = scratch;
#endif
    float* tiles = base + 2 * H * Dp;
    const Scratch w{base, base + H * Dp, tiles, tiles + KH * W * Dp, tiles + KH * W * Dp + H * Lp};
#pragma omp for schedule(dynamic, 1)  // dynamic: sequences have different lengths
    for (int64_t i = 0; i < items; ++i) {
      const int64_t g0 = i % items_per_seq * KH;
      k.fn(a, i / items_per_seq, g0, g0 + KH, w);
    }
  }
}

}  // namespace speedx
