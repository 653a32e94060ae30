// See cpu_activation.h. 2W bf16 per step: even and odd elements widen to two fp32 vectors (a shift
// and an and), and round_interleave_bf16 packs them back in order. SIMD: see cpu_simd.h.
#include "cpu_activation.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace speedx {
namespace {

using namespace simd;

SPEEDX_INLINE float silu_mul_scalar(bf16 g, bf16 u) {
  const float x = to_f32(g);
  bf16 s;
  from_f32(x / (1.0f + std::exp(-x)), &s);
  return to_f32(s) * to_f32(u);
}

template <int W>
SPEEDX_INLINE void silu_mul_row(const SiluMulArgs& a, int64_t row) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  const bf16* gate = static_cast<const bf16*>(a.gate_up) + row * 2 * a.i;
  const bf16* up = gate + a.i;
  bf16* out = static_cast<bf16*>(a.out) + row * a.i;
  int64_t j = 0;
  for (; j + 2 * W <= a.i; j += 2 * W) {
    U g, u;
    std::memcpy(&g, gate + j, sizeof g);
    std::memcpy(&u, up + j, sizeof u);
    const F ge = (F)(g << 16), go = (F)(g & 0xffff0000u);
    const U product = round_interleave_bf16<W>(swiglu_bf16<W>(ge, (F)(u << 16)), swiglu_bf16<W>(go, (F)(u & 0xffff0000u)));
    std::memcpy(out + j, &product, sizeof product);
  }
  for (; j < a.i; ++j) from_f32(silu_mul_scalar(gate[j], up[j]), out + j);
}

using RowFn = void (*)(const SiluMulArgs&, int64_t);
void row_baseline(const SiluMulArgs& a, int64_t row) { silu_mul_row<4>(a, row); }
#ifdef SPEEDX_X86_ISAS
__attribute__((target("arch=x86-64-v3"))) void row_avx2(const SiluMulArgs& a, int64_t row) { silu_mul_row<8>(a, row); }
__attribute__((target("arch=x86-64-v4"))) void row_avx512(const SiluMulArgs& a, int64_t row) {
  silu_mul_row<16>(a, row);
}
#endif

RowFn pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return row_avx512;
  if (isa == CpuIsa::kAvx2) return row_avx2;
#endif
  (void)isa;
  return row_baseline;
}

}  // namespace

void silu_mul_bf16(const SiluMulArgs& a) {
  if (a.m < 0 || a.i < 1) throw std::invalid_argument("silu_mul_bf16: need m >= 0 and i >= 1");
  if (a.num_threads < 1) throw std::invalid_argument("silu_mul_bf16: num_threads must be >= 1");
  if (a.m == 0) return;
  if (!a.out || !a.gate_up) throw std::invalid_argument("silu_mul_bf16: null data pointer");
  const RowFn fn = pick(best_cpu_isa());
  [[maybe_unused]] const int nt = a.m * a.i >= (1 << 15) ? int(std::min<int64_t>(a.num_threads, a.m)) : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t row = 0; row < a.m; ++row) fn(a, row);
}

}  // namespace speedx
