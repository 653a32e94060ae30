// RMSNorm with the residual add folded in, on CPU, rounding where Hugging Face's bf16/fp16 code does.
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

struct RmsNormArgs {
  void* out;             // [m, h]
  const void* residual;  // [m, h], or null. Given: x + residual (rounded) is normalised and
  void* residual_out;    // [m, h] stored here (may be residual itself)
  const void* x;         // [m, h]
  const void* weight;    // [h]
  int64_t m, h;
  float eps;
  DType dtype;           // of every tensor above
  int num_threads;
};

// Per row, like transformers' LlamaRMSNorm after `hidden = residual + hidden`:
//   s = round(x + residual); r = 1 / sqrt(mean(s^2) + eps) in fp32;
//   out = round(weight * round(s * r)).
// Checks the arguments (std::invalid_argument on a bad one).
void rms_norm(const RmsNormArgs& a);

}  // namespace speedx
