"""Owns the model and the KV cache; turns a scheduled batch into tensors, runs it, samples."""

from __future__ import annotations

import numpy as np
import torch

from speedx._C import BlockPool
from speedx.engine.cuda_graphs import DecodeGraphs
from speedx.engine.sampler import counter_uniforms
from speedx.engine.scheduler import ScheduledBatch
from speedx.engine.sequence import Sequence
from speedx.engine.staging import Staging
from speedx.engine.structured_output import GrammarMask
from speedx.kernels.paged_attention import as_bytes
from speedx.models.attention import AttentionMetadata, HostMetadata, leading_decodes
from speedx.models.llama import LlamaForCausalLM


# An fp8 V cache read by the Triton kernels keeps each head's keys contiguous within a block (every
# view stays [blocks, block_size, kv_heads, head_dim]; only V's strides change): P V then reads V as
# it reads K, with no byte-wise shared loads (kernels/triton_attention.py, _load_v_keys_contiguous).
# H100, 2026-11-26 (with triton_attention.FP8_DECODE_TILE's 64-key tile): decode attention at 0.87 of
# copy bandwidth against 0.80, the 8B 1024/1024 grid 9,972 output tok/s against 9,009 (README).
FP8_V_KEYS_CONTIGUOUS = True


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: BlockPool, device: torch.device, kv_cache_dtype: torch.dtype):
        self.model = model
        self.pool = pool
        self.device = device
        c = model.config
        blocks, block_size, heads, dim = pool.num_blocks, pool.block_size, c.num_key_value_heads, c.head_dim
        # Zeroed, not empty: masked-out padding rows are still multiplied by 0 in attention. One flat
        # row per (K/V, layer, block), so block copies need not know the layout inside a block.
        self.kv_cache = torch.zeros((2, c.num_hidden_layers, blocks, block_size * heads * dim), dtype=kv_cache_dtype,
                                    device=device)
        v_keys_contiguous = FP8_V_KEYS_CONTIGUOUS and kv_cache_dtype.itemsize == 1 and model.kernels.strided_v_cache
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i].view(blocks, block_size, heads, dim)
            v = self.kv_cache[1, i]
            layer.self_attn.v_cache = (v.view(blocks, heads, dim, block_size).permute(0, 3, 1, 2) if v_keys_contiguous
                                       else v.view(blocks, block_size, heads, dim))
        self.grammar_mask: GrammarMask | None = None  # the engine sets it on the first json_schema request
        self.decode_graphs: DecodeGraphs | None = None
        self.input_staging = Staging(device)
        self.sampling_staging = Staging(device)

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> bool:
        """CUDA graphs for decode steps up to max_batch sequences. Only on CUDA with the Triton kernels
        (the PyTorch twins read lengths on the host, which a graph cannot). Returns whether it captured."""
        if not self.model.kernels.cuda_graphs:
            return False
        max_blocks = -(-max_model_len // self.pool.block_size)
        self.decode_graphs = DecodeGraphs(self.model, max_batch, max_blocks, self.device)
        self.decode_graphs.capture()
        return True

    @staticmethod
    def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
        """K and V rows of every layer for one token."""
        c = model_config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize

    def _copy_on_write(self) -> None:
        copies = self.pool.take_copies()
        if len(copies):
            src = torch.from_numpy(copies[:, 0]).to(self.device)
            dst = torch.from_numpy(copies[:, 1]).to(self.device)
            cache = as_bytes(self.kv_cache)
            cache[:, :, dst] = cache[:, :, src]

    def _prepare(self, batch: ScheduledBatch, follows: tuple[PendingStep, list[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, np.ndarray]:
        seqs, counts = batch.sequences, batch.num_new_tokens
        ahead = int(follows is not None)  # a launched-ahead step: each sequence is one token further on
        starts = np.fromiter((s.num_computed_tokens + ahead for s in seqs), dtype=np.int64, count=len(seqs))
        counts = np.asarray(counts, dtype=np.int64)
        ends = starts + counts
        num_tokens = int(ends.sum() - starts.sum())
        if follows is not None:  # its input tokens are still on the device: stage their row numbers instead
            input_ids = np.asarray(follows[1], dtype=np.int64)
            positions = starts
        elif num_tokens == len(seqs):  # one token each (decode): the newest, at position `start`
            input_ids = np.fromiter((s.token_ids[a] for s, a in zip(seqs, starts.tolist())), dtype=np.int64, count=num_tokens)
            positions = starts
        else:
            input_ids = np.fromiter((t for s, a, b in zip(seqs, starts, ends) for t in s.token_ids[a:b]), dtype=np.int64, count=num_tokens)
            positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
        seq_ids = np.fromiter((s.seq_id for s in seqs), dtype=np.int64, count=len(seqs))
        slot_mapping = np.empty(len(input_ids), dtype=np.int64)
        self.pool.build_slot_mapping(seq_ids, starts, ends, slot_mapping)
        max_blocks = -(-max(s.num_tokens + ahead for s in seqs) // self.pool.block_size)  # prompts hold all their blocks
        block_tables = np.empty((len(seqs), max_blocks), dtype=np.int32)
        self.pool.build_block_tables(seq_ids, block_tables)
        cu_seqlens = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu_seqlens[1:])

        ids, pos, slots, cu, lens, tables = self.input_staging.to_device(
            input_ids, positions, slot_mapping, cu_seqlens, ends.astype(np.int32), block_tables
        )
        if follows is not None:
            ids = follows[0].tokens.index_select(0, ids)
        host = None
        if self.device.type == "cpu":  # the tensors share these arrays' memory (Staging.to_device)
            host = HostMetadata(positions=pos.numpy(), slot_mapping=slots.numpy(), block_tables=tables.numpy(),
                                kv_lens=lens.numpy(), decode_only=num_tokens == len(seqs))
        meta = AttentionMetadata(slot_mapping=slots, cu_seqlens_q=cu, kv_lens=lens, block_tables=tables,
                                 num_decodes=leading_decodes(counts), host=host)  # the scheduler puts decodes first
        return ids, pos, meta, cu_seqlens

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, follows: tuple[PendingStep, list[int]] | None = None) -> PendingStep:
        """Enqueue one forward step and its sampling; returns before the tokens reach the host.
        follows=(pending, rows): a decode step launched ahead (async scheduling), in which sequence i
        feeds the token that row rows[i] of `pending` sampled, not yet in its token_ids."""
        self._copy_on_write()
        input_ids, positions, meta, cu_seqlens = self._prepare(batch, follows)
        seqs = batch.sequences
        ahead = int(follows is not None)
        graphs = self.decode_graphs
        if graphs and all(s.is_plain_decode for s in seqs) and graphs.fits(len(seqs), meta.block_tables.shape[1]):
            logits = graphs.run(input_ids, positions, meta.slot_mapping, meta.kv_lens, meta.block_tables)
            return PendingStep(len(seqs), None, self._sample(logits, [(s, 0) for s in seqs], ahead))
        hidden = self.model(input_ids, positions, meta)

        last_rows, rows_of = [], []  # rows of `hidden` to sample from; which sequence/sample each is
        for i, (seq, count) in enumerate(zip(batch.sequences, batch.num_new_tokens)):
            if seq.num_computed_tokens + count == seq.num_tokens:
                for sample in range(1 + seq.pending_forks):
                    last_rows.append(int(cu_seqlens[i + 1]) - 1)
                    rows_of.append((i, sample))
        if not last_rows:
            return PendingStep(len(seqs), [], None)
        if last_rows != list(range(hidden.shape[0])):  # a decode step samples every row in order: no gather
            hidden = hidden[torch.tensor(last_rows, device=self.device)]
        logits = self.model.compute_logits(hidden)
        tokens = self._sample(logits, [(batch.sequences[i], sample) for i, sample in rows_of], ahead)
        return PendingStep(len(seqs), rows_of, tokens)

    def _sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]], ahead: int = 0) -> torch.Tensor:
        """ahead: tokens each sequence has beyond its token_ids (1 in a launched-ahead step)."""
        for r, (seq, _) in enumerate(rows):
            p = seq.params
            if p.min_tokens and seq.num_output_tokens + ahead < p.min_tokens:  # too early to stop: hide EOS and stop ids
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else seq.request.eos_token_ids)
                logits[r, banned] = float("-inf")
        # JSON-schema rows: only tokens their grammar allows next (EOS only once the JSON may end).
        # The Triton sampler takes the bitmask itself; otherwise it is applied to the logits here.
        bitmask = None
        if self.grammar_mask is not None:
            matchers = [seq.matcher for seq, _ in rows]
            if self.model.kernels.bitmask_in_sampler:
                bitmask = self.grammar_mask.row_bitmask(logits, matchers)
            else:
                self.grammar_mask.apply(logits, matchers)

        params = [seq.params for seq, _ in rows]

        def column(field, dtype):
            return np.fromiter((getattr(p, field) for p in params), dtype=dtype, count=len(params))

        uniforms = counter_uniforms(
            [seq.request.seed for seq, _ in rows], [seq.sample_index + sample for seq, sample in rows],
            [seq.num_tokens + ahead for seq, _ in rows],
        )
        temperature, top_k, top_p, min_p, uniforms = self.sampling_staging.to_device(
            column("sampling_temperature", np.float32), column("top_k", np.int64), column("top_p", np.float32),
            column("min_p", np.float32), uniforms,
        )
        return self.model.kernels.sample_tokens(logits, temperature, top_k, top_p, min_p, uniforms, bitmask=bitmask)


class PendingStep:
    """A launched step's sampled tokens on their way to the host: result() waits for this step's
    copy only, so later steps may already be queued on the device behind it."""

    def __init__(self, num_seqs: int, rows_of: list[tuple[int, int]] | None, tokens: torch.Tensor | None):
        self.num_seqs = num_seqs
        self.rows_of = rows_of  # (sequence, sample) of each sampled row; None: row i is sequence i
        self.tokens = tokens  # [rows] int64 on the device (a step that follows this one reads them there)
        self._host, self._copied = tokens, None
        if tokens is not None and tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> list[list[int]]:
        """Per scheduled sequence, its sampled tokens: [] while its prompt is still being prefilled in
        chunks, n tokens when an n-sample prompt completes."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens = self._host.tolist() if self._host is not None else []
        if self.rows_of is None:
            return [[t] for t in tokens]
        result: list[list[int]] = [[] for _ in range(self.num_seqs)]
        for (i, _), token in zip(self.rows_of, tokens):
            result[i].append(token)
        return result
