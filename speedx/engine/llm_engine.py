"""The step loop: admit requests, schedule, run the model, apply stop rules, emit finished outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from speedx._C import BlockPool
from speedx.engine.model_runner import ModelRunner
from speedx.engine.outputs import CompletionOutput, RequestOutput
from speedx.engine.sampling_params import SamplingParams
from speedx.engine.scheduler import Scheduler
from speedx.engine.sequence import Request, Sequence, SequenceStatus
from speedx.engine.sampler import _splitmix64

logger = logging.getLogger("speedx")


@dataclass
class StepStats:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0
    seconds: float = 0.0


class LLMEngine:
    def __init__(self, model, tokenizer, pool: BlockPool, device, dtype, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, seed: int):
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_model_len = max_model_len
        self.vocab_size = model.config.vocab_size
        self.seed = seed
        self.eos_token_ids = sorted(set(model.config.eos_token_ids) | _tokenizer_eos(tokenizer))
        self.runner = ModelRunner(model, pool, device, dtype)
        self.scheduler = Scheduler(pool, max_num_seqs, max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._num_added = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it cannot be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
        if not token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty; give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"request {request_id}: prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"request {request_id}: the prompt has {len(token_ids)} tokens but max_model_len is "
                f"{self.max_model_len} (model length and KV budget); shorten it to at most {self.max_model_len - 1}"
            )
        seed = params.seed if params.seed is not None else _splitmix64(self.seed ^ _splitmix64(self._num_added))
        self._num_added += 1
        request = Request(request_id, text, token_ids, params, seed, self.eos_token_ids)
        request.sequences.append(Sequence(request, list(token_ids)))
        self.requests[request_id] = request
        self.scheduler.add(request.sequences[0])

    def abort_all(self) -> None:
        """Drop every unfinished request and release its KV blocks."""
        for request in self.requests.values():
            for seq in request.sequences:
                if self.pool.has_sequence(seq.seq_id):
                    self.pool.free_sequence(seq.seq_id)
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self.requests.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ step loop

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        stats = StepStats(num_preempted=batch.num_preempted)
        if not batch.sequences:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress; the KV cache is too small for a single sequence")
            return [], stats
        sampled = self.runner.run(batch)
        finished: list[RequestOutput] = []
        for seq, count, tokens in zip(batch.sequences, batch.num_new_tokens, sampled):
            if count == 1 and seq.num_computed_tokens == seq.num_tokens - 1:
                stats.num_decode_tokens += 1
            else:
                stats.num_prefill_tokens += count
            seq.num_computed_tokens += count
            self._register_computed_blocks(seq)
            if not tokens:
                continue
            for sample_index, token in enumerate(tokens[1:], start=1):
                child = seq.fork(sample_index)
                self.pool.fork(seq.seq_id, child.seq_id)
                seq.request.sequences.append(child)
                self.scheduler.add_running(child)
                self._append_token(child, token)
            self._append_token(seq, tokens[0])
            request = seq.request
            if request.finished and request.request_id in self.requests:
                finished.append(self._finish_request(request))
        stats.seconds = time.perf_counter() - start
        return finished, stats

    def _register_computed_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed_tokens // self.pool.block_size
        if full > seq.num_registered_blocks:
            bs = self.pool.block_size
            self.pool.register_blocks(seq.seq_id, seq.token_ids[seq.num_registered_blocks * bs : full * bs])
            seq.num_registered_blocks = full

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        reason = self._stop_reason(seq, token)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason
            seq.status = SequenceStatus.FINISHED
            self.scheduler.finish(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, str | int | None] | None:
        p = seq.params
        can_stop = seq.num_output_tokens >= p.min_tokens
        if can_stop and not p.ignore_eos and token in seq.request.eos_token_ids:
            return "stop", None
        if can_stop and token in p.stop_token_ids:
            return "stop", token
        if can_stop and p.stop_strings:
            text = self._decode(seq)
            for stop in p.stop_strings:
                at = text.find(stop)
                if at >= 0:
                    seq.output_text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                    return "stop", stop
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _finish_request(self, request: Request) -> RequestOutput:
        del self.requests[request.request_id]
        outputs = []
        for seq in sorted(request.sequences, key=lambda s: s.sample_index):
            text = seq.output_text if isinstance(seq.stop_reason, str) else self._decode(seq)
            outputs.append(CompletionOutput(seq.sample_index, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, outputs, num_cached_tokens=request.num_cached_tokens
        )


def _tokenizer_eos(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}
