"""Self-attention that reads and writes the paged KV cache, plus the per-step metadata it needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from speedx import _C
from speedx.kernels.dispatch import kernel_mode, paged_attention, rope_and_store
from speedx.models.layers import RotaryEmbedding


@dataclass
class HostMetadata:
    """A CPU step's metadata as numpy arrays (the same memory as AttentionMetadata's tensors), which
    the C++ kernels take without a per-layer conversion."""

    positions: np.ndarray  # [tokens] int64
    slot_mapping: np.ndarray  # [tokens] int64
    block_tables: np.ndarray  # [seqs, max_blocks] int32
    kv_lens: np.ndarray  # [seqs] int32
    decode_only: bool  # every sequence has one query row


@dataclass
class AttentionMetadata:
    """Where each packed token of a step goes and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [tokens] int64 flat cache slot of each new token (-1: skip)
    cu_seqlens_q: torch.Tensor  # [seqs + 1] int32 query row offsets; decodes (1 row) come first
    kv_lens: torch.Tensor  # [seqs] int32 tokens in the cache after this step's store
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, -1 padded
    num_decodes: int = 0  # leading sequences with one query row (host number): the Triton attention
    # launches them on its decode tile, apart from the prompt chunks (0: unknown, one launch)
    host: HostMetadata | None = None  # on a CPU: the same metadata for the C++ kernels (None: not built)


def leading_decodes(q_lens) -> int:
    """How many sequences at the front of a step have one query row (AttentionMetadata.num_decodes)."""
    return next((i for i, q_len in enumerate(q_lens) if q_len != 1), len(q_lens))


@dataclass
class CpuStep:
    """What every layer of a bf16 step on the C++ CPU kernels shares: the step's host metadata, the
    thread count, and scratch buffers that each layer overwrites instead of allocating its own."""

    host: HostMetadata
    num_threads: int
    normed: torch.Tensor  # [tokens, hidden]: a norm's output, read by the projection after it
    q: torch.Tensor  # [tokens, heads, head_dim]: rotated queries
    attn_out: torch.Tensor  # [tokens, heads, head_dim]: decode attention's output, read by o_proj


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

    def forward_cpu(self, x: torch.Tensor, meta: AttentionMetadata, step: CpuStep) -> torch.Tensor:
        """forward's bf16 CPU path (same kernels, same arithmetic) with the step's host metadata and
        scratch buffers, and no module calls of its own (LlamaForCausalLM.fused_cpu_step says when)."""
        qkv = self.qkv_proj.forward(x).contiguous()  # a no-op for every CPU linear layer we have
        host = step.host
        self._rope_and_store_into(step.q, qkv, host.positions, host.slot_mapping, step.num_threads)
        if host.decode_only:
            out = step.attn_out
            self._decode_attention_cpu(out, step.q, host, step.num_threads)
        else:  # prompt chunks: the PyTorch twin after the C++ decodes, as forward runs them
            out = paged_attention(step.q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q,
                                  meta.kv_lens, self.scale, mode=self.kernel_mode, num_decodes=meta.num_decodes)
        return self.o_proj.forward(out.view(out.shape[0], self.q_size))

    def _rope_and_store_cpu(self, qkv: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        """The rotary embedding and the cache store above in one C++ pass (csrc/cpu_rope.cpp), same
        rounding; returns the rotated queries."""
        q = qkv.new_empty(qkv.shape[0], self.num_heads, self.head_dim)
        self._rope_and_store_into(q, qkv.contiguous(), positions.numpy(), slot_mapping.numpy(), torch.get_num_threads())
        return q

    def _rope_and_store_into(self, q: torch.Tensor, qkv: torch.Tensor, positions: np.ndarray, slot_mapping: np.ndarray,
                             num_threads: int) -> None:
        """_rope_and_store_cpu on a contiguous qkv and the step's host arrays, the queries into q."""
        cos, sin = self.rotary.cos_table, self.rotary.sin_table
        _C.rope_store_bf16(
            q.data_ptr(), self.k_cache.data_ptr(), self.v_cache.data_ptr(), qkv.data_ptr(), positions, slot_mapping,
            cos.data_ptr(), sin.data_ptr(), self.num_heads, self.num_kv_heads, self.head_dim,
            cos.shape[0], self.k_cache.shape[0] * self.k_cache.shape[1], num_threads,
        )

    def _decode_attention_cpu(self, out: torch.Tensor, q: torch.Tensor, host: HostMetadata, num_threads: int) -> None:
        """One query row per sequence through the C++ kernel that reads the paged cache in place: the
        call kernels/paged_attention.py makes for a pure decode step, writing into `out`."""
        num_blocks, block_size = self.k_cache.shape[:2]
        _C.paged_decode_attention(
            out.data_ptr(), q.data_ptr(), self.k_cache.data_ptr(), self.v_cache.data_ptr(), host.block_tables,
            host.kv_lens, self.num_heads, self.num_kv_heads, self.head_dim, block_size, num_blocks, self.scale,
            str(q.dtype), num_threads,
        )
