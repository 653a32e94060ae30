// SwiGLU's activation on CPU for bf16: out = silu(gate) * up, rounding where transformers does.
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

struct SiluMulArgs {
  void* out;             // [m, i] bf16
  const void* gate_up;   // [m, 2i] bf16: each row the gate, then the up projection
  int64_t m, i;
  int num_threads;
};

// out = round(round(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) in fp32 (torch's silu on bf16,
// then a bf16 multiply). Checks the arguments (std::invalid_argument on a bad one).
void silu_mul_bf16(const SiluMulArgs& a);

}  // namespace speedx
