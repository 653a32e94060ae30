"""Linear layers for half-precision models on CPU: the same bf16 arithmetic as transformers
(products accumulate in fp32, outputs round to bf16), faster than PyTorch's bf16 GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedx.models.layers import SwiGLU


class WideMatmulLinear(nn.Module):
    """A linear layer whose weights hold bf16/fp16 values but multiply in fp32 on the CPU.

    On CPUs without AMX, PyTorch's bf16 GEMM runs 1.2-1.5x slower than its fp32 GEMM (measured by
    bench/cpu_matmul.py). Widening bf16 values to fp32 is exact and both accumulate in fp32, so the
    result, rounded back to the activation dtype, is the same bf16 arithmetic, only faster. It is
    also the PyTorch twin of PackedBf16Linear.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight, self.bias).to(self.out_dtype)


class PackedBf16Linear(nn.Module):
    """A bf16 linear layer through speedx's CPU matmul (csrc/cpu_gemm.cpp).

    The weights stay bf16 (half the bytes of WideMatmulLinear's), packed once into the panels the
    kernel streams, and are widened in registers; products accumulate in fp32, so the arithmetic is
    WideMatmulLinear's. Each output is one FMA chain in k order: a row's result does not depend on
    the other rows of the batch.
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype, silu_mul: bool = False):
        """silu_mul: the linear's output is [gate | up] (SwiGLU's fused projection); the layer then
        returns silu(gate) * up, computed in the matmul's epilogue."""
        super().__init__()
        if out_dtype not in (torch.bfloat16, torch.float32) or (silu_mul and out_dtype != torch.bfloat16):
            raise ValueError(f"PackedBf16Linear writes bfloat16 or float32 (bfloat16 with silu_mul), not {out_dtype}")
        from speedx import _C

        self._C = _C
        self.silu_mul = silu_mul
        rows, self.in_features = linear.weight.shape
        weight = linear.weight.detach().to(torch.bfloat16)
        bias = None if linear.bias is None else linear.bias.detach().float()
        if silu_mul:  # rows gate 0, up 0, gate 1, up 1, ...: each gate lands next to its up
            weight = _interleave_halves(weight)
            bias = None if bias is None else _interleave_halves(bias)
        weight = weight.contiguous()
        self.out_features = rows // 2 if silu_mul else rows
        packed = torch.empty(_C.packed_weight_size(rows, self.in_features), dtype=torch.bfloat16)
        _C.pack_bf16_weight(weight.data_ptr(), rows, self.in_features, packed.data_ptr(), torch.get_num_threads())
        self.register_buffer("packed_weight", packed)
        self.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this ~120 times a step: keep the host work to one allocation and one call.
        rows = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
        if rows.dtype not in _GEMM_DTYPE_NAMES:
            rows = rows.float()
        out = torch.empty((rows.shape[0], self.out_features), dtype=self.out_dtype)
        bias = self.bias
        self._C.gemm_bf16_weight(
            out.data_ptr(), rows.data_ptr(), self.packed_weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
            rows.shape[0], self.out_features * (2 if self.silu_mul else 1), self.in_features,
            _GEMM_DTYPE_NAMES[rows.dtype], _GEMM_DTYPE_NAMES[self.out_dtype], torch.get_num_threads(), self.silu_mul,
        )
        return out if rows is x else out.view(*x.shape[:-1], self.out_features)


_GEMM_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _interleave_halves(t: torch.Tensor) -> torch.Tensor:
    """Rows [a0 .. an-1, b0 .. bn-1] -> [a0, b0, a1, b1, ...]."""
    half = t.shape[0] // 2
    return torch.stack([t[:half], t[half:]], dim=1).reshape(t.shape)


def use_fast_cpu_matmuls(model: nn.Module, dtype: torch.dtype) -> None:
    """Swap every nn.Linear of a half-precision CPU model for the fastest same-arithmetic matmul:
    PackedBf16Linear for bf16 on AVX-512 CPUs (where bench/cpu_matmul.py measured it), otherwise
    WideMatmulLinear (fp32 GEMM)."""
    from speedx import _C

    packed = dtype == torch.bfloat16 and _C.cpu_isa() == "avx512"
    for name, child in list(model.named_children()):
        if isinstance(child, SwiGLU) and packed:  # the activation runs in the gate/up matmul's epilogue
            child.gate_up_proj = PackedBf16Linear(child.gate_up_proj, dtype, silu_mul=True)
            child.down_proj = PackedBf16Linear(child.down_proj, dtype)
        elif isinstance(child, nn.Linear):
            setattr(model, name, (PackedBf16Linear if packed else WideMatmulLinear)(child, dtype))
        else:
            use_fast_cpu_matmuls(child, dtype)
