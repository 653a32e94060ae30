"""Self-attention that reads and writes the paged KV cache, plus the per-step metadata it needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from speedx.kernels.cpu import paged_decode_attention_into, rope_and_store_into
from speedx.kernels.registry import Kernels, twins
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
    """Grouped-query attention with a fused QKV projection over the paged cache, on the engine's
    kernels (kernels/registry.py; the PyTorch twins when built without them)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, rotary: RotaryEmbedding, qkv_bias: bool,
                 kernels: Kernels | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=False)
        self.rotary = rotary
        self.kernels = kernels or twins()
        # Set by the model runner once the cache is allocated.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q = self.kernels.rope_and_store(qkv, positions, self.rotary.cos_table, self.rotary.sin_table, self.k_cache,
                                        self.v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        out = self.kernels.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q,
                                           meta.kv_lens, self.scale, num_decodes=meta.num_decodes)
        return self.o_proj(out.flatten(1))

    def forward_cpu(self, x: torch.Tensor, meta: AttentionMetadata, step: CpuStep) -> torch.Tensor:
        """forward's bf16 CPU path (same kernels, same arithmetic) with the step's host metadata and
        scratch buffers, and no module calls of its own (LlamaForCausalLM's fused CPU step)."""
        qkv = self.qkv_proj.forward(x).contiguous()  # a no-op for every CPU linear layer we have
        host = step.host
        rope_and_store_into(step.q, qkv, host.positions, host.slot_mapping, self.rotary.cos_table,
                            self.rotary.sin_table, self.k_cache, self.v_cache, self.num_heads, self.num_kv_heads,
                            step.num_threads)
        if host.decode_only:
            out = step.attn_out
            paged_decode_attention_into(out, step.q, self.k_cache, self.v_cache, host.block_tables, host.kv_lens,
                                        self.scale, step.num_threads)
        else:  # prompt chunks: the kernels forward runs them on
            out = self.kernels.paged_attention(step.q, self.k_cache, self.v_cache, meta.block_tables,
                                               meta.cu_seqlens_q, meta.kv_lens, self.scale,
                                               num_decodes=meta.num_decodes)
        return self.o_proj.forward(out.view(out.shape[0], self.q_size))
