"""speedx._C.gemm_packed_weight on GGUF-quantized weights (Q4_0, Q4_1, Q8_0 kept as raw blocks) and
PackedQuantLinear, against their PyTorch twin: gguf.quants.dequantize, then F.linear in fp32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speedx import _C
from speedx.models.cpu_linear import PackedQuantLinear
from speedx.models.loader import QuantizedWeight

_ALL_ISAS = ["baseline", "avx2", "avx512"]
ISAS = _ALL_ISAS[: _ALL_ISAS.index(_C.cpu_isa()) + 1]  # the SIMD paths this CPU can run
FORMATS = ["q4_0", "q4_1", "q8_0"]


def quantize(weight: np.ndarray, fmt: str) -> torch.Tensor:
    """[n, k] float -> the GGUF blocks, uint8 [n, k / 32 * block bytes]."""
    q = gguf.quants.quantize(weight.astype(np.float32), gguf.GGMLQuantizationType[fmt.upper()])
    return torch.from_numpy(np.ascontiguousarray(q)).reshape(weight.shape[0], -1)


def dequantize(blocks: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    data = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt.upper()])
    return torch.from_numpy(np.ascontiguousarray(data)).reshape(blocks.shape[0], k)


def pack(blocks: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    packed = torch.empty(_C.packed_weight_bytes(fmt, n, k), dtype=torch.uint8)
    _C.pack_quant_weight(fmt, blocks.contiguous().data_ptr(), n, k, packed.data_ptr(), 2)
    return packed


def gemm(x, packed, fmt, n, bias=None, out_dtype=torch.float32, isa="auto", num_threads=2, silu_mul=False):
    m, k = x.shape
    out = torch.full((m, n // 2 if silu_mul else n), float("nan"), dtype=out_dtype)  # every element must be written
    _C.gemm_packed_weight(
        out.data_ptr(), x.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), m, n, k,
        str(x.dtype), str(out_dtype), num_threads, silu_mul, weight_format=fmt, _debug_isa=isa,
    )
    return out


def fp32_tolerance(x, weight) -> torch.Tensor:
    """Bound on the fp32 rounding difference between two summation orders, per output."""
    return 1e-6 * (x.float().abs() @ weight.float().abs().T) * x.shape[1] ** 0.5 + 1e-30


def random_weight(n, k, gen) -> np.ndarray:
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)  # rows of different scales
    w[:, : k // 3] += 0.5  # blocks with an offset: Q4_1's minimum matters
    return w.numpy()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (3, 64, 31), (13, 96, 33), (64, 160, 100), (1, 576, 70), (13, 32, 65)])
def test_matches_dequantize_then_matmul(isa, fmt, m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    blocks = quantize(random_weight(n, k, gen), fmt)
    weight = dequantize(blocks, fmt, k)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = F.linear(x, weight, bias)
    packed = pack(blocks, fmt, n, k)
    out = gemm(x, packed, fmt, n, bias, isa=isa)
    assert ((out - ref).abs() <= fp32_tolerance(x, weight) + 1e-6 * bias.abs()).all()
    out16 = gemm(x.bfloat16(), packed, fmt, n, None, torch.bfloat16, isa).float()
    ref16 = F.linear(x.bfloat16().float(), weight)
    assert ((out16 - ref16).abs() <= ref16.abs() * 2.0**-8 + fp32_tolerance(x, weight)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_on_small_integers_and_same_bits_for_a_row_alone(isa, fmt):
    gen = torch.Generator().manual_seed(7)
    k, n = 64, 45
    blocks = quantize(random_weight(n, k, gen), fmt)
    weight = dequantize(blocks, fmt, k)
    packed = pack(blocks, fmt, n, k)
    # One nonzero x per row: each output is a single dequantized weight, which must be exactly gguf's.
    x = torch.zeros(k, k)
    x[torch.arange(k), torch.arange(k)] = 1.0
    assert torch.equal(gemm(x, packed, fmt, n, isa=isa), weight.T.contiguous())
    x = torch.randn(37, k, generator=gen)
    full = gemm(x, packed, fmt, n, isa=isa)
    assert torch.equal(gemm(x, packed, fmt, n, isa=isa, num_threads=1), full)
    for row in (0, 20, 36):
        assert torch.equal(gemm(x[row : row + 1], packed, fmt, n, isa=isa)[0], full[row])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,size", [(1, 16), (3, 40), (13, 70), (64, 48)])
def test_silu_mul_epilogue_matches_the_swiglu_twin(isa, fmt, m, size):
    gen = torch.Generator().manual_seed(m + size)
    k = 96
    gate, up = (quantize(random_weight(size, k, gen), fmt) for _ in range(2))
    layer = PackedQuantLinear(QuantizedWeight(fmt, torch.cat([gate, up]), (2 * size, k)), None, torch.bfloat16,
                              silu_mul=True)
    x = torch.randn(m, k, generator=gen).bfloat16()
    out = gemm(x, layer.packed_weight, fmt, 2 * size, out_dtype=torch.bfloat16, isa=isa, silu_mul=True)
    g = F.linear(x.float(), dequantize(gate, fmt, k)).bfloat16()
    u = F.linear(x.float(), dequantize(up, fmt, k)).bfloat16()
    ref = F.silu(g) * u  # transformers' bf16 SwiGLU: each step rounded
    if isa == _C.cpu_isa():  # the module runs the widest path
        assert torch.equal(layer(x), out)
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-6 + 1e-6).all()
    assert (out == ref).float().mean() > 0.97


def test_module_takes_any_leading_shape_and_both_out_dtypes():
    gen = torch.Generator().manual_seed(3)
    blocks = quantize(random_weight(130, 64, gen), "q4_1")
    bias = torch.randn(130, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen)
    ref = F.linear(x, dequantize(blocks, "q4_1", 64), bias)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = PackedQuantLinear(QuantizedWeight("q4_1", blocks, (130, 64)), bias, out_dtype)(x)
        assert out.shape == (3, 5, 130) and out.dtype == out_dtype
        assert ((out.float() - ref).abs() <= ref.abs() * 2.0**-8 + 1e-4).all()


def test_bad_arguments_are_clear_errors():
    blocks = quantize(np.ones((8, 32)), "q8_0")
    packed = pack(blocks, "q8_0", 8, 32)
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="weight format must be 'bf16', 'q4_0', 'q4_1' or 'q8_0', got 'q5_k'"):
        gemm(x, packed, "q5_k", 8)
    with pytest.raises(ValueError, match="a quantized weight needs k a multiple of 32 .* got k=40"):
        _C.packed_weight_bytes("q4_0", 8, 40)
    with pytest.raises(ValueError, match="gemm_packed_weight: a quantized weight needs k a multiple of 32"):
        _C.gemm_packed_weight(1, x.data_ptr(), packed.data_ptr(), 0, 2, 8, 31, "float32", "float32", 1,
                              weight_format="q8_0")
    with pytest.raises(ValueError, match="bf16 weights go to pack_bf16_weight"):
        _C.pack_quant_weight("bf16", blocks.data_ptr(), 8, 32, packed.data_ptr(), 1)
