"""Results returned to callers, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS / stop string / stop token), "length", "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when this request was rejected; the others still ran

    @classmethod
    def from_error(cls, request_id: str, prompt: str | list[int] | None, message: str) -> "RequestOutput":
        """The output of a request that could not be served (it never ran)."""
        text = prompt if isinstance(prompt, str) else None
        ids = [] if prompt is None or isinstance(prompt, str) else list(prompt)
        return cls(request_id, text, ids, [CompletionOutput(0, "", [], "error")], error=message)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
