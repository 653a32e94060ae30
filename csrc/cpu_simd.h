// SIMD helpers shared by the CPU kernels (cpu_attention.cpp, cpu_gemm.cpp): GCC vector types of W
// floats, bf16/fp16 <-> fp32 conversions, and the run-time choice of instruction set.
//
// Kernels are written once with GCC vector extensions, templated on W, and compiled for AVX-512
// (W = 16), AVX2 + FMA (W = 8) and baseline SSE2 (W = 4) through per-function target attributes;
// the widest the CPU supports is picked at run time, so the wheel runs on any x86-64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vectors are passed by value only inside inlined code
#if __GNUC__ >= 12 && defined(__x86_64__)  // (older GCCs lack target("arch=x86-64-v4"))
#define SPEEDX_X86_ISAS 1
#endif
#endif
#define SPEEDX_INLINE inline __attribute__((always_inline))

namespace speedx {

// SIMD code path: x86-64 baseline (SSE2), x86-64-v3 (AVX2 + FMA), x86-64-v4 (AVX-512), and
// x86-64-v4 + AVX512_BF16, which only the bf16-weight matmul has a path for (cpu_gemm.h).
enum class CpuIsa { kAuto = -1, kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
CpuIsa best_cpu_isa();   // the widest path this CPU and build support, at most kAvx512
CpuIsa best_gemm_isa();  // best_cpu_isa(), or kAvx512Bf16 where the CPU has AVX512_BF16 too
const char* cpu_isa_name(CpuIsa isa);  // "baseline" / "avx2" / "avx512" / "avx512bf16"
// "auto" or a cpu_isa_name() ("avx512bf16" only with `bf16`, for the matmul); throws
// std::invalid_argument naming `kernel` for unknown or unsupported names.
CpuIsa parse_cpu_isa(const std::string& name, const std::string& kernel, bool bf16 = false);

enum class DType { kFloat32, kFloat16, kBFloat16 };
// "float32" / "float16" / "bfloat16" (also "torch.<name>", "fp32", "fp16", "bf16", "float",
// "half"); throws std::invalid_argument naming `kernel` otherwise.
DType parse_dtype(const std::string& name, const std::string& kernel);

namespace simd {

// Explicit alignment: otherwise a 64-byte vector declared outside AVX-512 code gets 16, while
// the AVX-512 code that uses it assumes 64.
template <int W> struct Vec {
  typedef float f __attribute__((vector_size(W * 4), aligned(W * 4)));
  typedef int32_t i __attribute__((vector_size(W * 4), aligned(W * 4)));
  typedef uint32_t u __attribute__((vector_size(W * 4), aligned(W * 4)));
  typedef uint16_t h __attribute__((vector_size(W * 2), aligned(W * 2)));
};

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

SPEEDX_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
SPEEDX_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Scalar conversions, branch-free (selects only) so that loops over them vectorise.
SPEEDX_INLINE float to_f32(float x) { return x; }
SPEEDX_INLINE float to_f32(bf16 x) { return as_float(uint32_t(x.bits) << 16); }
// Subnormals go through an exact int -> float convert rather than denormal float arithmetic,
// which flush-to-zero / denormals-are-zero modes would break.
SPEEDX_INLINE float to_f32(f16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16, em = x.bits & 0x7fffu;
  const uint32_t normal = ((em << 13) + (112u << 23)) | (em >= 0x7c00u ? 0x7f800000u : 0u);  // inf/nan
  // A mask, not ?:, so GCC cannot sink the float op into a branch (it won't if-convert those).
  const uint32_t sub = as_bits(float(int32_t(em)) * 0x1p-24f), is_sub = 0u - uint32_t(em < 0x400u);
  return as_float((sub & is_sub) | (normal & ~is_sub) | sign);
}

// Round to nearest even.
SPEEDX_INLINE void from_f32(float f, float* out) { *out = f; }
SPEEDX_INLINE void from_f32(float f, bf16* out) {
  const uint32_t u = as_bits(f), r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  out->bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);  // nan stays nan
}
SPEEDX_INLINE void from_f32(float f, f16* out) {  // after F. Giesen's float_to_half_fast3_rtne
  const uint32_t u = as_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias 127 -> 15, round
  const uint32_t sub = as_bits(as_float(a) + 0.5f) - 0x3f000000u;       // half ulp 2^-24 -> bit 0
  const uint32_t is_sub = 0u - uint32_t(a < 0x38800000u);               // mask: see to_f32(f16)
  uint32_t r = (sub & is_sub) | (normal & ~is_sub);
  r = a >= 0x477ff000u ? 0x7c00u : r;  // >= 65520 rounds to inf
  r = a > 0x7f800000u ? 0x7e00u : r;   // nan
  out->bits = uint16_t(sign | r);
}

// Lane i of the result <- lane I_i of the concatenation x:y.
template <int W, typename F, int... I>
SPEEDX_INLINE F shuffle(const F& x, const F& y, std::integer_sequence<int, I...>) {
#ifdef __clang__
  return __builtin_shufflevector(x, y, I...);
#else
  return __builtin_shuffle(x, y, typename Vec<W>::i{I...});
#endif
}

// W fp32 lanes each of e (even columns) and o (odd columns) -> 2W bf16 in column order (one
// vector of W uint32), rounded to nearest even; NaN stays NaN.
template <int W>
SPEEDX_INLINE typename Vec<W>::u round_interleave_bf16(const typename Vec<W>::f& even, const typename Vec<W>::f& odd) {
  using U = typename Vec<W>::u;
  const U e = (U)even, o = (U)odd;
  const U re = (e & 0x7fffffffu) > 0x7f800000u ? (e >> 16) | 0x40u : (e + 0x7fffu + ((e >> 16) & 1u)) >> 16;
  const U ro = (o & 0x7fffffffu) > 0x7f800000u ? o | 0x400000u : o + 0x7fffu + ((o >> 16) & 1u);
  return re | (ro & 0xffff0000u);
}

// x rounded to bf16 (nearest even; NaN stays NaN), kept as fp32 values.
template <int W>
SPEEDX_INLINE typename Vec<W>::f round_bf16(const typename Vec<W>::f& x) {
  using U = typename Vec<W>::u;
  const U u = (U)x;
  const U r = (u & 0x7fffffffu) > 0x7f800000u ? u | 0x400000u : u + 0x7fffu + ((u >> 16) & 1u);
  return (typename Vec<W>::f)(r & 0xffff0000u);
}

// W values already rounded to bf16 (round_bf16) -> their W bf16 bit patterns.
template <int W>
SPEEDX_INLINE typename Vec<W>::h bf16_bits(const typename Vec<W>::f& rounded) {
  return __builtin_convertvector((typename Vec<W>::u)rounded >> 16, typename Vec<W>::h);
}

// exp(x) on vectors (Cephes expf polynomial, ~1 ulp): exactly 0 below -87 (so that -inf scores
// get zero weight), inf above 88.7.
template <typename F>
SPEEDX_INLINE F vexp(const F& x) {
  using I = decltype(x < x);  // the matching int vector
  const F lo = F{} - 87.0f, hi = F{} + 88.0f;
  const F xc = x < lo ? lo : x > hi ? hi : x;
  const F n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const F r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;           // x - n ln2, in two parts
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;  // 2^n, n in [-126, 127]
  return x < lo ? F{} : x > 88.7f ? F{} + INFINITY : y * (F)e;
}

// transformers' bf16 SwiGLU activation on values already rounded to bf16:
// round(round(silu(gate)) * up), silu(g) = g / (1 + exp(-g)) in fp32.
template <int W>
SPEEDX_INLINE typename Vec<W>::f swiglu_bf16(const typename Vec<W>::f& gate, const typename Vec<W>::f& up) {
  return round_bf16<W>(round_bf16<W>(gate / (1.0f + vexp(-gate))) * up);
}

}  // namespace simd
}  // namespace speedx
