"""The decoder's elementwise layers in Triton, one pass each (twins: kernels/layers_torch.py).

In PyTorch each of these is 3-10 kernels over the whole activation: on an H100 they took a third
of an 8B model's 8192-token prefill step and ~1000 tiny launches per decode step. Here each is one
launch that reads its inputs once, computes in fp32 and rounds to the activation dtype exactly where
the twin rounds (so bf16 results agree with it up to the last bit of exp/rsqrt).
"""

from __future__ import annotations

import torch

from speedx.kernels.triton_fp8 import to_cache_dtype
from speedx.kernels.triton_jit import check_device, import_triton, interpreter_active, jit

triton = import_triton()
import triton.language as tl  # noqa: E402


@jit
def _rms_norm_kernel(
    out_ptr, sum_ptr, x_ptr, residual_ptr, weight_ptr, n_cols, eps,
    stride_out, stride_sum, stride_x, stride_residual,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype)  # the sum is rounded before it is normalised, as in the twin
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(dtype), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rms_norm_torch's contract for x [..., hidden] with weight of x's dtype."""
    check_device(x)
    assert weight.dtype == x.dtype, "the fused RMSNorm rounds to one dtype: cast the weight to x's"
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else out
    res = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else x
    block = triton.next_power_of_2(shape[-1])
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](
            out, summed, x, res, weight, shape[-1], eps,
            out.stride(0), summed.stride(0), x.stride(0), res.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return out.view(shape) if residual is None else (out.view(shape), summed.view(shape))


@jit
def _silu_mul_kernel(out_ptr, in_ptr, n_cols, stride_out, stride_in, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(in_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul_torch's contract: [..., 2 n] -> [..., n]."""
    check_device(gate_up)
    shape = gate_up.shape
    n = shape[-1] // 2
    x = gate_up.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](out, x, n, out.stride(0), x.stride(0), BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], n)


@jit
def _rotate(x1, x2, cos1, cos2, sin1, sin2, dtype: tl.constexpr):
    """Rotate-half RoPE of one head's halves, rounding each product and the sum like the twin:
    x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]."""
    out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    return out1.to(dtype), out2.to(dtype)


@jit
def _rope_and_store_kernel(
    q_out_ptr, k_cache_ptr, v_cache_ptr, qkv_ptr, positions_ptr, slot_ptr, cos_ptr, sin_ptr,
    stride_qkv, stride_qo, stride_qh, stride_table, stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_ROUND_IN_SOFTWARE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)[None, :]
    d_ok = d < HALF
    pos = tl.load(positions_ptr + t).to(tl.int64)
    # The fp32 table rows cast to the activation dtype first, as the twin does.
    cos1 = tl.load(cos_ptr + pos * stride_table + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_table + HALF + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_table + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * stride_table + HALF + d, mask=d_ok, other=0.0).to(dtype).to(tl.float32)
    row = qkv_ptr + t * stride_qkv

    h = tl.arange(0, HEADS_PAD)[:, None]
    mask = (h < NUM_HEADS) & d_ok
    q1 = tl.load(row + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(row + h * HEAD_DIM + HALF + d, mask=mask, other=0.0).to(tl.float32)
    q1, q2 = _rotate(q1, q2, cos1, cos2, sin1, sin2, dtype)
    q_row = q_out_ptr + t * stride_qo + h * stride_qh
    tl.store(q_row + d, q1, mask=mask)
    tl.store(q_row + HALF + d, q2, mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # -1: a padded lane of a CUDA graph, which stores nothing
        blk = slot // BLOCK_SIZE
        pos_in_blk = slot % BLOCK_SIZE
        kh = tl.arange(0, KV_HEADS_PAD)[:, None]
        kv_mask = (kh < NUM_KV_HEADS) & d_ok
        k_src = row + NUM_HEADS * HEAD_DIM + kh * HEAD_DIM
        k1 = tl.load(k_src + d, mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_src + HALF + d, mask=kv_mask, other=0.0).to(tl.float32)
        k1, k2 = _rotate(k1, k2, cos1, cos2, sin1, sin2, dtype)
        cache_dtype = k_cache_ptr.dtype.element_ty  # the activation dtype, or fp8
        k_dst = k_cache_ptr + blk * stride_kcb + pos_in_blk * stride_kcs + kh * stride_kch
        tl.store(k_dst + d, to_cache_dtype(k1, cache_dtype, FP8_ROUND_IN_SOFTWARE), mask=kv_mask)
        tl.store(k_dst + HALF + d, to_cache_dtype(k2, cache_dtype, FP8_ROUND_IN_SOFTWARE), mask=kv_mask)
        v_src = row + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM + kh * HEAD_DIM
        v_dst = v_cache_ptr + blk * stride_vcb + pos_in_blk * stride_vcs + kh * stride_vch
        # V's head dims may be strided (model_runner.FP8_V_KEYS_CONTIGUOUS)
        v1 = to_cache_dtype(tl.load(v_src + d, mask=kv_mask), cache_dtype, FP8_ROUND_IN_SOFTWARE)
        v2 = to_cache_dtype(tl.load(v_src + HALF + d, mask=kv_mask), cache_dtype, FP8_ROUND_IN_SOFTWARE)
        tl.store(v_dst + d * stride_vcd, v1, mask=kv_mask)
        tl.store(v_dst + (HALF + d) * stride_vcd, v2, mask=kv_mask)


def rope_and_store_triton(qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
                          num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """rope_and_store_torch's contract, in one launch (one program per token)."""
    check_device(qkv)
    head_dim = k_cache.shape[-1]
    assert head_dim % 2 == 0, "rotate-half RoPE needs an even head_dim"
    assert qkv.shape[-1] == (num_heads + 2 * num_kv_heads) * head_dim, "qkv is not [tokens, (heads + 2 kv_heads) * head_dim]"
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    assert cos_table.is_contiguous() and sin_table.is_contiguous() and k_cache.stride(-1) == 1
    tokens = qkv.shape[0]
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _rope_and_store_kernel[(tokens,)](
            q, k_cache, v_cache, qkv, positions, slot_mapping, cos_table, sin_table,
            qkv.stride(0), q.stride(0), q.stride(1), cos_table.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *v_cache.stride(),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
            HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=k_cache.shape[1],
            FP8_ROUND_IN_SOFTWARE=interpreter_active(), num_warps=4,
            enable_fp_fusion=False,  # else the rounded products and their sum fuse into one bf16 FMA
        )
    return q
