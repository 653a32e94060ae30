// Rotary embedding of q and k straight out of the fused QKV projection, with k and v written to
// their paged-cache slots in the same pass (bf16, CPU).
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

struct RopeStoreArgs {
  void* q_out;               // [m, num_heads, head_dim] bf16
  void* k_cache;             // [num_slots, num_kv_heads, head_dim] bf16 (a layer's blocks, flattened)
  void* v_cache;             // same shape
  const void* qkv;           // [m, (num_heads + 2 * num_kv_heads) * head_dim] bf16: q, then k, then v
  const int64_t* positions;  // [m]
  const int64_t* slots;      // [m] cache slot of each token; -1: not stored
  const float* cos;          // [max_position, head_dim] fp32 tables
  const float* sin;
  int64_t m, num_heads, num_kv_heads, head_dim, max_position, num_slots;
  int num_threads;
};

// Rotate-half RoPE with transformers' bf16 rounding: c, s = bf16(cos), bf16(sin) at the token's
// position; out = bf16(bf16(x * c) + bf16(rotate_half(x) * s)). Checks the arguments
// (std::invalid_argument on a bad one, before anything is written).
void rope_store_bf16(const RopeStoreArgs& a);

}  // namespace speedx
