"""speedx._C.silu_mul_bf16 (SwiGLU's activation, one C++ pass) against its PyTorch twin
F.silu(gate) * up in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speedx import _C
from speedx.kernels.cpu import silu_mul_cpu
from speedx.kernels.registry import select
from speedx.models.layers import SwiGLU


def twin(gate_up: torch.Tensor, size: int) -> torch.Tensor:
    gate, up = gate_up.split(size, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("rows,size", [(1, 1), (3, 31), (64, 1536), (7, 100), (40, 33)])
def test_matches_the_twin(rows, size):
    gen = torch.Generator().manual_seed(rows * 31 + size)
    gate_up = (torch.randn(rows, 2 * size, generator=gen) * 5).bfloat16()
    ours, ref = silu_mul_cpu(gate_up), twin(gate_up, size)
    # exp differs from PyTorch's in the last fp32 bit at most: the bf16 result can land on the
    # neighbouring value, rarely, and no further.
    assert ((ours.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7 * 1.01 + 1e-30).all()
    assert (ours == ref).float().mean() > 0.999


def test_special_values():
    gate = torch.tensor([0.0, -0.0, 100.0, -100.0, 89.0, -89.0, float("inf"), float("-inf"), float("nan"), 1e-38])
    gate_up = torch.cat([gate, torch.full_like(gate, 2.0)]).bfloat16().unsqueeze(0)
    ours, ref = silu_mul_cpu(gate_up), twin(gate_up, len(gate))
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours[~ours.isnan()], ref[~ref.isnan()])


def test_swiglu_module_takes_the_fused_path_with_the_same_result():
    gen = torch.Generator().manual_seed(9)
    mlp = SwiGLU(24, 40, select(torch.device("cpu"), torch.bfloat16, torch.bfloat16, "auto")).bfloat16()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(2, 5, 24, generator=gen).bfloat16()
    ref = mlp.down_proj(twin(mlp.gate_up_proj(x), 40))
    assert mlp(x).shape == (2, 5, 24)
    assert (mlp(x) == ref).float().mean() > 0.99


def test_bad_arguments_are_clear_errors():
    x = torch.zeros(2, 8).bfloat16()
    with pytest.raises(ValueError, match="silu_mul_bf16: need m >= 0 and i >= 1"):
        _C.silu_mul_bf16(x.data_ptr(), x.data_ptr(), 2, 0, 1)
    with pytest.raises(ValueError, match="silu_mul_bf16: num_threads must be >= 1"):
        _C.silu_mul_bf16(x.data_ptr(), x.data_ptr(), 2, 4, 0)
