"""Which implementation runs each op: decided once, when an engine (or a loss) is built.

Backends: "triton" (Triton kernels: CUDA, or the interpreter on CPU under TRITON_INTERPRET=1),
"cpu" (speedx's C++ kernels, kernels/cpu.py, where they cover the dtypes; the PyTorch twins for the
rest) and "torch" (the PyTorch twins, which define what every op computes). The request is
EngineConfig.kernel_backend, else $SPEEDX_KERNELS, else "auto": Triton on CUDA when it imports,
the C++ kernels on a CPU. Nothing here imports triton unless Triton is chosen.

Ops of the decoder and the sampler, one table per op (the engine's Kernels):
  rms_norm(x, weight, eps, residual=None)           rms_norm_torch's contract
  silu_mul(gate_up)                                  silu_mul_torch's
  rope_and_store(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads) -> q
  paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, num_decodes=0)
  sample_tokens(logits, temperature, top_k, top_p, min_p, uniforms, bitmask=None)
and the embedding loss: infonce_backend(device, request).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

REQUESTS = ("auto", "triton", "torch")

# op -> backend -> "module:function"; a backend missing from an op's table runs the twin.
_TWINS = {
    "rms_norm": "speedx.kernels.layers_torch:rms_norm_torch",
    "silu_mul": "speedx.kernels.layers_torch:silu_mul_torch",
    "rope_and_store": "speedx.kernels.layers_torch:rope_and_store_torch",
    "paged_attention": "speedx.kernels.paged_attention:paged_attention_torch",
    "sample_tokens": "speedx.engine.sampler:sample_tokens_torch",
}
_TRITON = {
    "rms_norm": "speedx.kernels.triton_layers:rms_norm_triton",
    "silu_mul": "speedx.kernels.triton_layers:silu_mul_triton",
    "rope_and_store": "speedx.kernels.triton_layers:rope_and_store_triton",
    "paged_attention": "speedx.kernels.triton_attention:paged_attention_triton",
    "sample_tokens": "speedx.kernels.triton_sampling:sample_tokens_from_uniforms_triton",
}
_CPU = {  # op -> (implementation, whether it covers (model dtype, KV cache dtype))
    "rms_norm": ("speedx.kernels.cpu:rms_norm_cpu", lambda dtype, kv: dtype in (torch.bfloat16, torch.float16)),
    "silu_mul": ("speedx.kernels.cpu:silu_mul_cpu", lambda dtype, kv: dtype == torch.bfloat16),
    "rope_and_store": ("speedx.kernels.cpu:rope_and_store_cpu", lambda dtype, kv: dtype == kv == torch.bfloat16),
    # decodes in C++ (it reads caches of the queries' dtype), prompt chunks on the twin
    "paged_attention": ("speedx.kernels.paged_attention:paged_attention_cpu", lambda dtype, kv: dtype == kv),
    "sample_tokens": ("speedx.engine.sampler:sample_tokens_cpu", lambda dtype, kv: True),  # fp32 logits
}


@dataclass(frozen=True)
class Kernels:
    """The implementations an engine runs, and what its other parts need to know of them."""

    backend: str  # "triton", "cpu" or "torch"
    rms_norm: Callable
    silu_mul: Callable
    rope_and_store: Callable
    paged_attention: Callable
    sample_tokens: Callable
    cuda_graphs: bool  # decode steps can be captured (Triton on CUDA reads lengths on the device)
    bitmask_in_sampler: bool  # sample_tokens applies a grammar bitmask itself
    strided_v_cache: bool  # the attention and store kernels take a V cache with each head's keys contiguous
    fused_cpu_step: bool  # every op of a bf16 decoder layer is a C++ kernel (LlamaForCausalLM._forward_cpu)


def kernel_request() -> str:
    request = os.environ.get("SPEEDX_KERNELS", "auto").strip().lower() or "auto"
    if request not in REQUESTS:
        raise ValueError(f"SPEEDX_KERNELS={request!r}: expected one of {', '.join(REQUESTS)}")
    return request


@functools.cache
def triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except Exception:  # a broken install falls back to the twins under auto
        return False
    return True


def resolve_backend(device: torch.device, request: str | None = None) -> str:
    """What a request ("auto", "triton", "torch"; None: $SPEEDX_KERNELS) means on device."""
    request = request or kernel_request()
    if request == "triton" and not triton_available():
        raise RuntimeError("kernel backend 'triton' but triton cannot be imported (pip install 'speedx[triton]')")
    if request == "auto":
        return "triton" if device.type == "cuda" and triton_available() else ("cpu" if device.type == "cpu" else "torch")
    return request


def select(device: torch.device, dtype: torch.dtype, kv_cache_dtype: torch.dtype, request: str | None = None) -> Kernels:
    """The engine's kernels for a model of dtype with a KV cache of kv_cache_dtype on device."""
    backend = resolve_backend(device, request)
    if backend == "triton" and kv_cache_dtype.itemsize == 1 and device.type == "cuda" \
            and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU with fp8 conversions (compute capability 8.9+: Ada, "
                         f"Hopper or newer); {torch.cuda.get_device_name(device)} has none, so use kv_cache_dtype='auto'")
    ops = {}
    for op, twin in _TWINS.items():
        name = twin
        if backend == "triton":
            name = _TRITON[op]
        elif backend == "cpu" and _CPU[op][1](dtype, kv_cache_dtype):
            name = _CPU[op][0]
        ops[op] = _load(name)
    if backend != "triton":
        ops["paged_attention"] = _without_hint(ops["paged_attention"])
        ops["sample_tokens"] = _applying_bitmask(ops["sample_tokens"])
    triton = backend == "triton"
    fused = backend == "cpu" and dtype == kv_cache_dtype == torch.bfloat16
    return Kernels(backend, **ops, cuda_graphs=triton and device.type == "cuda", bitmask_in_sampler=triton,
                   strided_v_cache=triton, fused_cpu_step=fused)


@functools.cache
def twins() -> Kernels:
    """The PyTorch twins on any device: what a model module runs when built outside an engine."""
    return select(torch.device("cpu"), torch.float32, torch.float32, "torch")


def infonce_backend(device: torch.device, request: str) -> str:
    """The fused InfoNCE loss: "triton" (the fused kernel) or "torch" (its twin) for a request of
    "auto" (Triton for CUDA tensors when it imports), "triton" or "torch"."""
    if request == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if request == "triton" and not triton_available():
        raise ImportError("backend='triton' needs the triton package: pip install 'speedx[triton]'")
    return request


def _load(name: str) -> Callable:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def _without_hint(attend: Callable) -> Callable:
    """num_decodes is a launch hint of the Triton kernel; the others find the decodes themselves."""
    @functools.wraps(attend)
    def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, num_decodes: int = 0):
        return attend(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale)
    return paged_attention


def _applying_bitmask(sample: Callable) -> Callable:
    @functools.wraps(sample)
    def sample_tokens(logits, temperature, top_k, top_p, min_p, uniforms, bitmask=None):
        if bitmask is not None:
            from speedx.engine.sampler import apply_bitmask

            logits = apply_bitmask(logits, bitmask)
        return sample(logits, temperature, top_k, top_p, min_p, uniforms)
    return sample_tokens
