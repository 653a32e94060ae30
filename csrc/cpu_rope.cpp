// See cpu_rope.h. Per token: cos/sin rounded once, then every q and k head rotated with loops the
// compiler vectorises (#pragma omp simd); v is a row copy. SIMD: see cpu_simd.h.
#include "cpu_rope.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace speedx {
namespace {

using namespace simd;

SPEEDX_INLINE float bf16_round(float v) {
  bf16 t;
  from_f32(v, &t);
  return to_f32(t);
}

// x, out: one head; c, s: the token's rounded cos / sin.
SPEEDX_INLINE void rotate(const bf16* __restrict x, bf16* __restrict out, const float* __restrict c,
                          const float* __restrict s, int64_t half) {
#pragma omp simd
  for (int64_t d = 0; d < half; ++d)  // first half: x * c - x[d + half] * s
    from_f32(bf16_round(to_f32(x[d]) * c[d]) + bf16_round(-to_f32(x[d + half]) * s[d]), out + d);
#pragma omp simd
  for (int64_t d = half; d < 2 * half; ++d)  // second half: x * c + x[d - half] * s
    from_f32(bf16_round(to_f32(x[d]) * c[d]) + bf16_round(to_f32(x[d - half]) * s[d]), out + d);
}

SPEEDX_INLINE void rope_token(const RopeStoreArgs& a, int64_t t, float* __restrict cs) {
  const int64_t D = a.head_dim, H = a.num_heads, KV = a.num_kv_heads;
  float* c = cs;
  float* s = cs + D;
  const float* cos = a.cos + a.positions[t] * D;
  const float* sin = a.sin + a.positions[t] * D;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    c[d] = bf16_round(cos[d]);
    s[d] = bf16_round(sin[d]);
  }
  const bf16* row = static_cast<const bf16*>(a.qkv) + t * (H + 2 * KV) * D;
  bf16* q_out = static_cast<bf16*>(a.q_out) + t * H * D;
  for (int64_t h = 0; h < H; ++h) rotate(row + h * D, q_out + h * D, c, s, D / 2);
  const int64_t slot = a.slots[t];
  if (slot < 0) return;
  bf16* k_dst = static_cast<bf16*>(a.k_cache) + slot * KV * D;
  for (int64_t h = 0; h < KV; ++h) rotate(row + (H + h) * D, k_dst + h * D, c, s, D / 2);
  std::copy(row + (H + KV) * D, row + (H + 2 * KV) * D, static_cast<bf16*>(a.v_cache) + slot * KV * D);
}

using TokenFn = void (*)(const RopeStoreArgs&, int64_t, float*);
void token_baseline(const RopeStoreArgs& a, int64_t t, float* cs) { rope_token(a, t, cs); }
#ifdef SPEEDX_X86_ISAS
__attribute__((target("arch=x86-64-v3"))) void token_avx2(const RopeStoreArgs& a, int64_t t, float* cs) {
  rope_token(a, t, cs);
}
__attribute__((target("arch=x86-64-v4"))) void token_avx512(const RopeStoreArgs& a, int64_t t, float* cs) {
  rope_token(a, t, cs);
}
#endif

TokenFn pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return token_avx512;
  if (isa == CpuIsa::kAvx2) return token_avx2;
#endif
  (void)isa;
  return token_baseline;
}

void fail(const std::string& msg) { throw std::invalid_argument("rope_store_bf16: " + msg); }

}  // namespace

void rope_store_bf16(const RopeStoreArgs& a) {
  if (a.m < 0 || a.num_heads < 1 || a.num_kv_heads < 1 || a.head_dim < 2 || a.head_dim % 2)
    fail("need m >= 0, num_heads >= 1, num_kv_heads >= 1 and an even head_dim >= 2");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
  if (a.m == 0) return;
  if (!a.q_out || !a.k_cache || !a.v_cache || !a.qkv || !a.positions || !a.slots || !a.cos || !a.sin)
    fail("null data pointer");
  for (int64_t t = 0; t < a.m; ++t) {  // all checks before any write
    if (a.positions[t] < 0 || a.positions[t] >= a.max_position)
      fail("positions[" + std::to_string(t) + "] = " + std::to_string(a.positions[t]) + " is outside [0, " +
           std::to_string(a.max_position) + ")");
    if (a.slots[t] < -1 || a.slots[t] >= a.num_slots)
      fail("slots[" + std::to_string(t) + "] = " + std::to_string(a.slots[t]) + " is outside [-1, " +
           std::to_string(a.num_slots) + ")");
  }
  const TokenFn fn = pick(best_cpu_isa());
  const int64_t work = a.m * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim;
  [[maybe_unused]] const int nt = work >= (1 << 14) ? int(std::min<int64_t>(a.num_threads, a.m)) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    thread_local std::vector<float> cs;
    cs.resize(size_t(2 * a.head_dim));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.m; ++t) fn(a, t, cs.data());
  }
}

}  // namespace speedx
