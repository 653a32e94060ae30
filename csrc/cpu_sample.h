// The random draw of token sampling on CPU: softmax(logits / T) inverted at a given uniform.
#pragma once

#include <cstdint>

#include "cpu_simd.h"

namespace speedx {

struct SampleArgs {
  int64_t* tokens;           // [m] out
  const float* logits;       // [m, v] fp32 rows, `stride` floats apart (masked-out tokens at -inf)
  const float* temperature;  // [m], > 0
  const double* uniforms;    // [m], in [0, 1)
  const float* top_p;        // [m], in (0, 1]; 1 = off
  int64_t m, v, stride;
  int num_threads;
};

// tokens[r] = the first token whose cumulative weight exceeds uniforms[r] times the row's total,
// the weights being exp(logits / T - max) in fp64: the inverse-CDF draw of sampler.py's PyTorch
// twin, which it matches unless summation order moves a boundary across the uniform (~1e-16
// relative). Weights more than 708 below the max are 0 (the twin keeps them down to 1e-324; a
// 53-bit uniform never lands on them). A row with no finite logit gives v - 1, like the twin.
// top_p < 1 first keeps only the nucleus, as the twin's mask does: every token whose weight is at
// least that of the lightest token whose heavier tokens weigh < top_p of the total (ties all kept;
// found by a radix select on the weights' bits, no full sort).
// Checks the arguments (std::invalid_argument on a bad one).
void sample_rows(const SampleArgs& a);

}  // namespace speedx
