// Decode attention (one query token per sequence) read straight from a paged KV cache on CPU.
#pragma once

#include <cstdint>
#include <string>

namespace speedx {

enum class AttnDType { kFloat32, kFloat16, kBFloat16 };
// SIMD code path: x86-64 baseline (SSE2), x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512).
enum class CpuIsa { kAuto = -1, kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// "float32" / "float16" / "bfloat16" (also "torch.<name>", "fp32", "fp16", "bf16", "float",
// "half"); throws std::invalid_argument otherwise.
AttnDType parse_attn_dtype(const std::string& name);

CpuIsa best_cpu_isa();  // the widest path this CPU and build support
const char* cpu_isa_name(CpuIsa isa);  // "baseline" / "avx2" / "avx512"
// "auto" or a cpu_isa_name(); throws std::invalid_argument for unknown or unsupported names.
CpuIsa parse_cpu_isa(const std::string& name);

struct PagedDecodeArgs {
  void* out;              // [batch, num_heads, head_dim]
  const void* q;          // [batch, num_heads, head_dim]
  const void* k_cache;    // [num_blocks, block_size, num_kv_heads, head_dim]
  const void* v_cache;    // same shape as k_cache
  const int32_t* block_tables;  // [batch, max_blocks], C-contiguous
  const int32_t* kv_lens;       // [batch]
  int64_t batch, max_blocks, num_blocks;
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  AttnDType dtype;
  int num_threads;
  CpuIsa isa = CpuIsa::kAuto;  // forcing a narrower path is for tests and benchmarks
};

// Checks the arguments (std::invalid_argument, i.e. ValueError in Python, on a bad one), then
// computes out = softmax(scale * q k^T) v per sequence and head in fp32, rounding once to dtype.
// Query head h reads KV head h / (num_heads / num_kv_heads). Touches no Python state.
void paged_decode_attention(const PagedDecodeArgs& a);

}  // namespace speedx
