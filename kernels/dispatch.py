"""Choose Triton kernels or the PyTorch twins: SPEEDX_KERNELS=triton|torch|auto (default auto).

auto: Triton on CUDA tensors when triton imports, else the twins (on CPU the C++ decode path for
attention). triton: Triton even on CPU tensors (needs TRITON_INTERPRET=1 set before triton is first
imported). torch: always the twins. The variable is read per call (a dict lookup) or once by a
caller that caches `kernel_mode()`; nothing here imports triton unless Triton is chosen.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from speedx.kernels.layers_torch import rms_norm_torch, rope_and_store_torch, silu_mul_torch
from speedx.kernels.paged_attention import paged_attention_cpu, paged_attention_torch, store_kvcache_torch

MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("SPEEDX_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SPEEDX_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.cache
def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except Exception:  # a broken install falls back to the twins under auto
        return False
    return True


def use_triton(device: torch.device, mode: str | None = None) -> bool:
    mode = mode or kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("SPEEDX_KERNELS=triton but triton cannot be imported (pip install 'speedx[triton]')")
        return True
    return device.type == "cuda" and triton_available()


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, *, mode: str | None = None,
                    num_decodes: int = 0):
    """paged_attention_torch's contract, on the chosen backend. num_decodes: leading one-row sequences
    (a hint: the Triton kernel launches them apart from the prompt chunks)."""
    if use_triton(q.device, mode):
        from speedx.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                                      num_decodes=num_decodes)
    cpp = q.device.type == "cpu" and k_cache.dtype == q.dtype  # the C++ decode kernel reads 16-bit caches only
    attend = paged_attention_cpu if cpp else paged_attention_torch
    return attend(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale)


def store_kvcache(k, v, k_cache, v_cache, slot_mapping, *, mode: str | None = None) -> None:
    """store_kvcache_torch's contract, on the chosen backend."""
    if use_triton(k.device, mode):
        from speedx.kernels.triton_kv_store import store_kvcache_triton

        store_kvcache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kvcache_torch(k, v, k_cache, v_cache, slot_mapping)


def rms_norm(x, weight, eps, residual=None, *, mode: str | None = None):
    """rms_norm_torch's contract, on the chosen backend."""
    if use_triton(x.device, mode) and weight.dtype == x.dtype:
        from speedx.kernels.triton_layers import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def silu_mul(gate_up, *, mode: str | None = None):
    """silu_mul_torch's contract, on the chosen backend."""
    if use_triton(gate_up.device, mode):
        from speedx.kernels.triton_layers import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_torch(gate_up)


def rope_and_store(qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                   *, mode: str | None = None):
    """rope_and_store_torch's contract, on the chosen backend."""
    args = (qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    if use_triton(qkv.device, mode):
        from speedx.kernels.triton_layers import rope_and_store_triton

        return rope_and_store_triton(*args)
    return rope_and_store_torch(*args)
