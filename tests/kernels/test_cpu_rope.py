"""speedx._C.rope_store_bf16 (RoPE on the fused QKV output plus the KV-cache store, one C++ pass)
against its PyTorch twin: RotaryEmbedding + store_kvcache_torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speedx import _C
from speedx.kernels.cpu import rope_and_store_cpu
from speedx.kernels.paged_attention import store_kvcache_torch
from speedx.models.attention import PagedAttention
from speedx.models.layers import RotaryEmbedding


def make_attention(num_heads, num_kv_heads, head_dim, num_slots, scaling=None):
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, scaling)
    attn = PagedAttention(num_heads * head_dim, num_heads, num_kv_heads, head_dim, rotary, qkv_bias=False)
    attn.k_cache = torch.zeros(num_slots // 4, 4, num_kv_heads, head_dim, dtype=torch.bfloat16)
    attn.v_cache = torch.zeros_like(attn.k_cache)
    return attn


def rope_and_store(attn, qkv, positions, slots):
    return rope_and_store_cpu(qkv, positions, attn.rotary.cos_table, attn.rotary.sin_table, attn.k_cache, attn.v_cache,
                              slots, attn.num_heads, attn.num_kv_heads)


def twin(attn, qkv, positions, slots):
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary(positions, q.reshape(-1, attn.num_heads, attn.head_dim), k.reshape(-1, attn.num_kv_heads, attn.head_dim))
    k_cache, v_cache = torch.zeros_like(attn.k_cache), torch.zeros_like(attn.v_cache)
    store_kvcache_torch(k, v.reshape(-1, attn.num_kv_heads, attn.head_dim), k_cache, v_cache, slots)
    return q, k_cache, v_cache


@pytest.mark.parametrize("heads,kv_heads,head_dim,tokens", [(9, 3, 64, 64), (4, 4, 2, 1), (6, 2, 30, 17), (8, 1, 128, 5)])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 512}])
def test_bit_identical_to_the_twin(heads, kv_heads, head_dim, tokens, scaling):
    gen = torch.Generator().manual_seed(heads * 100 + tokens)
    attn = make_attention(heads, kv_heads, head_dim, num_slots=4 * 64, scaling=scaling)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3).bfloat16()
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    slots = torch.randperm(4 * 64, generator=gen)[:tokens]
    slots[::3] = -1  # padding rows: nothing stored
    q = rope_and_store(attn, qkv, positions, slots)
    ref_q, ref_k, ref_v = twin(attn, qkv, positions, slots)
    assert torch.equal(q, ref_q)
    assert torch.equal(attn.k_cache, ref_k) and torch.equal(attn.v_cache, ref_v)


def test_bad_positions_and_slots_are_clear_errors_and_write_nothing():
    attn = make_attention(2, 1, 4, num_slots=8)
    qkv = torch.randn(2, 16).bfloat16()
    for positions, slots, message in [
        ([0, 4096], [0, 1], r"positions\[1\] = 4096 is outside \[0, 4096\)"),
        ([0, 1], [0, 8], r"slots\[1\] = 8 is outside \[-1, 8\)"),
        ([0, -1], [0, 1], r"positions\[1\] = -1 is outside"),
    ]:
        with pytest.raises(ValueError, match=message):
            rope_and_store(attn, qkv, torch.tensor(positions), torch.tensor(slots))
        assert not attn.k_cache.any() and not attn.v_cache.any()
    with pytest.raises(ValueError, match="positions and slots must have one entry per token"):
        _C.rope_store_bf16(1, 1, 1, 1, np.zeros(2, np.int64), np.zeros(3, np.int64), 1, 1, 2, 1, 4, 10, 8, 1)
    with pytest.raises(ValueError, match="an even head_dim"):
        _C.rope_store_bf16(1, 1, 1, 1, np.zeros(2, np.int64), np.zeros(2, np.int64), 1, 1, 2, 1, 5, 10, 8, 1)
