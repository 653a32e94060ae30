// Decode attention (one query token per sequence) read straight from a paged KV cache on CPU.
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

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
  DType dtype;
  int num_threads;
  CpuIsa isa = CpuIsa::kAuto;  // forcing a narrower path is for tests and benchmarks
};

// Checks the arguments (std::invalid_argument, i.e. ValueError in Python, on a bad one), then
// computes out = softmax(scale * q k^T) v per sequence and head in fp32, rounding once to dtype.
// Query head h reads KV head h / (num_heads / num_kv_heads). Touches no Python state.
void paged_decode_attention(const PagedDecodeArgs& a);

}  // namespace speedx
