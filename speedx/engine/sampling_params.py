"""Per-request decoding settings (vLLM-compatible names), validated at construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

# Temperatures below this decode greedily, as in vLLM: logits divided by a tinier one overflow fp32.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: until the context (max_model_len) is full, as in vLLM
    min_tokens: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    json_schema: dict | str | None = None  # constrain the output to JSON matching this schema

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"SamplingParams: {message}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not is_int(self.n) or self.n < 1:
            fail(f"n must be an integer >= 1, got {self.n!r}")
        if not is_number(self.temperature) or self.temperature < 0:
            fail(f"temperature must be a finite number >= 0 (below {GREEDY_BELOW}: greedy), got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            fail(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail(f"max_tokens must be an integer >= 1 or None (until the context is full), got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            fail(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.seed is not None and not is_int(self.seed):
            fail(f"seed must be an integer or None, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or not s for s in stops):
            fail(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple)) or any(not is_int(t) or t < 0 for t in ids):
            fail(f"stop_token_ids must be a list of token ids (integers >= 0), got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.json_schema is not None:
            try:
                self.json_schema_text
            except ValueError as exc:
                fail(str(exc))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def sampling_temperature(self) -> float:
        """What the sampler divides the logits by; 0 means greedy (argmax)."""
        return 0.0 if self.greedy else float(self.temperature)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def json_schema_text(self) -> str | None:
        """json_schema as compact JSON text (the grammar cache key); None without a schema."""
        schema = self.json_schema
        if schema is None:
            return None
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"json_schema must be a JSON Schema object (a dict or its JSON text), got {self.json_schema!r}")
        try:
            # Key order is kept, not sorted: property order decides the order of keys in the output.
            return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"json_schema must hold only JSON values: {exc}") from None
