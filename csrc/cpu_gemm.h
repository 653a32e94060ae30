// Matmul with bf16 weights on CPU, for the small row counts of decoding:
//   out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])   (an nn.Linear)
// The weights stay bf16 in memory (half the bytes of widened fp32 weights, the same values) and are
// widened in registers; products accumulate in fp32 FMAs.
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

// Packed layout: panels of kGemmPanel output columns; panel p holds, for k = 0 .. K-1 in turn, the
// weights w[32p .. 32p+31, k] side by side (zeros past n). A panel row is one 64-byte load.
constexpr int64_t kGemmPanel = 32;

int64_t packed_weight_size(int64_t n, int64_t k);  // in bf16 elements
// w: [n, k] bf16 bit patterns, row-major (an nn.Linear weight) -> packed[packed_weight_size(n, k)].
void pack_bf16_weight(const uint16_t* w, int64_t n, int64_t k, uint16_t* packed, int num_threads);

struct Bf16WeightGemmArgs {
  void* out;               // [m, n] of out_dtype, C-contiguous
  const void* x;           // [m, k] of x_dtype, C-contiguous
  const uint16_t* packed;  // pack_bf16_weight() of a [n, k] weight
  const float* bias;       // [n], or null
  int64_t m, n, k;
  DType x_dtype, out_dtype;  // each kFloat32 or kBFloat16
  int num_threads;
  CpuIsa isa = CpuIsa::kAuto;  // forcing a narrower path is for tests and benchmarks
  // SwiGLU epilogue: weight rows interleave gate and up (row 2j: gate j, row 2j+1: up j); out is
  // [m, n / 2] bf16 with out[:, j] = silu(gate_j) * up_j, each rounded as transformers does.
  bool silu_mul = false;
};

// Checks the arguments (std::invalid_argument on a bad one), then computes the product. Each output
// is one fp32 FMA chain over k in order, plus the bias, rounded once to out_dtype: for a given SIMD
// path the result of a row does not depend on the other rows, on m or on the thread count.
void gemm_bf16_weight(const Bf16WeightGemmArgs& a);

}  // namespace speedx
