"""The flash-attn prefill route of the PyTorch attention path: gathering, packing and the causal
offsets it hands to flash_attn_varlen_func, checked on CPU with a stand-in that implements that
function's documented contract (bottom-right causal mask, GQA) in plain fp32."""

from __future__ import annotations

import importlib

import pytest
import torch

paged = importlib.import_module("speedx.kernels.paged_attention")


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """flash_attn_varlen_func's contract: per sequence, query j of n attends to keys <= kv_len - n + j."""
    assert causal and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    assert max_seqlen_k == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(t) for t in (cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        qi = q[qs:qe].float()
        ki = k[ks:ke].float().repeat_interleave(group, dim=1)
        vi = v[ks:ke].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale
        pos = torch.arange(ke - ks - (qe - qs), ke - ks)
        scores = scores.masked_fill(torch.arange(ke - ks)[None, :] > pos[:, None], float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi).to(q.dtype)
    return out


@pytest.mark.parametrize("chunk_lens,kv_lens", [([5, 17, 1], [5, 40, 9]), ([30], [30]), ([3, 3], [19, 3])])
def test_prompt_chunks_through_the_flash_route_match_the_sdpa_route(monkeypatch, chunk_lens, kv_lens):
    gen = torch.Generator().manual_seed(sum(kv_lens))
    heads, kv_heads, head_dim, block_size = 6, 2, 16, 4
    lens = [11, 7] + kv_lens  # two decodes first, as the scheduler packs them
    rows = [1, 1] + chunk_lens
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.full((len(lens), max(-(-n // block_size) for n in lens)), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(lens):
        tables[i, : -(-n // block_size)] = perm[used : used + -(-n // block_size)]
        used += -(-n // block_size)
    q = torch.randn(sum(rows), heads, head_dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], dtype=torch.int32)
    kv = torch.tensor(lens, dtype=torch.int32)

    sdpa = paged.paged_attention_torch(q, k_cache, v_cache, tables, cu, kv, 0.25)
    calls = []
    monkeypatch.setattr(paged, "_flash_varlen", lambda q: lambda *a, **kw: calls.append(1) or reference_varlen(*a, **kw))
    flash = paged.paged_attention_torch(q, k_cache, v_cache, tables, cu, kv, 0.25)
    assert calls == [1]  # all chunks in one call
    torch.testing.assert_close(flash, sdpa, rtol=1e-5, atol=1e-5)


def test_flash_route_only_for_half_precision_cuda_tensors():
    assert paged._flash_varlen(torch.zeros(1, 1, 8, dtype=torch.bfloat16)) is None  # CPU: never
    if torch.cuda.is_available():
        assert paged._flash_varlen(torch.zeros(1, 1, 8, device="cuda")) is None  # fp32: flash-attn cannot
