"""Compute kernels of the engine, shipped inside the wheel as `speedx.kernels`.

Each kernel family has a PyTorch twin with the same signature: the twins are the CPU path
and the reference the fast GPU kernels are tested against.
"""

from speedx.kernels.paged_attention import paged_attention_cpu, paged_attention_torch, store_kvcache_torch

__all__ = ["paged_attention_cpu", "paged_attention_torch", "store_kvcache_torch"]
