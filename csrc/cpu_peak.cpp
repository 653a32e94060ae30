// fma_peak_gflops (cpu_gemm.h): the FMA throughput a GEMM's GFLOP/s is measured against.
#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "cpu_gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace speedx {
namespace {

using namespace simd;

// 12 independent chains: enough to cover FMA latency x FMA ports on current x86 cores (4 x 2),
// and with the two constants they fit 16 registers.
constexpr int kChains = 12;
constexpr int64_t kIters = 1 << 20;  // ~3 ms: short enough to fall between other processes' time slices

template <int W>
SPEEDX_INLINE float chains(float seed) {
  using F = typename Vec<W>::f;
  F acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = F{} + seed * float(c + 1);
  const F a = F{} + 0.999999f, b = F{} + 1e-7f;
  for (int64_t i = 0; i < kIters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
  }
  float sum = 0;
  for (int c = 0; c < kChains; ++c) sum += acc[c][0];
  return sum;
}

using ChainFn = float (*)(float);
float chains_baseline(float s) { return chains<4>(s); }
#ifdef SPEEDX_X86_ISAS
__attribute__((target("arch=x86-64-v3"))) float chains_avx2(float s) { return chains<8>(s); }
__attribute__((target("arch=x86-64-v4"))) float chains_avx512(float s) { return chains<16>(s); }
#endif

}  // namespace

double fma_peak_gflops(CpuIsa isa, int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("fma_peak_gflops: num_threads must be >= 1");
  if (isa == CpuIsa::kAuto) isa = best_cpu_isa();
  ChainFn fn = chains_baseline;
  int width = 4;
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) fn = chains_avx512, width = 16;
  if (isa == CpuIsa::kAvx2) fn = chains_avx2, width = 8;
#endif
  double best = 0;
  volatile float sink = 0;
  for (int repeat = 0; repeat < 30; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    float sum = 0;
#pragma omp parallel num_threads(num_threads) reduction(+ : sum)
    sum += fn(1e-3f);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    sink = sink + sum;
    best = std::max(best, 2.0 * width * kChains * double(kIters) * num_threads / s / 1e9);
  }
  (void)sink;
  return best;
}

}  // namespace speedx
