"""Compute kernels of the engine, shipped inside the wheel as `speedx.kernels`.

Each kernel family has a PyTorch twin with the same signature: the twins are the CPU path
and the reference the fast GPU kernels are tested against. The Triton kernels live in the
triton_*.py modules, imported only when kernels/dispatch.py (SPEEDX_KERNELS) picks them.
"""

from speedx.kernels.dispatch import kernel_mode, paged_attention, rms_norm, rope_and_store, silu_mul, store_kvcache
from speedx.kernels.layers_torch import rms_norm_torch, rope_and_store_torch, silu_mul_torch
from speedx.kernels.paged_attention import paged_attention_cpu, paged_attention_torch, store_kvcache_torch

__all__ = [
    "kernel_mode",
    "paged_attention",
    "paged_attention_cpu",
    "paged_attention_torch",
    "rms_norm",
    "rms_norm_torch",
    "rope_and_store",
    "rope_and_store_torch",
    "silu_mul",
    "silu_mul_torch",
    "store_kvcache",
    "store_kvcache_torch",
]
