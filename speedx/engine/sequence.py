"""A request and its sequences (one per sample; n > 1 forks after the prompt is prefilled)."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum, auto

from speedx.engine.detokenizer import IncrementalDetokenizer
from speedx.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_seq_ids = itertools.count()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the request's own seed, or one drawn from the engine seed
    eos_token_ids: list[int]
    max_tokens: int  # params.max_tokens, or the context length when that is None
    sequences: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0
    grammar: Future | None = None  # the compiled JSON-schema grammar (compiled in the background)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.is_finished for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    request: Request
    token_ids: list[int]
    sample_index: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    num_registered_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    stop_search_from: int = 0  # characters of the output text already searched for stop strings
    detokenizer: IncrementalDetokenizer | None = None  # the output's text, kept while there are stop strings
    matcher: object | None = None  # xgrammar GrammarMatcher of a json_schema request; survives preemption

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def grammar_pending(self) -> bool:
        """Constrained, but its grammar is still compiling: it cannot be scheduled yet."""
        return self.request.grammar is not None and self.matcher is None

    @property
    def pending_forks(self) -> int:
        """Samples still to split off this sequence when its prompt prefill completes."""
        n = self.request.params.n
        if n == 1 or self.sample_index != 0 or self.num_output_tokens > 0:
            return 0
        return n - 1

    @property
    def is_plain_decode(self) -> bool:
        """It feeds its one newest token and samples one token (what a CUDA-graph decode step runs)."""
        return self.num_computed_tokens == self.num_tokens - 1 and not self.pending_forks

    def fork(self, sample_index: int) -> "Sequence":
        return Sequence(
            request=self.request,
            token_ids=list(self.token_ids),
            sample_index=sample_index,
            num_computed_tokens=self.num_computed_tokens,
            num_registered_blocks=self.num_registered_blocks,
            status=self.status,
        )
