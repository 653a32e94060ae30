"""CUDA graphs for pure-decode steps: one graph per batch size in a ladder, replayed with padded lanes.

A decode step of a small model is a few hundred tiny kernels; launching them one by one from Python
costs more than running them. Each captured graph reads its inputs from static buffers, so a step
only copies this step's ids, positions, slots, lengths and block tables into them and replays.
Padded lanes (batch rounded up to the next captured size) store nothing (slot -1) and attend over
one token of whatever block their stale table row names; their logits are never sampled.
"""

from __future__ import annotations

import torch

from speedx.models.attention import AttentionMetadata


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 (as vLLM does): at most 15 wasted lanes per step."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, device: torch.device):
        self.model = model
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = max_batch
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # one query row each
        self.kv_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:size], self.cu_seqlens[: size + 1], self.kv_lens[:size],
                                 self.block_tables[:size])
        hidden = self.model(self.input_ids[:size], self.positions[:size], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, all sharing one memory pool (a smaller graph reuses the larger one's blocks)."""
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.max_batch and num_blocks <= self.block_tables.shape[1]

    def run(self, input_ids, positions, slot_mapping, kv_lens, block_tables) -> torch.Tensor:
        """Inputs of a pure-decode step (one token per sequence, device tensors) -> logits [seqs, vocab]."""
        n, width = block_tables.shape
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:size].fill_(-1)  # stale slots may belong to live sequences: never store there
        self.kv_lens[:n].copy_(kv_lens)
        self.kv_lens[n:size].fill_(1)  # padded lanes attend over one token, not a stale context
        self.block_tables[:n, :width].copy_(block_tables)
        self.graphs[size].replay()
        return self.logits[size][:n]
