"""Per-request decoding settings (vLLM-compatible names), validated at construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    json_schema: dict | str | None = None  # constrain the output to JSON matching this schema
    stop_strings: list[str] = field(init=False, repr=False)
    json_schema_text: str | None = field(init=False, repr=False)  # compact JSON text; the grammar cache key

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"SamplingParams: {message}")

        if not isinstance(self.n, int) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            fail(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            fail(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            fail(f"seed must be an integer or None, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            fail(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = stops
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.json_schema_text = None
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    fail(f"json_schema is not valid JSON: {exc}")
            if not isinstance(schema, dict):
                fail(f"json_schema must be a JSON Schema object (a dict or its JSON text), got {self.json_schema!r}")
            try:
                # Key order is kept, not sorted: property order decides the order of keys in the output.
                self.json_schema_text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                fail(f"json_schema must hold only JSON values: {exc}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
