"""The decoder's elementwise layers in PyTorch: RMSNorm(+residual), SiLU-and-mul, RoPE(+KV store).

These are the twins of kernels/triton_layers.py and the path on any device without Triton. Op
order and rounding follow Hugging Face transformers, so fp32 greedy decoding matches it token for
token and a half-precision kernel can round exactly where these do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedx.kernels.paged_attention import store_kvcache_torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """norm(x), or (norm(x + residual), x + residual) with the sum rounded to x's dtype first."""
    if residual is not None:
        residual = x + residual
        x = residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, residual)


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_torch(positions, q, k, cos_table, sin_table) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] with the fp32
    cos/sin rows of each token's position, cast to q's dtype as transformers does."""
    cos = cos_table[positions].to(q.dtype).unsqueeze(1)
    sin = sin_table[positions].to(q.dtype).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_and_store_torch(qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
                         num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Split the fused projection qkv [tokens, (heads + 2 kv_heads) * head_dim], apply RoPE to q and k,
    store k and v in the paged cache (slot -1: skip) and return q [tokens, heads, head_dim]."""
    head_dim = k_cache.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = rope_torch(positions, q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), cos_table, sin_table)
    store_kvcache_torch(k, v.view(-1, num_kv_heads, head_dim), k_cache, v_cache, slot_mapping)
    return q
