// Python bindings for speedx._C. Array arguments are validated here so the
// core (block_pool.cpp) only sees raw contiguous buffers.
#include <memory>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_pool.h"
#include "cpu_activation.h"
#include "cpu_sample.h"
#include "cpu_attention.h"
#include "cpu_gemm.h"
#include "cpu_norm.h"
#include "cpu_rope.h"

namespace py = pybind11;
using speedx::BlockPool;

namespace {

template <typename T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);  // dtype equivalence, any layout
}

// Check dtype / rank / layout of a numpy argument; ValueError on mismatch.
template <typename T>
void check_array(const py::array& a, const char* name, int ndim, bool writable) {
  if (!has_dtype<T>(a))
    throw py::value_error(std::string(name) + " must have dtype " +
                          py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                          py::str(a.dtype()).cast<std::string>());
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

// token_ids: a sequence of ints or a 1-D int32/int64 array.
std::vector<int64_t> to_tokens(const py::handle& obj) {
  if (py::isinstance<py::array>(obj)) {
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.ndim() != 1) throw py::value_error("token_ids must be 1-D");
    if (has_dtype<int64_t>(a)) {
      auto v = a.unchecked<int64_t, 1>();
      std::vector<int64_t> out(v.shape(0));
      for (py::ssize_t i = 0; i < v.shape(0); ++i) out[i] = v(i);
      return out;
    }
    if (has_dtype<int32_t>(a)) {
      auto v = a.unchecked<int32_t, 1>();
      std::vector<int64_t> out(v.shape(0));
      for (py::ssize_t i = 0; i < v.shape(0); ++i) out[i] = v(i);
      return out;
    }
    throw py::value_error("token_ids array must have dtype int32 or int64");
  }
  try {
    return py::cast<std::vector<int64_t>>(obj);
  } catch (const py::cast_error&) {
    throw py::value_error("token_ids must be a list of ints or a 1-D int32/int64 array");
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "speedx native extension: paged KV-cache block pool";

  py::register_exception<speedx::UnknownSequence>(m, "UnknownSequenceError", PyExc_KeyError);

  py::class_<BlockPool>(m, "BlockPool")
      .def(py::init([](int64_t num_blocks, int64_t block_size, bool caching, bool constant_hash,
                       bool unchained_hash) {
             if (constant_hash && unchained_hash)
               throw py::value_error("pick at most one _debug_*_hash option");
             auto mode = constant_hash    ? speedx::DebugHash::kConstant
                         : unchained_hash ? speedx::DebugHash::kUnchained
                                          : speedx::DebugHash::kNone;
             return std::make_unique<BlockPool>(num_blocks, block_size, caching, mode);
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching") = true,
           py::kw_only(), py::arg("_debug_constant_hash") = false,
           py::arg("_debug_unchained_hash") = false)
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("block_size", &BlockPool::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockPool::enable_prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockPool::num_free_blocks)
      .def_property_readonly("num_cached_blocks", &BlockPool::num_cached_blocks)
      .def_property_readonly("num_sequences", &BlockPool::num_sequences)
      .def_property_readonly("num_query_tokens", &BlockPool::num_query_tokens)
      .def_property_readonly("num_hit_tokens", &BlockPool::num_hit_tokens)
      .def(
          "allocate_sequence",
          [](BlockPool& p, int64_t seq_id, const py::object& token_ids, int64_t num_tokens) {
            return p.allocate_sequence(seq_id, to_tokens(token_ids), num_tokens);
          },
          py::arg("seq_id"), py::arg("token_ids"), py::arg("num_tokens"))
      .def("ensure_capacity", &BlockPool::ensure_capacity, py::arg("seq_id"),
           py::arg("num_computed"), py::arg("num_tokens"))
      .def(
          "register_blocks",
          [](BlockPool& p, int64_t seq_id, const py::object& token_ids) {
            auto t = to_tokens(token_ids);
            return p.register_blocks(seq_id, t.data(), static_cast<int64_t>(t.size()));
          },
          py::arg("seq_id"), py::arg("token_ids"))
      .def("fork", &BlockPool::fork, py::arg("parent_seq_id"), py::arg("child_seq_id"))
      .def("free_sequence", &BlockPool::free_sequence, py::arg("seq_id"))
      .def("has_sequence", &BlockPool::has_sequence, py::arg("seq_id"))
      .def("block_table", &BlockPool::block_table, py::arg("seq_id"))  // copied to a list
      .def(
          "num_sequence_blocks",
          [](const BlockPool& p, int64_t seq_id) {
            return static_cast<int64_t>(p.block_table(seq_id).size());
          },
          py::arg("seq_id"))
      .def("ref_count", &BlockPool::ref_count, py::arg("block_id"))
      .def("reset_prefix_cache", &BlockPool::reset_prefix_cache)
      .def("take_copies",
           [](BlockPool& p) {
             auto pairs = p.take_copies();
             py::array_t<int64_t> out({static_cast<py::ssize_t>(pairs.size()), py::ssize_t{2}});
             auto v = out.mutable_unchecked<2>();
             for (size_t i = 0; i < pairs.size(); ++i) {
               v(i, 0) = pairs[i][0];
               v(i, 1) = pairs[i][1];
             }
             return out;
           })
      .def(
          "build_block_tables",
          [](const BlockPool& p, const py::array& seq_ids, py::array& out) {
            check_array<int64_t>(seq_ids, "seq_ids", 1, false);
            check_array<int32_t>(out, "out", 2, true);
            if (out.shape(0) != seq_ids.shape(0))
              throw py::value_error("out must have one row per seq_id");
            p.build_block_tables(static_cast<const int64_t*>(seq_ids.data()), seq_ids.shape(0),
                                 static_cast<int32_t*>(out.mutable_data()), out.shape(1));
          },
          py::arg("seq_ids"), py::arg("out"))
      .def(
          "build_slot_mapping",
          [](const BlockPool& p, const py::array& seq_ids, const py::array& starts,
             const py::array& ends, py::array& out) {
            check_array<int64_t>(seq_ids, "seq_ids", 1, false);
            check_array<int64_t>(starts, "starts", 1, false);
            check_array<int64_t>(ends, "ends", 1, false);
            check_array<int64_t>(out, "out", 1, true);
            const auto n = seq_ids.shape(0);
            if (starts.shape(0) != n || ends.shape(0) != n)
              throw py::value_error("seq_ids, starts and ends must have the same length");
            p.build_slot_mapping(static_cast<const int64_t*>(seq_ids.data()),
                                 static_cast<const int64_t*>(starts.data()),
                                 static_cast<const int64_t*>(ends.data()), n,
                                 static_cast<int64_t*>(out.mutable_data()), out.shape(0));
          },
          py::arg("seq_ids"), py::arg("starts"), py::arg("ends"), py::arg("out"));

  // Decode attention over a paged KV cache; tensors come as data_ptr() ints (see cpu_attention.h).
  m.def(
      "paged_decode_attention",
      [](uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, const py::array& block_tables,
         const py::array& kv_lens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
         int64_t block_size, int64_t num_blocks, float scale, const std::string& dtype, int num_threads,
         const std::string& isa) {
        check_array<int32_t>(block_tables, "block_tables", 2, false);
        check_array<int32_t>(kv_lens, "kv_lens", 1, false);
        if (kv_lens.shape(0) != block_tables.shape(0))
          throw py::value_error("kv_lens must have one entry per block_tables row");
        const speedx::PagedDecodeArgs args{
            reinterpret_cast<void*>(out), reinterpret_cast<const void*>(q),
            reinterpret_cast<const void*>(k_cache), reinterpret_cast<const void*>(v_cache),
            static_cast<const int32_t*>(block_tables.data()), static_cast<const int32_t*>(kv_lens.data()),
            block_tables.shape(0), block_tables.shape(1), num_blocks, num_heads, num_kv_heads, head_dim,
            block_size, scale, speedx::parse_dtype(dtype, "paged_decode_attention"), num_threads, speedx::parse_cpu_isa(isa, "paged_decode_attention")};
        py::gil_scoped_release nogil;
        speedx::paged_decode_attention(args);
      },
      py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("kv_lens"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("block_size"), py::arg("num_blocks"), py::arg("scale"), py::arg("dtype"),
      py::arg("num_threads"), py::kw_only(), py::arg("_debug_isa") = "auto",
      "Decode attention (one query token per sequence) over a paged KV cache, on CPU, GIL released.\n"
      "out/q/k_cache/v_cache: data_ptr() of C-contiguous tensors of `dtype` ('bfloat16', 'float16',\n"
      "'float32'); q and out [batch, num_heads, head_dim], caches [num_blocks, block_size,\n"
      "num_kv_heads, head_dim]; block_tables int32 [batch, max_blocks], kv_lens int32 [batch].\n"
      "_debug_isa forces a narrower SIMD path ('avx2', 'baseline') for tests.");
  // bf16-weight matmul for CPU decoding (cpu_gemm.h); tensors come as data_ptr() ints.
  m.def("packed_weight_size", &speedx::packed_weight_size, py::arg("n"), py::arg("k"),
        "bf16 elements of pack_bf16_weight's output for an [n, k] weight.");
  m.def(
      "pack_bf16_weight",
      [](uintptr_t w, int64_t n, int64_t k, uintptr_t packed, int num_threads) {
        py::gil_scoped_release nogil;
        speedx::pack_bf16_weight(reinterpret_cast<const uint16_t*>(w), n, k, reinterpret_cast<uint16_t*>(packed),
                                 num_threads);
      },
      py::arg("w"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("num_threads"),
      "Packs a C-contiguous bf16 [n, k] weight (data_ptr) into packed_weight_size(n, k) bf16 elements.");
  auto gemm = [](const char* kernel) {
    return [kernel](uintptr_t out, uintptr_t x, uintptr_t packed, uintptr_t bias, int64_t m, int64_t n, int64_t k,
                    const std::string& x_dtype, const std::string& out_dtype, int num_threads, bool silu_mul,
                    const std::string& weight_format, const std::string& isa) {
      const speedx::PackedWeightGemmArgs args{
          reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(packed),
          reinterpret_cast<const float*>(bias), m, n, k, speedx::parse_dtype(x_dtype, kernel),
          speedx::parse_dtype(out_dtype, kernel), num_threads, speedx::parse_cpu_isa(isa, kernel, true), silu_mul,
          speedx::parse_weight_format(weight_format, kernel)};
      py::gil_scoped_release nogil;
      speedx::gemm_packed_weight(args);
    };
  };
  const char* gemm_doc =
      "out[m, n] = x[m, k] @ w.T (+ bias) with w packed by pack_bf16_weight (weight_format 'bf16') or\n"
      "pack_quant_weight ('q4_0', 'q4_1', 'q8_0'), on CPU, GIL released.\n"
      "out/x/packed/bias: data_ptr() of C-contiguous tensors (bias fp32 [n], or 0 for none); x and out\n"
      "'float32' or 'bfloat16'. silu_mul: SwiGLU epilogue, out [m, n / 2] (see cpu_gemm.h). _debug_isa\n"
      "forces a narrower SIMD path ('avx512', 'avx2', 'baseline') than gemm_isa() for tests and benchmarks.";
  for (const char* name : {"gemm_bf16_weight", "gemm_packed_weight"})
    m.def(name, gemm(name), py::arg("out"), py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("m"),
          py::arg("n"), py::arg("k"), py::arg("x_dtype"), py::arg("out_dtype"), py::arg("num_threads"),
          py::arg("silu_mul") = false, py::kw_only(), py::arg("weight_format") = "bf16", py::arg("_debug_isa") = "auto",
          gemm_doc);
  m.def(
      "packed_weight_bytes",
      [](const std::string& weight_format, int64_t n, int64_t k) {
        return speedx::packed_weight_bytes(speedx::parse_weight_format(weight_format, "packed_weight_bytes"), n, k);
      },
      py::arg("weight_format"), py::arg("n"), py::arg("k"),
      "Bytes of the packed form of an [n, k] weight in weight_format ('bf16', 'q4_0', 'q4_1', 'q8_0').");
  m.def(
      "pack_quant_weight",
      [](const std::string& weight_format, uintptr_t blocks, int64_t n, int64_t k, uintptr_t packed, int num_threads) {
        const speedx::WeightFormat f = speedx::parse_weight_format(weight_format, "pack_quant_weight");
        py::gil_scoped_release nogil;
        speedx::pack_quant_weight(f, reinterpret_cast<const uint8_t*>(blocks), n, k, reinterpret_cast<uint8_t*>(packed),
                                  num_threads);
      },
      py::arg("weight_format"), py::arg("blocks"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("num_threads"),
      "Packs a GGUF tensor's raw blocks (data_ptr; n rows of k / 32 blocks of 'q4_0', 'q4_1' or 'q8_0')\n"
      "into packed_weight_bytes(weight_format, n, k) bytes for gemm_packed_weight.");
  m.def(
      "fma_peak_gflops",
      [](const std::string& isa, int num_threads) {
        const speedx::CpuIsa i = speedx::parse_cpu_isa(isa, "fma_peak_gflops");
        py::gil_scoped_release nogil;
        return speedx::fma_peak_gflops(i, num_threads);
      },
      py::arg("isa") = "auto", py::arg("num_threads") = 1,
      "Measured fp32 FMA peak in GFLOP/s of the 'avx512' / 'avx2' / 'baseline' path on num_threads threads\n"
      "(register-only FMA chains, best of 30); the yardstick for bench/cpu_matmul.py.");
  m.def(
      "rms_norm",
      [](uintptr_t out, uintptr_t residual, uintptr_t residual_out, uintptr_t x, uintptr_t weight, int64_t m,
         int64_t h, float eps, const std::string& dtype, int num_threads) {
        const speedx::RmsNormArgs args{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(residual),
                                       reinterpret_cast<void*>(residual_out),
                                       reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(weight),
                                       m, h, eps, speedx::parse_dtype(dtype, "rms_norm"), num_threads};
        py::gil_scoped_release nogil;
        speedx::rms_norm(args);
      },
      py::arg("out"), py::arg("residual"), py::arg("residual_out"), py::arg("x"), py::arg("weight"), py::arg("m"),
      py::arg("h"),
      py::arg("eps"), py::arg("dtype"), py::arg("num_threads"),
      "RMSNorm of x [m, h] into out, on CPU (cpu_norm.h); with a residual (else 0), x + residual is\n"
      "normalised and stored in residual_out. All data_ptr() of C-contiguous tensors of `dtype`.");
  m.def(
      "silu_mul_bf16",
      [](uintptr_t out, uintptr_t gate_up, int64_t m, int64_t i, int num_threads) {
        const speedx::SiluMulArgs args{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(gate_up), m, i,
                                       num_threads};
        py::gil_scoped_release nogil;
        speedx::silu_mul_bf16(args);
      },
      py::arg("out"), py::arg("gate_up"), py::arg("m"), py::arg("i"), py::arg("num_threads"),
      "out [m, i] = silu(gate) * up of gate_up [m, 2i] (gate first), bf16, on CPU (cpu_activation.h).\n"
      "data_ptr() of C-contiguous bf16 tensors.");
  m.def(
      "sample_rows",
      [](py::array tokens, uintptr_t logits, int64_t vocab, const py::array& temperature,
         const py::array& uniforms, const py::array& top_p, int num_threads) {
        check_array<int64_t>(tokens, "tokens", 1, true);
        check_array<float>(temperature, "temperature", 1, false);
        check_array<double>(uniforms, "uniforms", 1, false);
        check_array<float>(top_p, "top_p", 1, false);
        const int64_t m = tokens.shape(0);
        if (temperature.shape(0) != m || uniforms.shape(0) != m || top_p.shape(0) != m)
          throw py::value_error("tokens, temperature, uniforms and top_p must have one entry per row");
        const speedx::SampleArgs args{static_cast<int64_t*>(tokens.mutable_data()), reinterpret_cast<const float*>(logits),
                                      static_cast<const float*>(temperature.data()),
                                      static_cast<const double*>(uniforms.data()),
                                      static_cast<const float*>(top_p.data()), m, vocab, vocab, num_threads};
        py::gil_scoped_release nogil;
        speedx::sample_rows(args);
      },
      py::arg("tokens"), py::arg("logits"), py::arg("vocab"), py::arg("temperature"), py::arg("uniforms"),
      py::arg("top_p"), py::arg("num_threads"),
      "tokens[r] = the inverse-CDF draw of softmax(logits[r] / temperature[r]) within its top_p[r] nucleus\n"
      "at uniforms[r] (cpu_sample.h).\n"
      "logits: data_ptr() of a C-contiguous fp32 [m, vocab] tensor; the arrays are numpy.");
  m.def(
      "rope_store_bf16",
      [](uintptr_t q_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t qkv, const py::array& positions,
         const py::array& slots, uintptr_t cos, uintptr_t sin, int64_t num_heads, int64_t num_kv_heads,
         int64_t head_dim, int64_t max_position, int64_t num_slots, int num_threads) {
        check_array<int64_t>(positions, "positions", 1, false);
        check_array<int64_t>(slots, "slots", 1, false);
        if (positions.shape(0) != slots.shape(0)) throw py::value_error("positions and slots must have one entry per token");
        const speedx::RopeStoreArgs args{
            reinterpret_cast<void*>(q_out), reinterpret_cast<void*>(k_cache), reinterpret_cast<void*>(v_cache),
            reinterpret_cast<const void*>(qkv), static_cast<const int64_t*>(positions.data()),
            static_cast<const int64_t*>(slots.data()), reinterpret_cast<const float*>(cos),
            reinterpret_cast<const float*>(sin), positions.shape(0), num_heads, num_kv_heads, head_dim, max_position,
            num_slots, num_threads};
        py::gil_scoped_release nogil;
        speedx::rope_store_bf16(args);
      },
      py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("qkv"), py::arg("positions"), py::arg("slots"),
      py::arg("cos"), py::arg("sin"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("max_position"), py::arg("num_slots"), py::arg("num_threads"),
      "RoPE on the q and k of a fused bf16 QKV output; q to q_out, k and v to their cache slots (cpu_rope.h).\n"
      "Tensors as data_ptr() of C-contiguous tensors; positions and slots int64 numpy arrays.");
  m.def("cpu_isa", [] { return speedx::cpu_isa_name(speedx::best_cpu_isa()); },
        "SIMD path the CPU kernels (paged_decode_attention, gemm_packed_weight on quantized weights) use here:\n"
        "'avx512', 'avx2' or 'baseline'.");
  m.def("gemm_isa", [] { return speedx::cpu_isa_name(speedx::best_gemm_isa()); },
        "SIMD path gemm_packed_weight uses here on bf16 weights: cpu_isa(), or 'avx512bf16' (vdpbf16ps).");
}
