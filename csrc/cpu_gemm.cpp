// Packed-weight matmul on CPU (see cpu_gemm.h). The work is split into (row block, weight panel)
// pairs handed out to threads in one static sweep; within a pair, register tiles of R rows x C
// columns (C = 32, a whole panel, or a slice of it where the register file is small) run the whole
// k loop:
//   per k: the tile's slice of one panel row -> C fp32 weights (bf16: a shift and an and per W bf16
//          pairs, even columns in one vector, odd in the next; quantized: widen the quants, times
//          the block's scale, plus its minimum), then for each of the R rows a broadcast of x[r, k]
//          and C/W FMAs into the tile's accumulators;
//   at the end: + bias, round (bf16) or re-interleave (fp32), store; or, for SwiGLU, silu(gate) * up
//   of each (even, odd) column pair.
// The weight format is a policy (Format<F, W> below): the tiles, the threading and the epilogue are
// shared. x is converted to fp32 once per call, each tile's rows interleaved. SIMD: see cpu_simd.h.
#include "cpu_gemm.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef SPEEDX_X86_ISAS
#include <immintrin.h>
#endif

namespace speedx {
namespace {

using namespace simd;

constexpr int P = kGemmPanel;
constexpr int QB = kQuantBlock;
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead in a panel to prefetch

// First lane of vector g of a panel row in lane order (cpu_gemm.h): vectors alternate even and odd
// columns, W each, so vector g holds columns (g / 2) * 2W + 2l + g % 2.
template <int W> constexpr int lane0(int g) { return (g % 2) * (P / 2) + (g / 2) * W; }

// W fp16 bit patterns -> fp32, exactly (as to_f32(f16) in cpu_simd.h, on vectors).
template <int W>
SPEEDX_INLINE typename Vec<W>::f half_to_float(const uint8_t* src) {
  using U = typename Vec<W>::u;
  using I = typename Vec<W>::i;
  typename Vec<W>::h h;
  std::memcpy(&h, src, sizeof h);
  const U x = __builtin_convertvector(h, U), sign = (x & 0x8000u) << 16, em = x & 0x7fffu;
  const U normal = ((em << 13) + (112u << 23)) | ((U)(em >= 0x7c00u) & 0x7f800000u);
  const U sub = (U)(__builtin_convertvector((I)em, typename Vec<W>::f) * 0x1p-24f), is_sub = (U)(em < 0x400u);
  return (typename Vec<W>::f)((sub & is_sub) | (normal & ~is_sub) | sign);
}

// A weight format's side of the kernel. Block<G, V> reads the vectors G .. G+V-1 of a panel:
// constructed at the start of each block of kBlockK k values (loading its scales), then weights()
// gives the V fp32 weight vectors of k = kb + kk.
template <WeightFormat F, int W> struct Format;

template <int W> struct Format<WeightFormat::kBf16, W> {
  using Fv = typename Vec<W>::f;
  static constexpr int kBlockK = 1;
  static constexpr int64_t kRowBytes = P * 2;  // bytes per k of a panel
  static int64_t panel_bytes(int64_t k) { return k * kRowBytes; }
  template <int G, int V> struct Block {
    const uint8_t* row;
    SPEEDX_INLINE Block(const uint8_t* panel, int64_t kb) : row(panel + kb * kRowBytes) {}
    SPEEDX_INLINE void weights(int, Fv (&w)[V]) const {
#pragma GCC unroll 8
      for (int v = 0; v < V; v += 2) {
        typename Vec<W>::u pairs;
        std::memcpy(&pairs, row + (G + v) * W * 2, sizeof pairs);
        w[v] = (Fv)(pairs << 16);
        w[v + 1] = (Fv)(pairs & 0xffff0000u);
      }
    }
  };
};

template <WeightFormat F, int W> struct Format {
  using Fv = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  using U = typename Vec<W>::u;
  static constexpr bool kQ8 = F == WeightFormat::kQ8_0, kMin = F == WeightFormat::kQ4_1;
  static constexpr int kPerWord = kQ8 ? 4 : 8;                          // k values per 32-bit word
  static constexpr int kHeader = (kMin ? 2 : 1) * P * 2;               // fp16 scales (+ minimums)
  static constexpr int64_t kBlockBytes = kHeader + QB / kPerWord * P * 4;  // per block of 32 k
  static constexpr int kBlockK = QB;
  static constexpr int64_t kRowBytes = kBlockBytes / QB;
  static int64_t panel_bytes(int64_t k) { return k / QB * kBlockBytes; }
  template <int G, int V> struct Block {
    const uint8_t* q;
    Fv d[V], mn[V];  // w = q * d + mn: Q4_0's mn = -8 d (exact, as gguf's d * (q - 8)), Q8_0's 0
    SPEEDX_INLINE Block(const uint8_t* panel, int64_t kb) {
      const uint8_t* block = panel + kb / QB * kBlockBytes;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        d[v] = half_to_float<W>(block + lane0<W>(G + v) * 2);
        if constexpr (kMin) mn[v] = half_to_float<W>(block + P * 2 + lane0<W>(G + v) * 2);
        else mn[v] = d[v] * -8.0f;
      }
      q = block + kHeader;
    }
    // Word e of group kk / kPerWord holds lane e's quants for kPerWord k in a row: one shift and one
    // mask (Q8: two shifts) give a lane vector, with no byte-widening shuffles.
    SPEEDX_INLINE void weights(int kk, Fv (&w)[V]) const {
      const uint8_t* group = q + kk / kPerWord * P * 4;
      const int j = kk % kPerWord;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        U u;
        std::memcpy(&u, group + lane0<W>(G + v) * 4, sizeof u);
        if constexpr (kQ8) {
          w[v] = __builtin_convertvector((I)(u << (24 - 8 * j)) >> 24, Fv) * d[v];
        } else {  // d * q is exact, so this rounds once, as gguf's (d * q) + m does
          w[v] = __builtin_convertvector((I)((u >> (4 * j)) & 15u), Fv) * d[v] + mn[v];
        }
      }
    }
  };
};

// A quantized panel dequantized to fp32 (dequantize_panel), each k's 32 columns in lane order: when a
// row block has several tiles, they all run on it instead of each dequantizing the blocks again.
template <int W> struct DequantizedPanel {
  using Fv = typename Vec<W>::f;
  static constexpr int kBlockK = 1;
  static constexpr int64_t kRowBytes = P * 4;
  template <int G, int V> struct Block {
    const uint8_t* row;
    SPEEDX_INLINE Block(const uint8_t* panel, int64_t kb) : row(panel + kb * kRowBytes) {}
    SPEEDX_INLINE void weights(int, Fv (&w)[V]) const {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) std::memcpy(&w[v], row + lane0<W>(G + v) * 4, sizeof w[v]);
    }
  };
};

template <WeightFormat F, int W>
SPEEDX_INLINE void dequantize_panel(const uint8_t* panel, int64_t K, float* out, const uint8_t* next_panel) {
  using Fmt = Format<F, W>;
  constexpr int V = P / W;
  for (int64_t kb = 0; kb < K; kb += QB) {
    const typename Fmt::template Block<0, V> block(panel, kb);
#pragma GCC unroll 8
    for (int kk = 0; kk < QB; ++kk) {
      __builtin_prefetch(panel + (kb + kk) * Fmt::kRowBytes + kPrefetchBytes);
      if (next_panel) __builtin_prefetch(next_panel + (kb + kk) * Fmt::kRowBytes, 0, 2);
      typename Vec<W>::f w[V];
      block.weights(kk, w);
      for (int v = 0; v < V; ++v) std::memcpy(out + (kb + kk) * P + lane0<W>(v), &w[v], sizeof w[v]);
    }
  }
}

// Register tile shape per SIMD width: R rows x C columns. R * C/W accumulators, C/W weight vectors
// and a broadcast must fit the register file (32 zmm for AVX-512, 16 ymm / xmm otherwise); AVX2
// takes half a panel so that R can be 6 (12 x 32 in 16 ymm would spill). A quantized format's scale
// vectors spill there, but only in single-tile blocks (m <= R), which wait on memory anyway.
template <int W> struct TileShape {
  static constexpr int R = W == 16 ? 12 : W == 8 ? 6 : 3;
  static constexpr int C = W == 16 ? 32 : W == 8 ? 16 : 8;
};
// Rows per block: the block's fp32 x rows stay in L2 while every panel streams past them.
constexpr int64_t kBlockTiles = 16;

// A block of `rows` rows splits into as few tiles of at most `tile_rows` rows as possible, of
// sizes that differ by at most one (64 rows: 11,11,11,11,10,10, not 12 x 5 + 4): short tiles waste
// FMA slots. Tile i spans rows [start, start + size) of the block.
struct TileSpan { int64_t start, size; };
SPEEDX_INLINE int64_t tile_count(int64_t rows, int64_t tile_rows) { return (rows + tile_rows - 1) / tile_rows; }
SPEEDX_INLINE TileSpan tile_span(int64_t rows, int64_t tile_rows, int64_t i) {
  const int64_t n = tile_count(rows, tile_rows), base = rows / n, extra = rows % n;
  return {i * base + std::min(i, extra), base + (i < extra ? 1 : 0)};
}

struct Job {
  const PackedWeightGemmArgs& a;
  const float* x;  // fp32; a tile of R rows from row m0 is [k][R] at x + m0 * k (see gemm_packed_weight)
  const uint8_t* packed;
  int64_t panel_bytes;
};

// Columns 2l of a 2W-column group in `even`, 2l+1 in `odd` -> the group's first (Half = 0) or
// second (Half = 1) W columns in order.
template <int W, int Half, typename F, int... I>
SPEEDX_INLINE F interleave(const F& even, const F& odd, std::integer_sequence<int, I...>) {
  return shuffle<W>(even, odd, std::integer_sequence<int, (I % 2 ? W : 0) + Half * W / 2 + (I / 2)...>{});
}

// acc[r][v] of a tile of C columns from column n0: + bias, then rounded to bf16 or re-interleaved
// to fp32 columns, or, for SwiGLU, silu(gate) * up of each (even, odd) column pair; a tile cut
// short by n goes via a stage.
template <int W, int R, int C>
SPEEDX_INLINE void store(const PackedWeightGemmArgs& a, const typename Vec<W>::f (&acc)[R][C / W], int64_t n0,
                         int64_t m0) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  constexpr int V = C / W;
  const int64_t cols = std::min<int64_t>(C, a.n - n0);
  F bias[V] = {};
  if (a.bias)
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < W; ++l) {
        const int64_t c = (v / 2) * 2 * W + 2 * l + v % 2;
        bias[v][l] = c < cols ? a.bias[n0 + c] : 0.0f;
      }
  if (a.silu_mul) {  // even columns: gate, odd: up (see cpu_gemm.h); C / 2 outputs per tile
    const int64_t n_out = a.n / 2;
    for (int r = 0; r < R; ++r) {
      alignas(64) uint16_t row16[C / 2];
      uint16_t* dst = cols == C ? static_cast<uint16_t*>(a.out) + (m0 + r) * n_out + n0 / 2 : row16;
      for (int v = 0; v < V; v += 2) {
        const F gate = round_bf16<W>(acc[r][v] + bias[v]), up = round_bf16<W>(acc[r][v + 1] + bias[v + 1]);
        const typename Vec<W>::h out = bf16_bits<W>(swiglu_bf16<W>(gate, up));
        std::memcpy(dst + v / 2 * W, &out, sizeof out);
      }
      if (cols < C) std::copy(row16, row16 + cols / 2, static_cast<uint16_t*>(a.out) + (m0 + r) * n_out + n0 / 2);
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) uint16_t row16[C];  // staging for a tile cut short by n
    alignas(64) float row32[C];
    const bool whole = cols == C;
    if (a.out_dtype == DType::kBFloat16) {
      uint16_t* dst = whole ? static_cast<uint16_t*>(a.out) + (m0 + r) * a.n + n0 : row16;
      for (int v = 0; v < V; v += 2) {
        const U packed = round_interleave_bf16<W>(acc[r][v] + bias[v], acc[r][v + 1] + bias[v + 1]);
        std::memcpy(dst + v * W, &packed, sizeof packed);
      }
      if (!whole) std::copy(row16, row16 + cols, static_cast<uint16_t*>(a.out) + (m0 + r) * a.n + n0);
    } else {
      float* dst = whole ? static_cast<float*>(a.out) + (m0 + r) * a.n + n0 : row32;
      for (int v = 0; v < V; v += 2) {
        const F e = acc[r][v] + bias[v], o = acc[r][v + 1] + bias[v + 1];
        const F lo = interleave<W, 0>(e, o, std::make_integer_sequence<int, W>{});
        const F hi = interleave<W, 1>(e, o, std::make_integer_sequence<int, W>{});
        std::memcpy(dst + v * W, &lo, sizeof lo);
        std::memcpy(dst + v * W + W, &hi, sizeof hi);
      }
      if (!whole) std::copy(row32, row32 + cols, static_cast<float*>(a.out) + (m0 + r) * a.n + n0);
    }
  }
}

// Rows m0 .. m0+R-1 of columns [32p + c0, 32p + c0 + C) (those < n): c0 = G * W.
template <class Fmt, int W, int R, int C, int G>
SPEEDX_INLINE void tile(const Job& job, const uint8_t* panel, int64_t p, int64_t m0, const uint8_t* next_panel) {
  using F = typename Vec<W>::f;
  constexpr int V = C / W;  // fp32 vectors of the tile's columns: pairs (even columns, odd columns)
  const int64_t K = job.a.k;
  const float* x = job.x + m0 * K;  // [K][R]: this tile's rows, interleaved

  F acc[R][V] = {};
  for (int64_t kb = 0; kb < K; kb += Fmt::kBlockK) {
    const typename Fmt::template Block<G, V> block(panel, kb);
#pragma GCC unroll 8
    for (int kk = 0; kk < Fmt::kBlockK; ++kk) {
      const int64_t k = kb + kk;
      __builtin_prefetch(panel + k * Fmt::kRowBytes + kPrefetchBytes);  // weights come from memory: ask early
      if (next_panel) __builtin_prefetch(next_panel + k * Fmt::kRowBytes, 0, 2);  // into L2, a panel early
      F w[V];
      block.weights(kk, w);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float xr = x[k * R + r];  // scalar * vector: a broadcast
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] += xr * w[v];
      }
    }
  }
  store<W, R, C>(job.a, acc, p * P + G * W, m0);
}

// Every column slice of the panel (those that start before n) for a tile of exactly `rows` (1 .. R) rows.
template <class Fmt, int W, int R, int C, int G = 0>
SPEEDX_INLINE void slices(const Job& job, const uint8_t* panel, int64_t p, int64_t m0, const uint8_t* next_panel) {
  if constexpr (G * W < P) {
    if (p * P + G * W >= job.a.n) return;
    tile<Fmt, W, R, C, G>(job, panel, p, m0, next_panel);
    slices<Fmt, W, R, C, G + C / W>(job, panel, p, m0, nullptr);
  }
}
template <class Fmt, int W, int R, int C>
SPEEDX_INLINE void any_tile(const Job& job, const uint8_t* panel, int64_t p, int64_t m0, int64_t rows,
                            const uint8_t* next_panel) {
  if constexpr (R > 0) {
    if (rows == R) slices<Fmt, W, R, C>(job, panel, p, m0, next_panel);
    else any_tile<Fmt, W, R - 1, C>(job, panel, p, m0, rows, next_panel);
  }
}

std::vector<float>& dequant_scratch() {
  thread_local std::vector<float> buf;  // one dequantized panel per thread, reused
  return buf;
}

template <WeightFormat F, int W>
SPEEDX_INLINE void block(const Job& job, int64_t p, int64_t m0, int64_t m1) {
  using S = TileShape<W>;
  const int64_t tiles = tile_count(m1 - m0, S::R);
  const uint8_t* panel = job.packed + p * job.panel_bytes;
  // The first tile of a panel also pulls the next panel into L2: in a model's step the weights come
  // from DRAM, and the short prefetch in tile() alone leaves that tile waiting on it.
  const uint8_t* next = m0 == 0 && p + 1 < (job.a.n + P - 1) / P ? panel + job.panel_bytes : nullptr;
  if constexpr (F != WeightFormat::kBf16) {
    if (tiles > 1) {  // dequantize once for all the tiles
      std::vector<float>& buf = dequant_scratch();
      buf.resize(size_t(job.a.k * P));
      dequantize_panel<F, W>(panel, job.a.k, buf.data(), next);
      for (int64_t i = 0; i < tiles; ++i) {
        const TileSpan t = tile_span(m1 - m0, S::R, i);
        any_tile<DequantizedPanel<W>, W, S::R, S::C>(job, reinterpret_cast<const uint8_t*>(buf.data()), p,
                                                     m0 + t.start, t.size, nullptr);
      }
      return;
    }
  }
  for (int64_t i = 0; i < tiles; ++i) {
    const TileSpan t = tile_span(m1 - m0, S::R, i);
    any_tile<Format<F, W>, W, S::R, S::C>(job, panel, p, m0 + t.start, t.size, i == 0 ? next : nullptr);
  }
}

// Entry points, one per (format, ISA level). The OpenMP region stays outside them: GCC outlines a
// parallel region into a separate function that would not inherit the target.
using BlockFn = void (*)(const Job&, int64_t, int64_t, int64_t);
struct Kernel { BlockFn fn; int64_t tile_rows; bool bf16_pairs = false; };  // bf16_pairs: x as in tile_dpbf16

template <WeightFormat F> void block_baseline(const Job& j, int64_t p, int64_t m0, int64_t m1) { block<F, 4>(j, p, m0, m1); }
#ifdef SPEEDX_X86_ISAS
template <WeightFormat F> __attribute__((target("arch=x86-64-v3"))) void block_avx2(const Job& j, int64_t p, int64_t m0, int64_t m1) {
  block<F, 8>(j, p, m0, m1);
}
template <WeightFormat F> __attribute__((target("arch=x86-64-v4"))) void block_avx512(const Job& j, int64_t p, int64_t m0, int64_t m1) {
  block<F, 16>(j, p, m0, m1);
}
#endif

#ifdef SPEEDX_X86_ISAS
// The AVX512_BF16 path (bf16 weights only): per pair of k, panel rows k and k+1 interleaved by
// 16-bit unpacks give each 32-bit lane a column's (w[k], w[k+1]), and one vdpbf16ps per R rows x 16
// columns adds x[r, k] w[k] + x[r, k+1] w[k+1] into fp32: two products per lane per instruction.
// x comes as bf16 pairs, a tile of R rows from row m0 at x + m0 * ceil(k / 2) as [k / 2][R] words
// (zero past k). Unpacks work within 128-bit lanes, so the "lo" accumulator holds columns 8q + i and
// "hi" 8q + 4 + i (lane 4q + i, i < 4); the store permutes them back to even / odd columns.
#define SPEEDX_DPBF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
constexpr int kDpRows = 12;  // 24 accumulators, 2 panel rows, 2 unpacked: 28 of 32 zmm
constexpr int64_t kDpPrefetchBytes = 4096;  // this loop eats a panel faster than tile(): ask further ahead

constexpr int dp_lane(int c) { return (c % 8 < 4 ? 0 : 16) + c / 8 * 4 + c % 4; }  // column c in lo:hi

template <int R>
SPEEDX_INLINE SPEEDX_DPBF16 void dp_step(__m512 (&acc)[R][2], const uint32_t* x, __m512i row0, __m512i row1) {
  const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(row0, row1), hi = (__m512bh)_mm512_unpackhi_epi16(row0, row1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512bh xr = (__m512bh)_mm512_set1_epi32(int(x[r]));
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, xr);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, xr);
  }
}

template <int R>
SPEEDX_INLINE SPEEDX_DPBF16 void tile_dpbf16(const Job& job, const uint8_t* panel, int64_t p, int64_t m0,
                                              const uint8_t* next_panel) {
  using F = Vec<16>::f;
  constexpr int64_t kRowBytes = P * 2;
  const int64_t K = job.a.k, pairs = K / 2;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(job.x) + m0 * ((K + 1) / 2);
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t* row = panel + 2 * j * kRowBytes;
    __builtin_prefetch(row + kDpPrefetchBytes);
    __builtin_prefetch(row + kRowBytes + kDpPrefetchBytes);
    if (next_panel) {
      __builtin_prefetch(next_panel + 2 * j * kRowBytes, 0, 2);
      __builtin_prefetch(next_panel + (2 * j + 1) * kRowBytes, 0, 2);
    }
    dp_step<R>(acc, x + j * R, _mm512_loadu_si512(row), _mm512_loadu_si512(row + kRowBytes));
  }
  if (K % 2) dp_step<R>(acc, x + pairs * R, _mm512_loadu_si512(panel + (K - 1) * kRowBytes), _mm512_setzero_si512());
  F eo[R][2];
  for (int r = 0; r < R; ++r) {
    const F lo = (F)acc[r][0], hi = (F)acc[r][1];
    eo[r][0] = shuffle<16>(lo, hi, std::integer_sequence<int, dp_lane(0), dp_lane(2), dp_lane(4), dp_lane(6),
                           dp_lane(8), dp_lane(10), dp_lane(12), dp_lane(14), dp_lane(16), dp_lane(18), dp_lane(20),
                           dp_lane(22), dp_lane(24), dp_lane(26), dp_lane(28), dp_lane(30)>{});
    eo[r][1] = shuffle<16>(lo, hi, std::integer_sequence<int, dp_lane(1), dp_lane(3), dp_lane(5), dp_lane(7),
                           dp_lane(9), dp_lane(11), dp_lane(13), dp_lane(15), dp_lane(17), dp_lane(19), dp_lane(21),
                           dp_lane(23), dp_lane(25), dp_lane(27), dp_lane(29), dp_lane(31)>{});
  }
  store<16, R, 32>(job.a, eo, p * P, m0);
}

template <int R>
SPEEDX_INLINE SPEEDX_DPBF16 void any_tile_dpbf16(const Job& job, const uint8_t* panel, int64_t p, int64_t m0,
                                                  int64_t rows, const uint8_t* next_panel) {
  if constexpr (R > 0) {
    if (rows == R) tile_dpbf16<R>(job, panel, p, m0, next_panel);
    else any_tile_dpbf16<R - 1>(job, panel, p, m0, rows, next_panel);
  }
}

SPEEDX_DPBF16 void block_avx512bf16(const Job& job, int64_t p, int64_t m0, int64_t m1) {
  const int64_t tiles = tile_count(m1 - m0, kDpRows);
  const uint8_t* panel = job.packed + p * job.panel_bytes;
  const uint8_t* next = m0 == 0 && p + 1 < (job.a.n + P - 1) / P ? panel + job.panel_bytes : nullptr;  // see block()
  for (int64_t i = 0; i < tiles; ++i) {
    const TileSpan t = tile_span(m1 - m0, kDpRows, i);
    any_tile_dpbf16<kDpRows>(job, panel, p, m0 + t.start, t.size, i == 0 ? next : nullptr);
  }
}
#endif

template <WeightFormat F>
Kernel pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512Bf16 && F == WeightFormat::kBf16) return {block_avx512bf16, kDpRows, true};
  if (isa >= CpuIsa::kAvx512) return {block_avx512<F>, TileShape<16>::R};
  if (isa == CpuIsa::kAvx2) return {block_avx2<F>, TileShape<8>::R};
#endif
  (void)isa;
  return {block_baseline<F>, TileShape<4>::R};
}

Kernel pick(WeightFormat f, CpuIsa isa) {
  switch (f) {
    case WeightFormat::kQ4_0: return pick<WeightFormat::kQ4_0>(isa);
    case WeightFormat::kQ4_1: return pick<WeightFormat::kQ4_1>(isa);
    case WeightFormat::kQ8_0: return pick<WeightFormat::kQ8_0>(isa);
    default: return pick<WeightFormat::kBf16>(isa);
  }
}

int64_t panel_bytes(WeightFormat f, int64_t k) {
  switch (f) {
    case WeightFormat::kQ4_0: return Format<WeightFormat::kQ4_0, 4>::panel_bytes(k);
    case WeightFormat::kQ4_1: return Format<WeightFormat::kQ4_1, 4>::panel_bytes(k);
    case WeightFormat::kQ8_0: return Format<WeightFormat::kQ8_0, 4>::panel_bytes(k);
    default: return Format<WeightFormat::kBf16, 4>::panel_bytes(k);
  }
}

void fail(const std::string& msg) { throw std::invalid_argument("gemm_packed_weight: " + msg); }

template <typename T>
void pack_row(float* dst, const T* src, int64_t k, int64_t stride) {
  for (int64_t i = 0; i < k; ++i) dst[i * stride] = to_f32(src[i]);
}

SPEEDX_INLINE uint32_t to_bf16_bits(bf16 v) { return v.bits; }
SPEEDX_INLINE uint32_t to_bf16_bits(float v) { bf16 b; from_f32(v, &b); return b.bits; }

// x row -> ceil(k / 2) words of bf16 pairs (x[2j] in the low half, zero past k), for tile_dpbf16.
template <typename T>
void pack_row_pairs(uint32_t* dst, const T* src, int64_t k, int64_t stride) {
  for (int64_t j = 0; j < k / 2; ++j) dst[j * stride] = to_bf16_bits(src[2 * j]) | to_bf16_bits(src[2 * j + 1]) << 16;
  if (k % 2) dst[k / 2 * stride] = to_bf16_bits(src[k - 1]);
}

std::vector<float>& x_scratch() {
  thread_local std::vector<float> buf;  // reused: decoding calls this hundreds of times a step
  return buf;
}

void check_quant_shape(WeightFormat f, int64_t n, int64_t k, const std::string& kernel) {
  if (n < 1 || k < 1) throw std::invalid_argument(kernel + ": n and k must be >= 1");
  if (f != WeightFormat::kBf16 && k % QB)
    throw std::invalid_argument(kernel + ": a quantized weight needs k a multiple of 32 (GGUF blocks), got k=" +
                                std::to_string(k));
}

}  // namespace

WeightFormat parse_weight_format(const std::string& name, const std::string& kernel) {
  std::string n = name;
  for (char& c : n) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (n == "bf16" || n == "bfloat16") return WeightFormat::kBf16;
  if (n == "q4_0") return WeightFormat::kQ4_0;
  if (n == "q4_1") return WeightFormat::kQ4_1;
  if (n == "q8_0") return WeightFormat::kQ8_0;
  throw std::invalid_argument(kernel + ": weight format must be 'bf16', 'q4_0', 'q4_1' or 'q8_0', got '" + name + "'");
}

int64_t gguf_block_bytes(WeightFormat f) {
  return f == WeightFormat::kQ8_0 ? 34 : f == WeightFormat::kQ4_1 ? 20 : f == WeightFormat::kQ4_0 ? 18 : 64;
}

int64_t packed_weight_size(int64_t n, int64_t k) { return (n + P - 1) / P * P * k; }

int64_t packed_weight_bytes(WeightFormat f, int64_t n, int64_t k) {
  check_quant_shape(f, n, k, "packed_weight_bytes");
  return (n + P - 1) / P * panel_bytes(f, k);
}

void pack_bf16_weight(const uint16_t* w, int64_t n, int64_t k, uint16_t* packed, int num_threads) {
  if (n < 1 || k < 1) throw std::invalid_argument("pack_bf16_weight: n and k must be >= 1");
  if (!w || !packed) throw std::invalid_argument("pack_bf16_weight: null data pointer");
  const int64_t panels = (n + P - 1) / P;
  (void)num_threads;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    uint16_t* dst = packed + p * k * P;
    for (int64_t c = 0; c < P; ++c) {  // one weight row at a time: contiguous reads
      const int64_t row = p * P + c;
      for (int64_t i = 0; i < k; ++i) dst[i * P + c] = row < n ? w[row * k + i] : uint16_t(0);
    }
  }
}

void pack_quant_weight(WeightFormat f, const uint8_t* blocks, int64_t n, int64_t k, uint8_t* packed,
                       int num_threads) {
  if (f == WeightFormat::kBf16) throw std::invalid_argument("pack_quant_weight: bf16 weights go to pack_bf16_weight");
  check_quant_shape(f, n, k, "pack_quant_weight");
  if (!blocks || !packed) throw std::invalid_argument("pack_quant_weight: null data pointer");
  const bool q8 = f == WeightFormat::kQ8_0, has_min = f == WeightFormat::kQ4_1;
  const int per_word = q8 ? 4 : 8, bits = q8 ? 8 : 4;
  const int64_t src_bytes = gguf_block_bytes(f), dst_bytes = panel_bytes(f, QB), header = (has_min ? 2 : 1) * P * 2;
  const int64_t panels = (n + P - 1) / P, kblocks = k / QB;
  (void)num_threads;
#pragma omp parallel for num_threads(std::max(1, num_threads)) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t b = 0; b < kblocks; ++b) {
      uint8_t* dst = packed + (p * kblocks + b) * dst_bytes;
      std::memset(dst, 0, size_t(dst_bytes));  // columns past n: scale 0, so weight 0
      for (int e = 0; e < P; ++e) {  // lane e <- column 2e (e < 16) or 2(e - 16) + 1
        const int64_t row = p * P + (e < P / 2 ? 2 * e : 2 * (e - P / 2) + 1);
        if (row >= n) continue;
        const uint8_t* src = blocks + (row * kblocks + b) * src_bytes;
        std::memcpy(dst + e * 2, src, 2);                           // d
        if (has_min) std::memcpy(dst + P * 2 + e * 2, src + 2, 2);  // m
        const uint8_t* qs = src + (has_min ? 4 : 2);
        for (int i = 0; i < QB; ++i) {
          // GGUF Q4: value i < 16 in the low nibble of byte i, value 16 + i in its high nibble.
          const uint32_t v = q8 ? qs[i] : i < QB / 2 ? qs[i] & 15 : qs[i - QB / 2] >> 4;
          uint8_t* word = dst + header + (i / per_word * P + e) * 4;  // word e of group i / per_word
          uint32_t bits_now;
          std::memcpy(&bits_now, word, 4);
          bits_now |= v << (bits * (i % per_word));
          std::memcpy(word, &bits_now, 4);
        }
      }
    }
  }
}

void gemm_packed_weight(const PackedWeightGemmArgs& a) {
  if (a.m < 0 || a.n < 1 || a.k < 1)
    fail("need m >= 0, n >= 1, k >= 1; got m=" + std::to_string(a.m) + ", n=" + std::to_string(a.n) +
         ", k=" + std::to_string(a.k));
  for (DType d : {a.x_dtype, a.out_dtype})
    if (d == DType::kFloat16) fail("x and out must be float32 or bfloat16, not float16");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
  if (a.silu_mul && (a.n % 2 || a.out_dtype != DType::kBFloat16))
    fail("the silu_mul epilogue needs an even n (gate and up rows interleaved) and a bfloat16 out");
  check_quant_shape(a.format, a.n, a.k, "gemm_packed_weight");
  if (a.m == 0) return;
  if (!a.out || !a.x || !a.packed) fail("null data pointer");

  const Kernel kernel = pick(a.format, a.isa == CpuIsa::kAuto ? best_gemm_isa() : a.isa);
  const int64_t R = kernel.tile_rows, B = kBlockTiles * R, K = a.k;
  const int64_t KX = kernel.bf16_pairs ? (K + 1) / 2 : K;  // 4-byte words of x per row
  std::vector<float>& x = x_scratch();
  x.resize(size_t(a.m * KX));
  const Job job{a, x.data(), static_cast<const uint8_t*>(a.packed), panel_bytes(a.format, K)};
  const int64_t panels = (a.n + P - 1) / P, blocks = (a.m + B - 1) / B;
  const int64_t work = panels * blocks, tiles = (blocks - 1) * tile_count(B, R) + tile_count(a.m - (blocks - 1) * B, R);
  [[maybe_unused]] const int nt = int(std::min<int64_t>(a.num_threads, work));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // x -> fp32 (or bf16 pairs), each tile's rows interleaved ([k][row]), so that its broadcasts walk
    // one stream.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t b = i / tile_count(B, R), b0 = b * B, rows = std::min(B, a.m - b0);
      const TileSpan t = tile_span(rows, R, i % tile_count(B, R));
      for (int64_t r = 0; r < t.size; ++r) {
        const int64_t row = b0 + t.start + r;
        float* dst = x.data() + (b0 + t.start) * KX + r;
        uint32_t* pairs = reinterpret_cast<uint32_t*>(dst);
        const bf16* x16 = static_cast<const bf16*>(a.x) + row * K;
        const float* x32 = static_cast<const float*>(a.x) + row * K;
        if (kernel.bf16_pairs && a.x_dtype == DType::kBFloat16) pack_row_pairs(pairs, x16, K, t.size);
        else if (kernel.bf16_pairs) pack_row_pairs(pairs, x32, K, t.size);
        else if (a.x_dtype == DType::kBFloat16) pack_row(dst, x16, K, t.size);
        else pack_row(dst, x32, K, t.size);
      }
    }
    // Static and panel-major: thread t streams its own contiguous run of panels, each through every
    // row block while it is in cache; the threads get equal shares of every block.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < work; ++i) {
      const int64_t m0 = i % blocks * B;
      kernel.fn(job, i / blocks, m0, std::min(a.m, m0 + B));
    }
  }
}

}  // namespace speedx
