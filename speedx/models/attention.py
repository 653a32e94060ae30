"""Self-attention that reads and writes the paged KV cache, plus the per-step metadata it needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from speedx.kernels.dispatch import kernel_mode, paged_attention, rope_and_store
from speedx.models.layers import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where each packed token of a step goes and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [tokens] int64 flat cache slot of each new token (-1: skip)
    cu_seqlens_q: torch.Tensor  # [seqs + 1] int32 query row offsets; decodes (1 row) come first
    kv_lens: torch.Tensor  # [seqs] int32 tokens in the cache after this step's store
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, -1 padded
    num_decodes: int = 0  # leading sequences with one query row (host number): the Triton attention
    # launches them on its decode tile, apart from the prompt chunks (0: unknown, one launch)


def leading_decodes(q_lens) -> int:
    """How many sequences at the front of a step have one query row (AttentionMetadata.num_decodes)."""
    return next((i for i, q_len in enumerate(q_lens) if q_len != 1), len(q_lens))


class PagedAttention(nn.Module):
    """Grouped-query attention with a fused QKV projection over the paged cache."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, rotary: RotaryEmbedding, qkv_bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=False)
        self.rotary = rotary
        # Set by the model runner once the cache is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # SPEEDX_KERNELS, read once when the model is built (kernels/dispatch.py).
        self.kernel_mode = kernel_mode()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if qkv.device.type == "cpu" and qkv.dtype == self.k_cache.dtype == torch.bfloat16 and self.kernel_mode != "triton":
            q = self._rope_and_store_cpu(qkv, positions, meta.slot_mapping)
        else:
            q = rope_and_store(qkv, positions, self.rotary.cos_table, self.rotary.sin_table, self.k_cache, self.v_cache,
                               meta.slot_mapping, self.num_heads, self.num_kv_heads, mode=self.kernel_mode)
        out = paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q, meta.kv_lens,
                              self.scale, mode=self.kernel_mode, num_decodes=meta.num_decodes)
        return self.o_proj(out.flatten(1))

    def _rope_and_store_cpu(self, qkv: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """The rotary embedding and the cache store above in one C++ pass (csrc/cpu_rope.cpp), same rounding."""
        from speedx import _C

        qkv = qkv.contiguous()
        q = qkv.new_empty(qkv.shape[0], self.num_heads, self.head_dim)
        cos, sin = self.rotary.cos_table, self.rotary.sin_table
        _C.rope_store_bf16(
            q.data_ptr(), self.k_cache.data_ptr(), self.v_cache.data_ptr(), qkv.data_ptr(), positions.numpy(),
            slot_mapping.numpy(), cos.data_ptr(), sin.data_ptr(), self.num_heads, self.num_kv_heads, self.head_dim,
            cos.shape[0], self.k_cache.shape[0] * self.k_cache.shape[1], torch.get_num_threads(),
        )
        return q
