"""speedx's C++ CPU kernels (csrc/cpu_*.cpp) behind typed Python signatures: the one place that
hands tensors to speedx._C by pointer. Each function keeps its PyTorch twin's contract (named in
its docstring) and rounds where the twin does; callers pass contiguous CPU tensors."""

from __future__ import annotations

import numpy as np
import torch

from speedx import _C


def rms_norm_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None, summed: torch.Tensor | None, num_threads: int) -> None:
    """rms_norm_torch into out: norm(x), or with a residual summed = x + residual and out = norm(summed)
    (summed may be residual itself). bf16 or fp16, weight of x's dtype (csrc/cpu_norm.cpp)."""
    _C.rms_norm(out.data_ptr(), 0 if residual is None else residual.data_ptr(), 0 if summed is None else summed.data_ptr(),
                x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, str(x.dtype), num_threads)


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rms_norm_torch's contract in one pass."""
    x = x.contiguous()
    out = torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    summed = None if residual is None else torch.empty_like(x)
    rms_norm_into(out, x, weight, eps, residual, summed, torch.get_num_threads())
    return out if residual is None else (out, summed)


def silu_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul_torch's contract for bf16 in one pass (csrc/cpu_activation.cpp)."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    _C.silu_mul_bf16(out.data_ptr(), gate_up.data_ptr(), out.numel() // n, n, torch.get_num_threads())
    return out


def rope_and_store_into(q: torch.Tensor, qkv: torch.Tensor, positions: np.ndarray, slot_mapping: np.ndarray,
                        cos_table: torch.Tensor, sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        num_heads: int, num_kv_heads: int, num_threads: int) -> None:
    """rope_and_store_torch with the queries written into q, on a contiguous bf16 qkv and the step's host
    arrays (csrc/cpu_rope.cpp)."""
    head_dim = k_cache.shape[-1]
    _C.rope_store_bf16(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), qkv.data_ptr(), positions, slot_mapping,
                       cos_table.data_ptr(), sin_table.data_ptr(), num_heads, num_kv_heads, head_dim,
                       cos_table.shape[0], k_cache.shape[0] * k_cache.shape[1], num_threads)


def rope_and_store_cpu(qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
                       num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """rope_and_store_torch's contract in one pass."""
    q = qkv.new_empty(qkv.shape[0], num_heads, k_cache.shape[-1])
    rope_and_store_into(q, qkv.contiguous(), positions.numpy(), slot_mapping.numpy(), cos_table, sin_table, k_cache,
                        v_cache, num_heads, num_kv_heads, torch.get_num_threads())
    return q


def paged_decode_attention_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: np.ndarray, kv_lens: np.ndarray, scale: float, num_threads: int) -> None:
    """paged_attention_torch for one query row per sequence, reading the paged cache in place, into out
    (csrc/cpu_attention.cpp; the cache of q's dtype)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    _C.paged_decode_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables,
                              kv_lens, q.shape[1], num_kv_heads, head_dim, block_size, num_blocks, scale, str(q.dtype),
                              num_threads)


def draw_rows(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
              top_p: torch.Tensor) -> torch.Tensor:
    """The inverse-CDF draw of the sampler's twin on fp32 logits [rows, vocab], with top-p applied
    (fp64 weights; csrc/cpu_sample.cpp). Returns token ids [rows]."""
    logits = logits.contiguous()
    drawn = np.empty(logits.shape[0], dtype=np.int64)
    _C.sample_rows(drawn, logits.data_ptr(), logits.shape[1], temperature.float().contiguous().numpy(),
                   uniforms.double().contiguous().numpy(), top_p.float().contiguous().numpy(), torch.get_num_threads())
    return torch.from_numpy(drawn)
