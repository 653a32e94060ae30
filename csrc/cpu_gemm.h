// Matmul with packed bf16 or GGUF-quantized weights on CPU, for the small row counts of decoding:
//   out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])   (an nn.Linear)
// The weights stay in their storage format in memory (bf16: half the bytes of fp32; Q4_0/Q4_1/Q8_0:
// GGUF's own 32-value blocks, 1/8 to 1/4 of them) and are widened or dequantized in registers;
// products accumulate in fp32 FMAs, or for bf16 weights on AVX512_BF16 CPUs in vdpbf16ps (two
// bf16 products per fp32 lane), which reads the same packed layout.
#pragma once

#include <cstdint>
#include <string>

#include "cpu_simd.h"

namespace speedx {

// Packed layout: panels of kGemmPanel output columns. bf16: panel p holds, for k = 0 .. K-1 in turn,
// the weights w[32p .. 32p+31, k] side by side (zeros past n); a panel row is one 64-byte load.
// Quantized formats: panel p holds, for each block of 32 k in turn, the 32 columns' fp16 scales (and
// Q4_1's fp16 minimums), then the block's quants in groups of 8 k (Q4) or 4 k (Q8): a group is 32
// little-endian 32-bit words, word e holding column c(e)'s quants of those k (k-th of the group at
// bits 4k or 8k). Scales and words are in "lane order": c(e) = 2e for e < 16, 2(e - 16) + 1 after (the
// even columns, then the odd ones), the order of the kernel's even/odd vectors at any SIMD width.
constexpr int64_t kGemmPanel = 32;
constexpr int64_t kQuantBlock = 32;  // k values per GGUF block (one scale each)

// Ids as in GGML's ggml_type (and gguf.GGMLQuantizationType), bf16 aside.
enum class WeightFormat { kBf16 = 30, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };
// "bf16" / "q4_0" / "q4_1" / "q8_0" (any case); throws std::invalid_argument naming `kernel` otherwise.
WeightFormat parse_weight_format(const std::string& name, const std::string& kernel);
int64_t gguf_block_bytes(WeightFormat f);  // bytes of one GGUF block of 32 values (quantized formats)

int64_t packed_weight_size(int64_t n, int64_t k);  // in bf16 elements
int64_t packed_weight_bytes(WeightFormat f, int64_t n, int64_t k);
// w: [n, k] bf16 bit patterns, row-major (an nn.Linear weight) -> packed[packed_weight_size(n, k)].
void pack_bf16_weight(const uint16_t* w, int64_t n, int64_t k, uint16_t* packed, int num_threads);
// blocks: a GGUF tensor's raw data, n rows of k / 32 blocks each -> packed[packed_weight_bytes(f, n, k)].
void pack_quant_weight(WeightFormat f, const uint8_t* blocks, int64_t n, int64_t k, uint8_t* packed,
                       int num_threads);

struct PackedWeightGemmArgs {
  void* out;               // [m, n] of out_dtype, C-contiguous
  const void* x;           // [m, k] of x_dtype, C-contiguous
  const void* packed;      // pack_bf16_weight() or pack_quant_weight() of a [n, k] weight
  const float* bias;       // [n], or null
  int64_t m, n, k;
  DType x_dtype, out_dtype;  // each kFloat32 or kBFloat16
  int num_threads;
  CpuIsa isa = CpuIsa::kAuto;  // best_gemm_isa(); forcing a narrower path is for tests and benchmarks
  // SwiGLU epilogue: weight rows interleave gate and up (row 2j: gate j, row 2j+1: up j); out is
  // [m, n / 2] bf16 with out[:, j] = silu(gate_j) * up_j, each rounded as transformers does.
  bool silu_mul = false;
  WeightFormat format = WeightFormat::kBf16;  // quantized formats need k % 32 == 0
};

// Checks the arguments (std::invalid_argument on a bad one), then computes the product. Each output
// is one fp32 FMA chain over k in order, plus the bias, rounded once to out_dtype: for a given SIMD
// path the result of a row does not depend on the other rows, on m or on the thread count.
// kAvx512Bf16 (bf16 weights; quantized ones run kAvx512): x is first rounded to bf16 and each pair
// (k, k+1) enters the chain as k+1 then k (vdpbf16ps, which also reads subnormals as zero), so it
// differs from the FMA chain only in summation order where x is bf16.
// Quantized weights are dequantized as gguf.quants does (d * q, d * q + m), exactly in fp32.
void gemm_packed_weight(const PackedWeightGemmArgs& a);

// Measured peak of fp32 FMA throughput (GFLOP/s, 2 flops per lane) of `isa` on `num_threads`
// threads: independent FMA chains on registers, no memory traffic; best of 30 repeats.
double fma_peak_gflops(CpuIsa isa, int num_threads);

}  // namespace speedx
