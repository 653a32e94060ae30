"""The step loop: admit requests, schedule, run the model, apply stop rules, emit finished outputs."""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass


from speedx._C import BlockPool
from speedx.engine.detokenizer import IncrementalDetokenizer
from speedx.engine.model_runner import ModelRunner, PendingStep
from speedx.engine.outputs import CompletionOutput, RequestOutput
from speedx.engine.sampling_params import SamplingParams
from speedx.engine.scheduler import ScheduledBatch, Scheduler
from speedx.engine.sequence import Request, Sequence, SequenceStatus
from speedx.engine.structured_output import StructuredOutputs
from speedx.hashing import splitmix64

logger = logging.getLogger("speedx")


@dataclass
class StepStats:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0
    num_sequences: int = 0  # sequences that got a token: the step's batch
    seconds: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    """The engine's state between steps."""

    num_unfinished_requests: int
    num_running: int
    num_waiting: int
    max_num_seqs: int
    kv_cache_blocks: int
    kv_cache_free_blocks: int
    block_size: int


class LLMEngine:
    """The step loop. Its public surface, used by LLM, the async server engine and the synthesis
    pipeline: add_request, step, abort_request, abort_all, has_unfinished_requests, stats,
    reset_prefix_cache; step_sequences and output_text for streaming. The scheduler owns the queues
    and the KV block pool."""

    def __init__(self, model, tokenizer, pool: BlockPool, device, kv_cache_dtype, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, seed: int, async_scheduling: bool = False):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = model.config.vocab_size
        self.seed = seed
        self.eos_token_ids = sorted(set(model.config.eos_token_ids) | _tokenizer_eos(tokenizer))
        self.runner = ModelRunner(model, pool, device, kv_cache_dtype)
        self.scheduler = Scheduler(pool, max_num_seqs, max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._num_added = 0
        self._structured: StructuredOutputs | None = None  # built on the first json_schema request
        self._compiling: list[Request] = []  # json_schema requests whose sequence has no matcher yet
        # Sequences that received a token in the latest step(), in order: servers stream their new
        # tokens from here (output_token_ids grew; finished ones end with output_text(seq)).
        self.step_sequences: list[Sequence] = []
        # Launch each plain decode step before the tokens of the one before reach the host (see _launch_ahead).
        self.async_scheduling = async_scheduling
        self._ahead: tuple[ScheduledBatch, PendingStep] | None = None

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
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"request {request_id}: stop_token_ids must be token ids in [0, {self.vocab_size})")
        try:
            schema = params.json_schema_text
            grammar = None if schema is None else self.structured_outputs.grammar(schema)
        except ValueError as exc:
            raise ValueError(f"request {request_id}: {exc}") from None
        seed = params.seed if params.seed is not None else splitmix64(self.seed ^ splitmix64(self._num_added))
        self._num_added += 1
        request = Request(request_id, text, token_ids, params, seed, self.eos_token_ids,
                          params.max_tokens or self.max_model_len, grammar=grammar)
        request.sequences.append(Sequence(request, list(token_ids)))
        self.requests[request_id] = request
        self.scheduler.add(request.sequences[0])
        if grammar is not None:
            self._compiling.append(request)

    @property
    def structured_outputs(self) -> StructuredOutputs:
        if self._structured is None:
            self._structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
            self.runner.grammar_mask = self._structured.mask
        return self._structured

    def abort_all(self) -> None:
        """Drop every unfinished request and release its KV blocks."""
        self.scheduler.abort_all()
        self.requests.clear()
        self._compiling.clear()
        self._ahead = None  # its device work finishes on its own; nothing reads its tokens

    def abort_request(self, request_id: str) -> bool:
        """Drop one unfinished request (e.g. its client went away): unschedule it, free its KV blocks.
        Returns False if no such request is unfinished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            self.scheduler.abort(seq)
            if not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        if request in self._compiling:
            self._compiling.remove(request)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        blocks, free, block_size = scheduler.kv_cache_usage()
        return EngineStats(len(self.requests), len(scheduler.running), len(scheduler.waiting), scheduler.max_num_seqs,
                           blocks, free, block_size)

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt prefixes, e.g. between timed runs (as vLLM's reset_prefix_cache)."""
        self.scheduler.reset_prefix_cache()

    # ------------------------------------------------------------------ step loop

    def step(self) -> tuple[list[RequestOutput], StepStats]:
        start = time.perf_counter()
        self.step_sequences = []
        if self._ahead is not None:  # launched by the previous step() before its tokens were known
            (batch, pending), self._ahead = self._ahead, None
            finished, stats = [], StepStats()
        else:
            finished = self._take_compiled_grammars() if self._compiling else []
            batch = self.scheduler.schedule()
            stats = StepStats(num_preempted=batch.num_preempted)
            if not batch.sequences:
                if self._compiling:  # all that is left waits on a grammar: block until one is compiled
                    wait([r.grammar for r in self._compiling], return_when=FIRST_COMPLETED)
                elif self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress; the KV cache is too small for a single sequence")
                stats.seconds = time.perf_counter() - start
                return finished, stats
            pending = self.runner.launch(batch)
        if self.async_scheduling:
            self._ahead = self._launch_ahead(batch, pending)
        sampled = pending.result()
        for seq, count, tokens in zip(batch.sequences, batch.num_new_tokens, sampled):
            if seq.is_finished or self.requests.get(seq.request.request_id) is not seq.request:
                continue  # it ended (a stop, an abort) while this launched-ahead step was on its way
            if count == 1 and seq.num_computed_tokens == seq.num_tokens - 1:
                stats.num_decode_tokens += 1
            else:
                stats.num_prefill_tokens += count
            seq.num_computed_tokens += count
            self.scheduler.register_computed_blocks(seq)
            if not tokens:
                continue
            for sample_index, token in enumerate(tokens[1:], start=1):
                child = seq.fork(sample_index)
                seq.request.sequences.append(child)
                self.scheduler.fork(seq, child)
                if seq.matcher is not None:  # fresh: fork time is before the parent accepts its first token
                    child.matcher = self.structured_outputs.matcher(seq.request.grammar.result())
                self._append_token(child, token)
            self._append_token(seq, tokens[0])
            request = seq.request
            if seq.is_finished and request.finished and request.request_id in self.requests:
                finished.append(self._finish_request(request))
        stats.num_sequences = len(self.step_sequences)
        stats.seconds = time.perf_counter() - start
        return finished, stats

    def _launch_ahead(self, batch: ScheduledBatch, pending: PendingStep) -> tuple[ScheduledBatch, PendingStep] | None:
        """Async scheduling: launch the next decode step now, its input tokens read on the device
        from `pending`, so this step's bookkeeping on the host overlaps the device's work. Only when
        the next step would be a plain decode anyway: every running sequence decoding, no grammar, no
        room to admit a waiting prompt (max_num_seqs running), KV room for one more token each. A
        sequence that stops on this step's token (EOS, a stop string) still runs in the next one; that
        token is dropped, and a prompt waiting for its place is admitted a step later. Those the length
        limit will stop are left out."""
        scheduler = self.scheduler
        if self._compiling or scheduler.could_admit:
            return None
        rows, seqs, ending = [], [], 0
        for i, (seq, count) in enumerate(zip(batch.sequences, batch.num_new_tokens)):
            if seq.is_finished:
                continue
            if count != 1 or not seq.is_plain_decode or seq.matcher:
                return None
            if seq.num_output_tokens + 1 >= seq.request.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                ending += 1
                continue
            rows.append(i)
            seqs.append(seq)
        if not seqs or len(seqs) + ending != len(scheduler.running) or len(seqs) > scheduler.max_num_batched_tokens:
            return None
        if not scheduler.reserve_next_token(seqs):
            return None  # the next schedule() preempts as it must
        ahead = ScheduledBatch(seqs, [1] * len(seqs))
        return ahead, self.runner.launch(ahead, follows=(pending, rows))

    def _take_compiled_grammars(self) -> list[RequestOutput]:
        """Give each request whose grammar is compiled its matcher; fail those whose compile failed."""
        failed, pending = [], []
        for request in self._compiling:
            if not request.grammar.done():
                pending.append(request)
                continue
            seq = request.sequences[0]
            try:
                seq.matcher = self.structured_outputs.matcher(request.grammar.result())
            except Exception as exc:
                logger.warning("request %s: the JSON schema could not be compiled: %s", request.request_id, exc)
                request.error = f"request {request.request_id}: the JSON schema could not be compiled: {exc}"
                self.scheduler.abort(seq)  # never admitted: it holds no KV blocks
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
                failed.append(self._finish_request(request))
        self._compiling = pending
        return failed

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self.step_sequences.append(seq)
        reason = self._grammar_stop(seq, token) if seq.matcher is not None else None
        reason = reason or self._stop_reason(seq, token)
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason
            seq.status = SequenceStatus.FINISHED
            self.scheduler.finish(seq)

    def _grammar_stop(self, seq: Sequence, token: int) -> tuple[str, None] | None:
        if not seq.matcher.accept_token(token):  # the mask left no valid token (an unsatisfiable schema)
            seq.request.error = f"request {seq.request.request_id}: no token can continue JSON that fits the schema"
            return "error", None
        if self.structured_outputs.json_complete(seq.matcher):
            return "stop", None
        return None

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, str | int | None] | None:
        p = seq.params
        num_output_tokens = seq.num_output_tokens
        can_stop = num_output_tokens >= p.min_tokens
        if can_stop and not p.ignore_eos and token in seq.request.eos_token_ids:
            return "stop", None
        if can_stop and token in p.stop_token_ids:
            return "stop", token
        stops = p.stop_strings
        if stops:
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            seq.detokenizer.add(token)
            text = seq.detokenizer.text
            # As vLLM: a stop string counts where it ends in the text of a token after the first
            # min_tokens, and only there (the search starts a stop string's length before the new text).
            if num_output_tokens > p.min_tokens:
                for stop in stops:
                    at = text.find(stop, max(0, seq.stop_search_from - len(stop) + 1))
                    if at >= 0:
                        seq.output_text = text[: at + len(stop)] if p.include_stop_str_in_output else text[:at]
                        return "stop", stop
            seq.stop_search_from = len(text)
        if num_output_tokens >= seq.request.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def _decode(self, ids: list[int], seq: Sequence) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def output_text(self, seq: Sequence) -> str:
        """The text a finished sequence reports: cut at its stop string, if one ended it; without the
        text of the stop token (EOS or one of stop_token_ids) that ended it, as vLLM, unless
        include_stop_str_in_output."""
        if isinstance(seq.stop_reason, str):
            return seq.output_text
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and ids and self._ended_by_token(seq, ids[-1]):
            ids = ids[:-1]
        return self._decode(ids, seq)

    @staticmethod
    def _ended_by_token(seq: Sequence, last: int) -> bool:
        """Whether the last token of a sequence that stopped is a stop token whose text is left out."""
        p, eos = seq.params, seq.request.eos_token_ids
        if seq.matcher is not None:
            return last in eos  # the EOS after constrained JSON is no part of it
        if p.include_stop_str_in_output:
            return False
        return last in p.stop_token_ids or (not p.ignore_eos and last in eos)

    def _finish_request(self, request: Request) -> RequestOutput:
        del self.requests[request.request_id]
        outputs = []
        for seq in sorted(request.sequences, key=lambda s: s.sample_index):
            outputs.append(CompletionOutput(seq.sample_index, self.output_text(seq), seq.output_token_ids,
                                            seq.finish_reason, seq.stop_reason))
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, outputs,
            num_cached_tokens=request.num_cached_tokens, error=request.error,
        )


def _tokenizer_eos(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}
