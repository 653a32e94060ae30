// See cpu_norm.h. Memory-bound: bf16 rows use explicit vectors (norm_row_bf16); other dtypes three
// loops the compiler vectorises (#pragma omp simd). Compiled per instruction set (cpu_simd.h).
#include "cpu_norm.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace speedx {
namespace {

using namespace simd;

template <typename T>
SPEEDX_INLINE float rounded(float v) {  // v rounded to T, as an fp32
  T t;
  from_f32(v, &t);
  return to_f32(t);
}

// s: h floats of scratch.
template <typename T, bool kResidual>
SPEEDX_INLINE void norm_row(const RmsNormArgs& a, int64_t row, float* __restrict s) {
  const int64_t h = a.h;
  const T* __restrict x = static_cast<const T*>(a.x) + row * h;
  const T* __restrict w = static_cast<const T*>(a.weight);
  T* __restrict out = static_cast<T*>(a.out) + row * h;
  if constexpr (kResidual) {
    const T* __restrict res = static_cast<const T*>(a.residual) + row * h;
    T* __restrict sum_out = static_cast<T*>(a.residual_out) + row * h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      from_f32(to_f32(x[j]) + to_f32(res[j]), sum_out + j);
      s[j] = to_f32(sum_out[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) s[j] = to_f32(x[j]);
  }
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < h; ++j) squares += s[j] * s[j];
  const float r = 1.0f / std::sqrt(squares / float(h) + a.eps);
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) from_f32(to_f32(w[j]) * rounded<T>(s[j] * r), out + j);
}

// bf16 rows, 2W values per step: even and odd elements widen to two fp32 vectors (a shift and an
// and) and round_interleave_bf16 packs them back in order; scalar loops take the tail.
template <int W>
SPEEDX_INLINE void norm_row_bf16(const RmsNormArgs& a, int64_t row) {
  using F = typename Vec<W>::f;
  using U = typename Vec<W>::u;
  const int64_t h = a.h, body = h / (2 * W) * 2 * W;
  const bf16* x = static_cast<const bf16*>(a.x) + row * h;
  const bf16* res = a.residual ? static_cast<const bf16*>(a.residual) + row * h : nullptr;
  bf16* sum_out = a.residual ? static_cast<bf16*>(a.residual_out) + row * h : nullptr;
  const bf16* src = res ? sum_out : x;  // what gets normalised
  const bf16* w = static_cast<const bf16*>(a.weight);
  bf16* out = static_cast<bf16*>(a.out) + row * h;
  F squares{};
  for (int64_t j = 0; j < body; j += 2 * W) {
    U v;
    std::memcpy(&v, x + j, sizeof v);
    if (res) {
      U r;
      std::memcpy(&r, res + j, sizeof r);
      v = round_interleave_bf16<W>((F)(v << 16) + (F)(r << 16), (F)(v & 0xffff0000u) + (F)(r & 0xffff0000u));
      std::memcpy(sum_out + j, &v, sizeof v);
    }
    const F e = (F)(v << 16), o = (F)(v & 0xffff0000u);
    squares += e * e + o * o;
  }
  float total = 0.0f;
  for (int l = 0; l < W; ++l) total += squares[l];
  for (int64_t j = body; j < h; ++j) {
    float v = to_f32(x[j]);
    if (res) {
      from_f32(v + to_f32(res[j]), sum_out + j);
      v = to_f32(sum_out[j]);
    }
    total += v * v;
  }
  const float r = 1.0f / std::sqrt(total / float(h) + a.eps);
  for (int64_t j = 0; j < body; j += 2 * W) {
    U v, g;
    std::memcpy(&v, src + j, sizeof v);
    std::memcpy(&g, w + j, sizeof g);
    const U n = round_interleave_bf16<W>((F)(v << 16) * r, (F)(v & 0xffff0000u) * r);
    const U y = round_interleave_bf16<W>((F)(g << 16) * (F)(n << 16), (F)(g & 0xffff0000u) * (F)(n & 0xffff0000u));
    std::memcpy(out + j, &y, sizeof y);
  }
  for (int64_t j = body; j < h; ++j) from_f32(to_f32(w[j]) * rounded<bf16>(to_f32(src[j]) * r), out + j);
}

template <typename T, int W>
SPEEDX_INLINE void norm_rows(const RmsNormArgs& a, int64_t r0, int64_t r1, float* s) {
  for (int64_t row = r0; row < r1; ++row) {
    if constexpr (std::is_same_v<T, bf16>) norm_row_bf16<W>(a, row);
    else if (a.residual) norm_row<T, true>(a, row, s);
    else norm_row<T, false>(a, row, s);
  }
}

using RowsFn = void (*)(const RmsNormArgs&, int64_t, int64_t, float*);

template <typename T>
void rows_baseline(const RmsNormArgs& a, int64_t r0, int64_t r1, float* s) { norm_rows<T, 4>(a, r0, r1, s); }
#ifdef SPEEDX_X86_ISAS
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void rows_avx2(const RmsNormArgs& a, int64_t r0, int64_t r1, float* s) {
  norm_rows<T, 8>(a, r0, r1, s);
}
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void rows_avx512(const RmsNormArgs& a, int64_t r0, int64_t r1, float* s) {
  norm_rows<T, 16>(a, r0, r1, s);
}
#endif

template <typename T>
RowsFn pick(CpuIsa isa) {
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512) return rows_avx512<T>;
  if (isa == CpuIsa::kAvx2) return rows_avx2<T>;
#endif
  (void)isa;
  return rows_baseline<T>;
}

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  if (a.m < 0 || a.h < 1) throw std::invalid_argument("rms_norm: need m >= 0 and h >= 1");
  if (a.num_threads < 1) throw std::invalid_argument("rms_norm: num_threads must be >= 1");
  if (a.m == 0) return;
  if (!a.out || !a.x || !a.weight || (a.residual && !a.residual_out))
    throw std::invalid_argument("rms_norm: null data pointer");
  const CpuIsa isa = best_cpu_isa();
  const RowsFn fn = a.dtype == DType::kBFloat16 ? pick<bf16>(isa) : a.dtype == DType::kFloat16 ? pick<f16>(isa)
                                                                                                : pick<float>(isa);
  // Threads only pay off past a few rows' worth of work (a fork costs microseconds).
  [[maybe_unused]] const int nt = a.m * a.h >= (1 << 14) ? int(std::min<int64_t>(a.num_threads, a.m)) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    thread_local std::vector<float> scratch;
    scratch.resize(size_t(a.h));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.m; ++row) fn(a, row, row + 1, scratch.data());
  }
}

}  // namespace speedx
