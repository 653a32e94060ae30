"""Building blocks of the Llama-family decoder: RMSNorm, rotary embedding, SwiGLU MLP.

Op order follows Hugging Face transformers so that fp32 greedy decoding matches it token for token.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speedx.kernels.cpu import rms_norm_into, silu_mul_cpu
from speedx.kernels.layers_torch import rope_torch
from speedx.kernels.registry import Kernels, twins


class RMSNorm(nn.Module):
    """RMSNorm, optionally after the residual add: norm(x) or (norm(x + residual), x + residual), on
    the engine's kernels (kernels/registry.py; the PyTorch twins when built without them)."""

    def __init__(self, hidden_size: int, eps: float, kernels: Kernels | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernels = kernels or twins()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.kernels.rms_norm(x, self.weight, self.eps, residual)

    def norm_into_cpu(self, out: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                      summed: torch.Tensor | None, num_threads: int) -> None:
        """The fused CPU step's norm (kernels/cpu.py rms_norm_into) into its scratch buffers."""
        rms_norm_into(out, x, self.weight, self.eps, residual, summed, num_threads)


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
        return rope_torch(positions, q, k, self.cos_table, self.sin_table)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, kernels: Kernels | None = None):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.kernels = kernels or twins()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if getattr(self.gate_up_proj, "silu_mul", False):  # a PackedBf16Linear that applied it already
            return self.down_proj(gate_up)
        return self.down_proj(self.kernels.silu_mul(gate_up))

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """forward's bf16 CPU path without module calls (LlamaForCausalLM's fused CPU step)."""
        gate_up = self.gate_up_proj.forward(x)
        if not getattr(self.gate_up_proj, "silu_mul", False):
            gate_up = silu_mul_cpu(gate_up)
        return self.down_proj.forward(gate_up)
