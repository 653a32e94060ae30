"""Attention over a paged KV cache, and the store of a step's new K/V rows into it (PyTorch twins).

Cache layout: k_cache / v_cache are [num_blocks, block_size, num_kv_heads, head_dim]; a sequence's
token at position p lives in block block_tables[seq, p // block_size], row p % block_size.
A step's queries are packed: sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and
attends causally to its kv_lens[i] cached tokens (the step's own K/V are stored first), i.e.
query j of a sequence sits at absolute position kv_len - q_len + j.

Decodes run batched; prompt chunks run through flash-attn's varlen kernel when it imports (CUDA,
half precision), otherwise through PyTorch SDPA one chunk at a time.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F


def store_kvcache_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v rows [tokens, kv_heads, head_dim] to flat cache slots; slot -1 means skip (padding).
    An fp8 cache stores the rows rounded to fp8 (scale 1)."""
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    block, offset = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    for rows, cache in ((k, k_cache), (v, v_cache)):  # any strides (a V cache may hold keys contiguous)
        as_bytes(cache)[block, offset] = as_bytes(rows.to(cache.dtype))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8 (PyTorch's index kernels skip fp8; copying bytes is exact)."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [tokens, heads, head_dim] -> out with the same shape."""
    return _attend(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, _decode_batch)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The CPU path: decodes through the C++ kernel that reads the paged cache in place (2.6x the
    gather + SDPA twin, bench/cpu_attention.py), prompt chunks through the twin."""
    return _attend(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, _decode_batch_cpp)


def _attend(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale, decode) -> torch.Tensor:
    """Decodes (packed first, one query row each) in one batched call, then each prompt chunk."""
    if 0 < q.shape[0] == kv_lens.shape[0]:  # one query row per sequence: a pure decode step, no packing
        return decode(q, k_cache, v_cache, block_tables, kv_lens, int(kv_lens.max()), scale)
    starts, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    num_decodes = _leading_decodes(starts)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = decode(
            q[:num_decodes], k_cache, v_cache, block_tables[:num_decodes], kv_lens[:num_decodes], max(lens[:num_decodes]), scale
        )
    flash = _flash_varlen(q)
    if flash is not None:  # every prompt chunk in one call
        first = starts[num_decodes]
        out[first:] = _prefill_flash(
            flash, q[first:], k_cache, v_cache, block_tables[num_decodes:], starts[num_decodes:], lens[num_decodes:], scale
        )
        return out
    for i in range(num_decodes, len(lens)):
        start, end = starts[i], starts[i + 1]
        out[start:end] = _prefill_one(q[start:end], k_cache, v_cache, block_tables[i], lens[i], scale)
    return out


@functools.cache
def _flash_attn_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built against another torch / CUDA
        return None
    return flash_attn_varlen_func


def _flash_varlen(q: torch.Tensor):
    """flash-attn's varlen kernel for prompt chunks: on CUDA, in half precision, when it imports."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    return _flash_attn_varlen_func()


def _prefill_flash(flash, q, k_cache, v_cache, block_tables, starts, lens, scale):
    """Prompt chunks (rows starts[i]:starts[i+1] of the packed q, offsets from starts[0]) against their
    gathered K/V in one flash-attn varlen call. Its causal mask is aligned bottom-right, i.e. query j
    of an n-row chunk sits at position kv_len - n + j, as in _prefill_one."""
    block_size = k_cache.shape[1]
    keys, values = [], []
    for table, kv_len in zip(block_tables, lens):
        block_ids = table[: -(-kv_len // block_size)].long()
        keys.append(_gather(k_cache, block_ids, q.dtype)[:kv_len])
        values.append(_gather(v_cache, block_ids, q.dtype)[:kv_len])
    cu_q = torch.tensor([start - starts[0] for start in starts], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=q.device)
    max_q = max(end - start for start, end in zip(starts, starts[1:]))
    return flash(
        q, torch.cat(keys), torch.cat(values), cu_q, cu_k, max_q, max(lens), softmax_scale=scale, causal=True
    )


def _decode_batch_cpp(q, k_cache, v_cache, block_tables, kv_lens, max_kv_len, scale):
    from speedx.kernels.cpu import paged_decode_attention_into

    out = torch.empty_like(q)
    paged_decode_attention_into(out, q, k_cache, v_cache, block_tables.numpy(), kv_lens.numpy(), scale,
                                torch.get_num_threads())
    return out


def _leading_decodes(starts: list[int]) -> int:
    """Sequences are packed decodes (one query row) first."""
    count = 0
    while count + 1 < len(starts) and starts[count + 1] - starts[count] == 1:
        count += 1
    return count


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # [..., blocks] -> [..., blocks * block_size, kv_heads, head_dim] in the queries' dtype (an fp8
    # cache is widened); index_select copies whole blocks, ~3x faster than advanced indexing on CPU.
    _, block_size, kv_heads, head_dim = cache.shape
    gathered = as_bytes(cache).index_select(0, block_ids.flatten()).view(cache.dtype).to(dtype)
    return gathered.view(*block_ids.shape[:-1], block_ids.shape[-1] * block_size, kv_heads, head_dim)


def _decode_batch(q, k_cache, v_cache, block_tables, kv_lens, max_kv_len, scale):
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_kv_len // block_size)
    block_ids = block_tables[:, :num_blocks].clamp_min(0).long()
    k = _gather(k_cache, block_ids, q.dtype).transpose(1, 2)  # [batch, kv_heads, padded_len, head_dim]
    v = _gather(v_cache, block_ids, q.dtype).transpose(1, 2)
    # One query token per sequence: the heads sharing a KV head become that KV head's query rows.
    q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    valid = torch.arange(k.shape[2], device=q.device) < kv_lens.to(q.device).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _prefill_one(q, k_cache, v_cache, block_table, kv_len, scale):
    q_len, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    block_ids = block_table[: -(-kv_len // block_size)].long()
    k = _gather(k_cache, block_ids, q.dtype)[:kv_len].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, kv_len, head_dim]
    v = _gather(v_cache, block_ids, q.dtype)[:kv_len].transpose(0, 1).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
