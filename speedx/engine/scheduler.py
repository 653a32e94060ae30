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
        while self.waiting and budget > 0 and num_preempted == 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.pool.allocate_sequence(seq.seq_id, seq.token_ids, seq.num_tokens)
            if cached < 0:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = cached
            seq.num_registered_blocks = cached // self.pool.block_size
            if seq.num_output_tokens == 0:
                seq.request.num_cached_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_tokens - cached, budget)
            chosen.append((seq, num_new))
            budget -= num_new

        chosen.sort(key=lambda item: item[1] != 1)  # stable: decodes first, order kept otherwise
        return ScheduledBatch([s for s, _ in chosen], [n for _, n in chosen], num_preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: already holds (shared) blocks, joins the running set."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_sequence(seq.seq_id)
