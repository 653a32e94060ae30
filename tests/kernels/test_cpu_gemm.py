"""speedx._C.gemm_bf16_weight (CPU matmul on packed bf16 weights) and PackedBf16Linear, against
their PyTorch twin: F.linear on the weights widened to fp32 (WideMatmulLinear); on the avx512bf16
path, on x rounded to bf16 (cpu_gemm.h)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedx import _C
from speedx.models.cpu_linear import PackedBf16Linear, WideMatmulLinear

_ALL_ISAS = ["baseline", "avx2", "avx512", "avx512bf16"]
ISAS = _ALL_ISAS[: _ALL_ISAS.index(_C.gemm_isa()) + 1]  # the SIMD paths this CPU can run
FMA_ISAS = [isa for isa in ISAS if isa != "avx512bf16"]  # those that keep x in fp32
needs_bf16 = pytest.mark.skipif(_C.gemm_isa() != "avx512bf16", reason="this CPU lacks avx512_bf16 (vdpbf16ps)")


def pack(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    packed = torch.empty(_C.packed_weight_size(n, k), dtype=torch.bfloat16)
    _C.pack_bf16_weight(weight.contiguous().data_ptr(), n, k, packed.data_ptr(), 2)
    return packed


def gemm(x, packed, n, bias=None, out_dtype=torch.float32, isa="auto", num_threads=2):
    m, k = x.shape
    out = torch.full((m, n), float("nan"), dtype=out_dtype)  # every element must be written
    _C.gemm_bf16_weight(
        out.data_ptr(), x.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), m, n, k,
        str(x.dtype), str(out_dtype), num_threads, _debug_isa=isa,
    )
    return out


def twin(x, weight, bias=None):
    return F.linear(x.float(), weight.float(), bias)


def fp32_tolerance(x, weight) -> torch.Tensor:
    """Bound on the fp32 rounding difference between two summation orders, per output."""
    return 1e-6 * (x.float().abs() @ weight.float().abs().T) * x.shape[1] ** 0.5 + 1e-30


@pytest.mark.parametrize("isa", FMA_ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 31), (13, 67, 33), (37, 130, 100), (64, 96, 64), (200, 40, 70)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_matches_the_twin_on_odd_shapes(isa, m, k, n, x_dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    ref = twin(x, weight, bias)
    out = gemm(x, pack(weight), n, bias, isa=isa)
    assert ((out - ref).abs() <= fp32_tolerance(x, weight)).all()
    # bf16 output: the twin's value rounded once (a different summation order may land on the
    # neighbouring bf16 only when the fp32 sum sits next to a rounding boundary).
    out16 = gemm(x, pack(weight), n, bias, out_dtype=torch.bfloat16, isa=isa).float()
    assert ((out16 - ref).abs() <= ref.abs() * 2.0**-8 + fp32_tolerance(x, weight)).all()
    assert (out16 == ref.bfloat16().float()).float().mean() > 0.97


@pytest.mark.parametrize("isa", ISAS)
def test_exact_when_every_partial_sum_is_representable(isa):
    # Small integers: each product and partial sum is exact in fp32, so any order gives the twin's bits.
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, (29, 75), generator=gen).float()
    weight = torch.randint(-8, 9, (45, 75), generator=gen).bfloat16()
    bias = torch.randint(-100, 100, (45,), generator=gen).float()
    assert torch.equal(gemm(x, pack(weight), 45, bias, isa=isa), twin(x, weight, bias))
    assert torch.equal(gemm(x.bfloat16(), pack(weight), 45, None, torch.bfloat16, isa), twin(x, weight).bfloat16())


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_gets_the_same_bits_alone_in_any_batch_and_thread_count(isa):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 300, generator=gen).bfloat16()
    packed, n = pack(torch.randn(90, 300, generator=gen).bfloat16()), 90
    full = gemm(x, packed, n, isa=isa, num_threads=2)
    assert torch.equal(gemm(x, packed, n, isa=isa, num_threads=1), full)
    for row in (0, 11, 49):
        assert torch.equal(gemm(x[row : row + 1], packed, n, isa=isa)[0], full[row])
    assert torch.equal(gemm(x[7:20], packed, n, isa=isa), full[7:20])


def test_nan_and_inf_stay_in_their_row():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 40, generator=gen).bfloat16()
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    weight = torch.randn(33, 40, generator=gen).bfloat16()
    out = gemm(x, pack(weight), 33, out_dtype=torch.bfloat16).float()
    ref = twin(x, weight)
    assert out[1].isnan().all()
    assert out[2].isinf().all() and torch.equal(out[2].sign(), ref[2].sign())
    finite = [0, 3]
    assert ((out[finite] - ref[finite]).abs() <= ref[finite].abs() * 2.0**-8 + fp32_tolerance(x[finite], weight)).all()


def test_packed_linear_module_matches_the_wide_twin():
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(70, 130, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(130, 70, generator=gen))
        linear.bias.copy_(torch.randn(130, generator=gen))
    x = torch.randn(3, 5, 70, generator=gen).bfloat16()  # any leading shape, like nn.Linear
    for out_dtype in (torch.bfloat16, torch.float32):
        ours, wide = PackedBf16Linear(linear, out_dtype)(x), WideMatmulLinear(linear, out_dtype)(x)
        assert ours.shape == wide.shape == (3, 5, 130) and ours.dtype == wide.dtype == out_dtype
        ref = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert ((ours.float() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-4).all()
        if out_dtype == torch.float32 and _C.gemm_isa() == "avx512bf16":  # another summation order
            assert ((ours - wide).abs() <= fp32_tolerance(x.reshape(15, 70), linear.weight).reshape(3, 5, 130)).all()
        else:
            assert (ours == wide).float().mean() > 0.97


def test_bad_arguments_are_clear_errors():
    packed = pack(torch.randn(8, 4).bfloat16())
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x and out must be float32 or bfloat16, not float16"):
        gemm(x.half(), packed, 8)
    with pytest.raises(ValueError, match="need m >= 0, n >= 1, k >= 1; got m=2, n=0"):
        _C.gemm_bf16_weight(1, x.data_ptr(), packed.data_ptr(), 0, 2, 0, 4, "float32", "float32", 1)
    with pytest.raises(ValueError, match="dtype must be 'bfloat16', 'float16' or 'float32', got 'int8'"):
        _C.gemm_bf16_weight(1, x.data_ptr(), packed.data_ptr(), 0, 2, 8, 4, "int8", "float32", 1)
    with pytest.raises(ValueError, match="gemm_bf16_weight: isa must be 'auto', 'avx512bf16', 'avx512', 'avx2' or 'baseline'"):
        gemm(x, packed, 8, isa="sse9")
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        gemm(x, packed, 8, num_threads=0)
    with pytest.raises(ValueError, match="PackedBf16Linear writes bfloat16 or float32"):
        PackedBf16Linear(nn.Linear(4, 8), torch.float16)


def swiglu_twin(x, weight, bias, size):
    """transformers' bf16 SwiGLU activation: gate and up projections rounded, silu rounded, product rounded."""
    gate, up = twin(x, weight, bias).bfloat16().split(size, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,size", [(1, 8, 16), (11, 40, 13), (64, 96, 48), (30, 17, 70)])
def test_silu_mul_epilogue_matches_the_swiglu_twin(isa, m, k, size):
    gen = torch.Generator().manual_seed(m + k + size)
    x = torch.randn(m, k, generator=gen).bfloat16()
    linear = nn.Linear(k, 2 * size, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2 * size, k, generator=gen))
        linear.bias.copy_(torch.randn(2 * size, generator=gen))
    fused = PackedBf16Linear(linear, torch.bfloat16, silu_mul=True)
    out = torch.full((m, size), float("nan"), dtype=torch.bfloat16)
    _C.gemm_bf16_weight(
        out.data_ptr(), x.data_ptr(), fused.packed_weight.data_ptr(), fused.bias.data_ptr(), m, 2 * size, k,
        "bfloat16", "bfloat16", 2, True, _debug_isa=isa,
    )
    ref = swiglu_twin(x, linear.weight, linear.bias.float(), size)
    if isa == _C.gemm_isa():  # the module runs the widest path
        assert torch.equal(fused(x), out)
    # Only a gate or up sum sitting on a bf16 rounding boundary can move (then one step, carried on).
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-6 + 1e-6).all()
    assert (out == ref).float().mean() > 0.97


def test_swiglu_runs_its_activation_in_the_matmul_where_packed():
    from speedx.models.cpu_linear import _PACKED_BF16_FASTER, use_fast_cpu_matmuls
    from speedx.models.layers import SwiGLU

    gen = torch.Generator().manual_seed(12)
    mlp = SwiGLU(32, 48).bfloat16()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(9, 32, generator=gen).bfloat16()
    ref = mlp.down_proj(swiglu_twin(x, mlp.gate_up_proj.weight, None, 48))
    use_fast_cpu_matmuls(nn.ModuleList([mlp]), torch.bfloat16)  # as in a model: SwiGLU is a child
    assert getattr(mlp.gate_up_proj, "silu_mul", False) == _PACKED_BF16_FASTER[_C.gemm_isa()]
    out = mlp(x)
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-5 + 1e-3).all()


def test_silu_mul_epilogue_checks_its_shape():
    packed = pack(torch.randn(8, 4).bfloat16())
    x = torch.randn(2, 4).bfloat16()
    with pytest.raises(ValueError, match="silu_mul epilogue needs an even n"):
        _C.gemm_bf16_weight(1, x.data_ptr(), packed.data_ptr(), 0, 2, 7, 4, "bfloat16", "bfloat16", 1, True)
    with pytest.raises(ValueError, match="silu_mul epilogue needs an even n .* and a bfloat16 out"):
        _C.gemm_bf16_weight(1, x.data_ptr(), packed.data_ptr(), 0, 2, 8, 4, "bfloat16", "float32", 1, True)


# The avx512bf16 path: x rounded to bf16, vdpbf16ps on pairs of k (cpu_gemm.h).


@needs_bf16
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 576, 49), (5, 7, 31), (13, 67, 33), (16, 96, 65), (37, 130, 100),
                                   (64, 96, 64), (200, 41, 70)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_dpbf16_matches_the_twin_on_bf16_x(m, k, n, x_dtype, num_threads):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    packed = pack(weight)
    # Its twin multiplies x rounded to bf16: then both sum the same exact products in fp32, in
    # different orders, which fp32_tolerance bounds.
    ref = twin(x.bfloat16(), weight, bias)
    out = gemm(x, packed, n, bias, isa="avx512bf16", num_threads=num_threads)
    assert ((out - ref).abs() <= fp32_tolerance(x.bfloat16(), weight)).all()
    if x_dtype == torch.float32:  # rounded to nearest even, as torch does
        assert torch.equal(out, gemm(x.bfloat16(), packed, n, bias, isa="avx512bf16", num_threads=num_threads))
    out16 = gemm(x, packed, n, bias, out_dtype=torch.bfloat16, isa="avx512bf16", num_threads=num_threads).float()
    assert ((out16 - ref).abs() <= ref.abs() * 2.0**-8 + fp32_tolerance(x.bfloat16(), weight)).all()
    assert (out16 == ref.bfloat16().float()).float().mean() > 0.97


@needs_bf16
def test_dpbf16_is_one_fma_chain_taking_each_pair_of_k_high_first():
    # vdpbf16ps adds x[k+1] w[k+1], then x[k] w[k] (exact products), rounding after each: bit for
    # bit this fp32 loop; k odd leaves the last k alone.
    gen = torch.Generator().manual_seed(5)
    m, k, n = 7, 37, 45
    x = torch.randn(m, k, generator=gen).bfloat16()
    weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    order = [i for j in range(0, k, 2) for i in (j + 1, j) if i < k]
    acc = torch.zeros(m, n)
    for i in order:
        acc = acc + x[:, i : i + 1].float() * weight[:, i].float()
    assert torch.equal(gemm(x, pack(weight), n, bias, isa="avx512bf16"), acc + bias)


@needs_bf16
def test_dpbf16_is_the_default_bf16_path():
    gen = torch.Generator().manual_seed(6)
    x, weight = torch.randn(20, 33, generator=gen).bfloat16(), torch.randn(50, 33, generator=gen).bfloat16()
    packed = pack(weight)
    assert torch.equal(gemm(x, packed, 50), gemm(x, packed, 50, isa="avx512bf16"))


@pytest.mark.skipif(_C.gemm_isa() == "avx512bf16", reason="this CPU has avx512_bf16")
def test_dpbf16_without_the_cpu_feature_is_a_clear_error():
    packed = pack(torch.randn(8, 4).bfloat16())
    with pytest.raises(ValueError, match="does not support isa 'avx512bf16'"):
        gemm(torch.randn(2, 4), packed, 8, isa="avx512bf16")
