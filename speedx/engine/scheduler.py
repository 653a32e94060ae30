"""Continuous-batching scheduler: spends a per-step token budget on running sequences first
(decodes and unfinished prompt chunks), then on chunked prefill of waiting ones. When the KV
pool runs dry it preempts the newest running sequence and recomputes it later."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from speedx._C import BlockPool
from speedx.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    sequences: list[Sequence]  # single-token steps first (the attention kernels batch them)
    num_new_tokens: list[int]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        num_preempted = 0

        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.pool.ensure_capacity(seq.seq_id, seq.num_computed_tokens, seq.num_computed_tokens + num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
            else:
                chosen.append((seq, num_new))
                budget -= num_new

        # New prompts only when nothing had to give way: a preemption means memory is short.
        if num_preempted == 0:
            budget = self._admit_waiting(budget, chosen)

        chosen.sort(key=lambda item: item[1] != 1)  # stable: decodes first, order kept otherwise
        return ScheduledBatch([s for s, _ in chosen], [n for _, n in chosen], num_preempted)

    def _admit_waiting(self, budget: int, chosen: list[tuple[Sequence, int]]) -> int:
        """Admit waiting sequences in FIFO order while blocks, budget and max_num_seqs allow.

        A prompt whose first block equals that of a prompt admitted in this same step waits one
        step: by then that block is computed and cached, so it prefills only what differs (many
        synthesis prompts share a long template prefix; prefilling each copy would waste compute).
        """
        block_size = self.pool.block_size
        first_blocks_in_flight: set[tuple[int, ...]] = set()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.grammar_pending:  # its JSON grammar is still compiling: let the others pass
                deferred.append(self.waiting.popleft())
                continue
            first_block = tuple(seq.token_ids[:block_size]) if seq.num_tokens > block_size else None
            if first_block is not None and first_block in first_blocks_in_flight:
                deferred.append(self.waiting.popleft())
                continue
            cached = self.pool.allocate_sequence(seq.seq_id, seq.token_ids, seq.num_tokens)
            if cached < 0:
                break
            self.waiting.popleft()
            if cached == 0 and first_block is not None:
                first_blocks_in_flight.add(first_block)
            seq.num_computed_tokens = cached
            seq.num_registered_blocks = cached // block_size
            if seq.num_output_tokens == 0:
                seq.request.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_tokens - cached, budget)
            chosen.append((seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their original order
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """A further sample of parent: shares its blocks (copy on write) and joins the running set."""
        self.pool.fork(parent.seq_id, child.seq_id)
        self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        """Unschedule seq wherever it is and release its blocks."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        if self.pool.has_sequence(seq.seq_id):
            self.pool.free_sequence(seq.seq_id)

    def abort_all(self) -> None:
        for seq in [*self.waiting, *self.running]:
            self.abort(seq)

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Offer seq's newly full blocks to the prefix cache."""
        bs = self.pool.block_size
        full = seq.num_computed_tokens // bs
        if full > seq.num_registered_blocks:
            self.pool.register_blocks(seq.seq_id, seq.token_ids[seq.num_registered_blocks * bs : full * bs])
            seq.num_registered_blocks = full

    def reserve_next_token(self, seqs: list[Sequence]) -> bool:
        """KV room for one more token of each, without preempting anyone (async scheduling)."""
        return all(self.pool.ensure_capacity(s.seq_id, s.num_tokens, s.num_tokens + 1) for s in seqs)

    @property
    def could_admit(self) -> bool:
        """A waiting sequence would be admitted if blocks allow (max_num_seqs leaves room)."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def kv_cache_usage(self) -> tuple[int, int, int]:
        """(blocks in all, blocks free, tokens per block)."""
        return self.pool.num_blocks, self.pool.num_free_blocks, self.pool.block_size
