// bf16-weight matmul on CPU (see cpu_gemm.h). The work is split into (row block, weight panel)
// pairs handed out to threads in one static sweep; within a pair, register tiles of R rows x 32
// columns run the whole k loop:
//   per k: one 64-byte panel row -> 32 fp32 weights (a shift and an and per W bf16 pairs: even
//          columns in one vector, odd in the next), then for each of the R rows a broadcast of
//          x[r, k] and 32/W FMAs into the tile's accumulators;
//   at the end: + bias, round (bf16) or re-interleave (fp32), store; or, for SwiGLU, silu(gate) * up
//   of each (even, odd) column pair.
// x is converted to fp32 once per call, each tile's rows interleaved. SIMD: see cpu_simd.h.
#include "cpu_gemm.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speedx {
namespace {

using namespace simd;

constexpr int P = kGemmPanel;

// Rows per register tile: R * 32/W accumulators plus 32/W weight vectors must fit in the register
// file (32 zmm for AVX-512, 16 ymm / xmm otherwise).
template <int W> constexpr int kTileRows = W == 16 ? 12 : W == 8 ? 3 : 1;
// Rows per block: the block's fp32 x rows stay in L2 while every panel streams past them.
template <int W> constexpr int64_t kBlockRows = 16 * kTileRows<W>;

// A block of `rows` rows splits into as few tiles of at most `tile_rows` rows as possible, of
// sizes that differ by at most one (64 rows: 11,11,11,11,10,10, not 12 x 5 + 4): short tiles waste
// FMA slots. Tile i spans rows [start, start + size) of the block.
struct TileSpan { int64_t start, size; };
SPEEDX_INLINE int64_t tile_count(int64_t rows, int64_t tile_rows) { return (rows + tile_rows - 1) / tile_rows; }
SPEEDX_INLINE TileSpan tile_span(int64_t rows, int64_t tile_rows, int64_t i) {
  const int64_t n = tile_count(rows, tile_rows), base = rows / n, extra = rows % n;
  return {i * base + std::min(i, extra), base + (i < extra ? 1 : 0)};
}

constexpr int64_t kPrefetchRows = 16;  // panel rows (64 bytes each) to prefetch ahead

struct Job {
  const Bf16WeightGemmArgs& a;
  const float* x;  // fp32; a tile of R rows from row m0 is [k][R] at x + m0 * k (see gemm_bf16_weight)
};

// Columns 2l of a 2W-column group in `even`, 2l+1 in `odd` -> the group's first (Half = 0) or
// second (Half = 1) W columns in order.
template <int W, int Half, typename F, int... I>
SPEEDX_INLINE F interleave(const F& even, const F& odd, std::integer_sequence<int, I...>) {
  return shuffle<W>(even, odd, std::integer_sequence<int, (I % 2 ? W : 0) + Half * W / 2 + (I / 2)...>{});
}

// acc[r][v] of a tile: + bias, then rounded to bf16 or re-interleaved to fp32 columns, or, for
// SwiGLU, silu(gate) * up of each (even, odd) column pair; a panel cut short by n goes via a stage.
template <int W, int R>
SPEEDX_INLINE void store(const Bf16WeightGemmArgs& a, const typename Vec<W>::f (&acc)[R][P / W], int64_t p,
                         int64_t m0) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  constexpr int V = P / W;
  const int64_t n0 = p * P, cols = std::min<int64_t>(P, a.n - n0);
  F bias[V] = {};
  if (a.bias)
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < W; ++l) {
        const int64_t c = (v / 2) * 2 * W + 2 * l + v % 2;
        bias[v][l] = c < cols ? a.bias[n0 + c] : 0.0f;
      }
  if (a.silu_mul) {  // even columns: gate, odd: up (see cpu_gemm.h); P / 2 outputs per panel
    const int64_t n_out = a.n / 2;
    for (int r = 0; r < R; ++r) {
      alignas(64) uint16_t row16[P / 2];
      uint16_t* dst = cols == P ? static_cast<uint16_t*>(a.out) + (m0 + r) * n_out + n0 / 2 : row16;
      for (int v = 0; v < V; v += 2) {
        const F gate = round_bf16<W>(acc[r][v] + bias[v]), up = round_bf16<W>(acc[r][v + 1] + bias[v + 1]);
        const typename Vec<W>::h out = bf16_bits<W>(swiglu_bf16<W>(gate, up));
        std::memcpy(dst + v / 2 * W, &out, sizeof out);
      }
      if (cols < P) std::copy(row16, row16 + cols / 2, static_cast<uint16_t*>(a.out) + (m0 + r) * n_out + n0 / 2);
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) uint16_t row16[P];  // staging for a panel cut short by n
    alignas(64) float row32[P];
    const bool whole = cols == P;
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

// Rows m0 .. m0+R-1 of one panel: out[m0 + r, 32p + c] for c < min(32, n - 32p).
template <int W, int R>
SPEEDX_INLINE void tile(const Job& job, int64_t p, int64_t m0, const uint16_t* next_panel) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  constexpr int V = P / W;  // fp32 vectors per panel row: pairs (even columns, odd columns)
  const Bf16WeightGemmArgs& a = job.a;
  const int64_t K = a.k;
  const float* x = job.x + m0 * K;  // [K][R]: this tile's rows, interleaved
  const uint16_t* panel = a.packed + p * K * P;

  F acc[R][V] = {};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(panel + (k + kPrefetchRows) * P);  // weights come from memory: ask early
    if (next_panel) __builtin_prefetch(next_panel + k * P, 0, 2);  // into L2, a whole panel early
    F w[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; v += 2) {
      U pairs;
      std::memcpy(&pairs, panel + k * P + v * W, sizeof pairs);
      w[v] = (F)(pairs << 16);
      w[v + 1] = (F)(pairs & 0xffff0000u);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xr = x[k * R + r];  // scalar * vector: an embedded broadcast
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] += xr * w[v];
    }
  }

  store<W, R>(a, acc, p, m0);
}

// The instantiation for a tile of exactly `rows` (1 .. R) rows.
template <int W, int R>
SPEEDX_INLINE void any_tile(const Job& job, int64_t p, int64_t m0, int64_t rows, const uint16_t* next_panel) {
  if constexpr (R > 0) {
    if (rows == R) tile<W, R>(job, p, m0, next_panel);
    else any_tile<W, R - 1>(job, p, m0, rows, next_panel);
  }
}

template <int W>
SPEEDX_INLINE void block(const Job& job, int64_t p, int64_t m0, int64_t m1) {
  for (int64_t i = 0, n = tile_count(m1 - m0, kTileRows<W>); i < n; ++i) {
    const TileSpan t = tile_span(m1 - m0, kTileRows<W>, i);
    // The first tile of a panel also pulls the next panel into L2: in a model's step the weights
    // come from DRAM, and the short prefetch above alone leaves that tile waiting on it.
    const bool ahead = i == 0 && m0 == 0 && p + 1 < (job.a.n + P - 1) / P;
    any_tile<W, kTileRows<W>>(job, p, m0 + t.start, t.size, ahead ? job.a.packed + (p + 1) * job.a.k * P : nullptr);
  }
}

// Entry points, one per ISA level. The OpenMP region stays outside them: GCC outlines a parallel
// region into a separate function that would not inherit the target.
using BlockFn = void (*)(const Job&, int64_t, int64_t, int64_t);
struct Kernel { BlockFn fn; int64_t tile_rows, block_rows; };

void block_baseline(const Job& j, int64_t p, int64_t m0, int64_t m1) { block<4>(j, p, m0, m1); }
#ifdef SPEEDX_X86_ISAS
__attribute__((target("arch=x86-64-v3"))) void block_avx2(const Job& j, int64_t p, int64_t m0, int64_t m1) {
  block<8>(j, p, m0, m1);
}
__attribute__((target("arch=x86-64-v4"))) void block_avx512(const Job& j, int64_t p, int64_t m0, int64_t m1) {
  block<16>(j, p, m0, m1);
}
#endif

Kernel pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return {block_avx512, kTileRows<16>, kBlockRows<16>};
  if (isa == CpuIsa::kAvx2) return {block_avx2, kTileRows<8>, kBlockRows<8>};
#endif
  (void)isa;
  return {block_baseline, kTileRows<4>, kBlockRows<4>};
}

void fail(const std::string& msg) { throw std::invalid_argument("gemm_bf16_weight: " + msg); }

template <typename T>
void pack_row(float* dst, const T* src, int64_t k, int64_t stride) {
  for (int64_t i = 0; i < k; ++i) dst[i * stride] = to_f32(src[i]);
}

std::vector<float>& x_scratch() {
  thread_local std::vector<float> buf;  // reused: decoding calls this hundreds of times a step
  return buf;
}

}  // namespace

int64_t packed_weight_size(int64_t n, int64_t k) { return (n + P - 1) / P * P * k; }

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

void gemm_bf16_weight(const Bf16WeightGemmArgs& a) {
  if (a.m < 0 || a.n < 1 || a.k < 1)
    fail("need m >= 0, n >= 1, k >= 1; got m=" + std::to_string(a.m) + ", n=" + std::to_string(a.n) +
         ", k=" + std::to_string(a.k));
  for (DType d : {a.x_dtype, a.out_dtype})
    if (d == DType::kFloat16) fail("x and out must be float32 or bfloat16, not float16");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
  if (a.silu_mul && (a.n % 2 || a.out_dtype != DType::kBFloat16))
    fail("the silu_mul epilogue needs an even n (gate and up rows interleaved) and a bfloat16 out");
  if (a.m == 0) return;
  if (!a.out || !a.x || !a.packed) fail("null data pointer");

  const Kernel kernel = pick(a.isa == CpuIsa::kAuto ? best_cpu_isa() : a.isa);
  const int64_t R = kernel.tile_rows, B = kernel.block_rows, K = a.k;
  std::vector<float>& x = x_scratch();
  x.resize(size_t(a.m * K));
  const Job job{a, x.data()};
  const int64_t panels = (a.n + P - 1) / P, blocks = (a.m + B - 1) / B;
  const int64_t work = panels * blocks, tiles = (blocks - 1) * tile_count(B, R) + tile_count(a.m - (blocks - 1) * B, R);
  [[maybe_unused]] const int nt = int(std::min<int64_t>(a.num_threads, work));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // x -> fp32, each tile's rows interleaved ([k][row]), so that its broadcasts walk one stream.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t b = i / tile_count(B, R), b0 = b * B, rows = std::min(B, a.m - b0);
      const TileSpan t = tile_span(rows, R, i % tile_count(B, R));
      for (int64_t r = 0; r < t.size; ++r) {
        const int64_t row = b0 + t.start + r;
        float* dst = x.data() + (b0 + t.start) * K + r;
        if (a.x_dtype == DType::kBFloat16) pack_row(dst, static_cast<const bf16*>(a.x) + row * K, K, t.size);
        else pack_row(dst, static_cast<const float*>(a.x) + row * K, K, t.size);
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
