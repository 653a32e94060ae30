"""OpenAI request shapes (validated with pydantic), their mapping to SamplingParams, and error bodies.

Unknown fields are ignored, as OpenAI does. Features this server does not implement (logprobs,
tools, echo, best_of > 1, suffix, presence/frequency/repetition penalties, logit_bias) are rejected
with a 400 rather than silently dropped, since a client relying on them would otherwise get wrong
results without noticing; their neutral values (0, 1 for repetition_penalty, {}) are accepted.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from speedx.engine.sampling_params import SamplingParams

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_COMPLETION_MAX_TOKENS = 16  # /v1/completions without max_tokens, as OpenAI's legacy API
MAX_N = 16
MAX_STOP = 4
MAX_PROMPTS = 256  # prompts in one /v1/completions request
JSON_OBJECT_SCHEMA = {"type": "object"}  # response_format {"type": "json_object"}: any JSON object
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|\[")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"  # OpenAI's types
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow a BaseModel attribute
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(_Body):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None  # optional here (curl convenience); if given it must be the served model
    n: int = Field(1, ge=1, le=MAX_N, strict=True)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Extensions with vLLM's names (the official client sends them through extra_body).
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = Field(False, strict=True)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
    @classmethod
    def _unsupported_sampling(cls, value, info):  # (a subclass's `_unsupported` would replace it)
        return _reject_if_set(value, info.field_name)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def json_schema(self) -> dict | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JSON_OBJECT_SCHEMA
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
        return fmt.json_schema.schema_

    def sampling_params(self, max_tokens: int, defaults: SamplingParams) -> SamplingParams:
        """defaults: for the sampling settings the request leaves out (LLM.get_default_sampling_params)."""
        def given(name):
            value = getattr(self, name)
            return getattr(defaults, name) if value is None else value

        try:
            return SamplingParams(
                n=self.n, temperature=given("temperature"), top_p=given("top_p"), top_k=given("top_k"),
                min_p=given("min_p"), max_tokens=max_tokens, min_tokens=self.min_tokens, seed=self.seed,
                stop=self.stop, ignore_eos=self.ignore_eos, json_schema=self.json_schema(),
            )
        except ValueError as exc:
            raise APIError(400, str(exc).removeprefix("SamplingParams: ")) from None


def _reject_if_set(value, name: str):
    if value in (None, False, 0, "", [], {}) or (name in ("best_of", "repetition_penalty") and value == 1):
        return value
    raise ValueError(f"{name} is not supported by this server")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return content

    def template_dict(self) -> dict:
        """The message for LLM.apply_chat_template (which joins text parts as vLLM does)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None

    @field_validator("logprobs", "top_logprobs", "tools")
    @classmethod
    def _unsupported(cls, value, info):
        return _reject_if_set(value, info.field_name)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Any  # a string, a list of strings, a token-id list, or a list of token-id lists (checked below)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("logprobs", "echo", "best_of", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        return _reject_if_set(value, info.field_name)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt):
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt)):
            return prompt
        if not isinstance(prompt, list) or not prompt or not (
            all(isinstance(p, str) for p in prompt)
            or all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt)
        ):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of such lists")
        if len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        return prompt

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a token-id list."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic/FastAPI validation error as an OpenAI-style 400."""
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    # Drop "body" and the union-branch tags pydantic adds to a location ("stop.str", "stop.list[str]").
    loc = [str(part) for part in err.get("loc", ()) if part != "body" and not _UNION_TAG.match(str(part))]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    if not loc and err.get("type") == "missing":
        return APIError(400, "the request body is missing: send a JSON object")
    param = ".".join(loc) or None
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param)
