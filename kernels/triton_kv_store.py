"""Store a step's new K/V rows into the paged cache (Triton twin of store_kvcache_torch).

One program per token writes all its KV heads; slot -1 (padding) is skipped inside the kernel,
so there is no host-side filtering and no sync.
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_fp8 import to_cache_dtype
from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402


@jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8_ROUND_IN_SOFTWARE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    cache_dtype = k_cache_ptr.dtype.element_ty  # the rows' own dtype, or fp8
    k = to_cache_dtype(k, cache_dtype, FP8_ROUND_IN_SOFTWARE)
    v = to_cache_dtype(v, cache_dtype, FP8_ROUND_IN_SOFTWARE)
    tl.store(k_cache_ptr + blk * stride_kcb + row * stride_kcs + h * stride_kch + d, k, mask=mask)
    # V's head dims may be strided: a cache with each head's keys contiguous (model_runner.FP8_V_KEYS_CONTIGUOUS)
    tl.store(v_cache_ptr + blk * stride_vcb + row * stride_vcs + h * stride_vch + d * stride_vcd, v, mask=mask)


def store_kvcache_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v rows [tokens, kv_heads, head_dim] to flat cache slots; slot -1 means skip (padding)."""
    check_device(k)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1, "K cache rows must be contiguous"
    _store_kvcache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        FP8_ROUND_IN_SOFTWARE=interpreter_active(),
    )
