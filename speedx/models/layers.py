"""Building blocks of the Llama-family decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Op order follows Hugging Face transformers so that fp32 greedy decoding matches it token for token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm, optionally after the residual add: norm(x) or (norm(x + residual), x + residual).

    Half-precision CPU tensors go through one fused C++ pass (csrc/cpu_norm.cpp) that rounds where
    the PyTorch path below (its twin, and transformers' op order) does."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype:
            return self._fused_cpu(x, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def _fused_cpu(self, x: torch.Tensor, residual: torch.Tensor | None):
        from speedx import _C

        x = x.contiguous()
        out = torch.empty_like(x)
        residual = None if residual is None else residual.contiguous()
        summed = None if residual is None else torch.empty_like(x)
        _C.rms_norm(
            out.data_ptr(), 0 if residual is None else residual.data_ptr(), 0 if summed is None else summed.data_ptr(),
            x.data_ptr(), self.weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], self.eps, str(x.dtype),
            torch.get_num_threads(),
        )
        return out if residual is None else (out, summed)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed fp32 cos/sin table indexed by absolute position."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)
        self._build_table()

    def _build_table(self) -> None:
        positions = torch.arange(self.max_position, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def set_frequency_factors(self, factors: torch.Tensor) -> None:
        # GGUF Llama-3.1 files carry their rope scaling as per-frequency divisors.
        self.inv_freq = self.inv_freq / factors.to(self.inv_freq)
        self._build_table()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]
        cos = self.cos_table[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin_table[positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if getattr(self.gate_up_proj, "silu_mul", False):  # a PackedBf16Linear that applied it already
            return self.down_proj(gate_up)
        if gate_up.device.type == "cpu" and gate_up.dtype == torch.bfloat16:
            return self.down_proj(_silu_mul_cpu(gate_up, self.intermediate_size))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _silu_mul_cpu(gate_up: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """F.silu(gate) * up in one C++ pass (csrc/cpu_activation.cpp), rounding where PyTorch does."""
    from speedx import _C

    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], intermediate_size)
    _C.silu_mul_bf16(out.data_ptr(), gate_up.data_ptr(), out.numel() // intermediate_size, intermediate_size, torch.get_num_threads())
    return out


class WideMatmulLinear(nn.Module):
    """A linear layer whose weights hold bf16/fp16 values but multiply in fp32 on the CPU.

    On CPUs without AMX, PyTorch's bf16 GEMM runs 1.3-1.5x slower than its fp32 GEMM (measured by
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
