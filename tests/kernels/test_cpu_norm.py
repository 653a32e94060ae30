"""speedx._C.rms_norm (RMSNorm with the residual add folded in) against its PyTorch twin,
rms_norm_torch, which follows transformers' op order."""

from __future__ import annotations

import pytest
import torch

from speedx import _C
from speedx.kernels.layers_torch import rms_norm_torch
from speedx.kernels.registry import select
from speedx.models.layers import RMSNorm


def make_norm(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5, select(torch.device("cpu"), dtype, dtype, "auto")).to(dtype)  # the CPU engine's
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen) * 0.5 + 1)
    return norm


def twin(norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
    return rms_norm_torch(x, norm.weight, norm.eps, residual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 7), (64, 576), (17, 1000), (130, 96)])
def test_fused_norm_matches_the_twin(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows * 7 + hidden)
    norm = make_norm(hidden, dtype, gen)
    x = (torch.randn(rows, hidden, generator=gen) * 4).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    out, summed = norm(x, residual)
    ref_out, ref_summed = twin(norm, x, residual)
    assert torch.equal(summed, ref_summed)  # one rounded add: exactly the twin's
    # The sum of squares runs in another order; the fp32 scale may differ in its last bit, which
    # can move a value to the neighbouring half-precision number, no further.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert ((out.float() - ref_out.float()).abs() <= ref_out.float().abs() * ulp * 1.01).all()
    assert (out == ref_out).float().mean() > 0.99
    alone = norm(x)
    assert ((alone.float() - twin(norm, x, None).float()).abs() <= twin(norm, x, None).float().abs() * ulp * 1.01).all()


def test_rows_are_independent_and_leading_dims_kept():
    gen = torch.Generator().manual_seed(5)
    norm = make_norm(40, torch.bfloat16, gen)
    x = torch.randn(2, 3, 40, generator=gen).bfloat16()
    residual = torch.randn(2, 3, 40, generator=gen).bfloat16()
    out, summed = norm(x, residual)
    assert out.shape == summed.shape == (2, 3, 40)
    row_out, row_summed = norm(x[1, 2:3], residual[1, 2:3])
    assert torch.equal(row_out[0], out[1, 2]) and torch.equal(row_summed[0], summed[1, 2])


def test_fp32_takes_the_pytorch_path_bit_for_bit():
    gen = torch.Generator().manual_seed(6)
    norm = make_norm(33, torch.float32, gen)
    x = torch.randn(4, 33, generator=gen)
    assert torch.equal(norm(x), twin(norm, x, None))


def test_bad_arguments_are_clear_errors():
    x = torch.randn(2, 4).bfloat16()
    with pytest.raises(ValueError, match="rms_norm: need m >= 0 and h >= 1"):
        _C.rms_norm(x.data_ptr(), 0, 0, x.data_ptr(), x.data_ptr(), 2, 0, 1e-5, "bfloat16", 1)
    with pytest.raises(ValueError, match="rms_norm: null data pointer"):
        _C.rms_norm(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), x.data_ptr(), 2, 4, 1e-5, "bfloat16", 1)
    with pytest.raises(ValueError, match="rms_norm: dtype must be 'bfloat16', 'float16' or 'float32', got 'int8'"):
        _C.rms_norm(x.data_ptr(), 0, 0, x.data_ptr(), x.data_ptr(), 2, 4, 1e-5, "int8", 1)
