#include "cpu_simd.h"

#include <stdexcept>

namespace speedx {

CpuIsa best_cpu_isa() {
#ifdef SPEEDX_X86_ISAS
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa best_gemm_isa() {
  const CpuIsa isa = best_cpu_isa();
#ifdef SPEEDX_X86_ISAS
  if (isa == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512Bf16;
#endif
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512Bf16 ? "avx512bf16"
         : isa == CpuIsa::kAvx512  ? "avx512"
         : isa == CpuIsa::kAvx2    ? "avx2"
                                   : "baseline";
}

CpuIsa parse_cpu_isa(const std::string& name, const std::string& kernel, bool bf16) {
  if (name == "auto") return CpuIsa::kAuto;
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (name != cpu_isa_name(isa) || (isa == CpuIsa::kAvx512Bf16 && !bf16)) continue;
    if (int(isa) > int(bf16 ? best_gemm_isa() : best_cpu_isa()))
      throw std::invalid_argument(kernel + ": this CPU (or build) does not support isa '" + name + "'");
    return isa;
  }
  throw std::invalid_argument(kernel + ": isa must be 'auto', " + (bf16 ? "'avx512bf16', " : "") +
                              "'avx512', 'avx2' or 'baseline', got '" + name + "'");
}

DType parse_dtype(const std::string& name, const std::string& kernel) {
  const std::string n = name.rfind("torch.", 0) == 0 ? name.substr(6) : name;
  if (n == "float32" || n == "float" || n == "fp32") return DType::kFloat32;
  if (n == "float16" || n == "half" || n == "fp16") return DType::kFloat16;
  if (n == "bfloat16" || n == "bf16") return DType::kBFloat16;
  throw std::invalid_argument(kernel + ": dtype must be 'bfloat16', 'float16' or 'float32', got '" + name + "'");
}

}  // namespace speedx
