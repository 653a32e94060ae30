"""Teacher client for any OpenAI-compatible chat API: retries, on-disk cache, usage accounting, hard budget.

Budget semantics (``TeacherConfig.max_calls``, flag ``--max-teacher-calls``):
    A *call* is one request that got a successful (2xx, well-formed) completion from the server;
    that is what a provider bills. Failed attempts (429, 5xx, timeouts, the 400 of the
    response_format fallback) are not calls; they are counted as ``attempts`` (every HTTP request
    sent) and ``retries``. Cache hits are counted as ``cached`` and never touch the budget.
    A request reserves one unit of budget before its first attempt and keeps it while it retries;
    it is released again if the request finally fails. So calls never exceed ``max_calls``, even
    with many requests in flight. Once the budget is spent, ``chat`` raises ``BudgetExhausted`` and
    ``chat_many`` returns ``TeacherFailure(kind="not_run")`` for what it did not start (cache hits
    are still served). ``merge_usage`` can count a previous run's calls against the budget, so the
    flag caps a run's total spend across resumes.

Usage file (``TeacherConfig.usage_file``):
    When set, the client merges the file at start (earlier processes' calls count against the budget)
    and rewrites it after every paid call, before the reply is cached or handed back. A kill therefore
    never leaves a cached reply whose call the accounting lacks; at worst a call is counted whose
    reply was lost, and that call was billed.

Cache layout: ``cache_dir/<key[:2]>/<key>.json``, one file per request, where key is the sha256 of the
    canonical JSON of {base_url (or cache_identity), request body as the caller asked for it (model,
    messages, temperature, max_tokens, seed, response_format, extra)}. The API key is not part of it. Files are written to a
    temporary name and renamed, so a kill mid-write leaves no torn entry and threads never see one.
    Requests with temperature > 0 are cached too, so a re-run costs zero calls and reproduces the
    same data; to draw several independent samples of one prompt, give each a different ``seed``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from speedx.synth.json_repair import JSONRepairError, parse_json_object

__all__ = [
    "BudgetExhausted",
    "JSONRepairError",
    "TeacherClient",
    "TeacherConfig",
    "TeacherError",
    "TeacherFailure",
    "TeacherReply",
    "TeacherRequest",
    "add_teacher_arguments",
    "load_usage",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
RETRYABLE_STATUS = {408, 409, 429}  # plus every 5xx; the same set the openai SDK retries
FATAL_STATUS = {401, 403, 404}  # bad key or model: every other request would fail the same way
COUNTERS = ("calls", "cached", "failed", "not_run", "retries", "attempts", "prompt_tokens",
            "completion_tokens", "cached_prompt_tokens", "cached_completion_tokens")


def _env_api_key() -> str | None:
    return os.environ.get("SPEEDX_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")


@dataclass
class TeacherConfig:
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = field(default_factory=_env_api_key, repr=False)
    max_concurrency: int = 8
    max_calls: int | None = None  # hard budget of billable calls (see module docstring); None = unlimited
    timeout_s: float = 120.0
    max_retries: int = 6  # retries after the first attempt, so at most max_retries + 1 attempts
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0  # a server asking for a longer wait is capped here
    cache_dir: str | Path | None = None  # None = no cache
    usage_file: str | Path | None = None  # kept up to date after every paid call (see module docstring)
    # Names the teacher in cache keys instead of base_url: a teacher served locally gets another port
    # on every run, and its cached replies must still be found.
    cache_identity: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> TeacherConfig:
        """SPEEDX_TEACHER_BASE_URL, SPEEDX_TEACHER_MODEL, SPEEDX_TEACHER_API_KEY (or OPENAI_API_KEY); overrides win."""
        env = {"base_url": os.environ.get("SPEEDX_TEACHER_BASE_URL"), "model": os.environ.get("SPEEDX_TEACHER_MODEL")}
        kwargs = {k: v for k, v in env.items() if v}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> TeacherConfig:
        """From the flags of ``add_teacher_arguments``; unset flags fall back to the environment, then defaults."""
        names = {"base_url": "teacher_base_url", "model": "teacher_model", "api_key": "teacher_api_key",
                 "max_calls": "max_teacher_calls", "max_concurrency": "teacher_concurrency",
                 "timeout_s": "teacher_timeout", "max_retries": "teacher_max_retries",
                 "cache_dir": "teacher_cache_dir"}
        flags = {k: getattr(args, a) for k, a in names.items() if getattr(args, a, None) is not None}
        flags.update(overrides)
        return cls.from_env(**flags)


def add_teacher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("teacher (any OpenAI-compatible chat API)")
    g.add_argument("--teacher-base-url", default=None,
                   help=f"API base URL (env SPEEDX_TEACHER_BASE_URL; default {DEFAULT_BASE_URL})")
    g.add_argument("--teacher-model", default=None,
                   help=f"model name (env SPEEDX_TEACHER_MODEL; default {DEFAULT_MODEL})")
    g.add_argument("--teacher-api-key", default=None,
                   help="API key (default: env SPEEDX_TEACHER_API_KEY, then OPENAI_API_KEY; prefer the env)")
    g.add_argument("--max-teacher-calls", type=int, default=None,
                   help="hard budget of billable teacher calls; cache hits are free; stops cleanly when reached")
    g.add_argument("--teacher-concurrency", type=int, default=None, help="requests in flight at once (default 8)")
    g.add_argument("--teacher-timeout", type=float, default=None, help="seconds per attempt (default 120)")
    g.add_argument("--teacher-max-retries", type=int, default=None, help="retries on 429/5xx/timeouts (default 6)")
    g.add_argument("--teacher-cache-dir", default=None, help="on-disk response cache (default: the run directory's)")
    return parser


@dataclass
class TeacherRequest:
    messages: list[dict]
    temperature: float = 1.0
    max_tokens: int | None = 2048
    json_object: bool = False
    seed: int | None = None
    extra: dict | None = None  # any further body fields (top_p, stop, ...); part of the cache key


@dataclass
class TeacherReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None
    ok = True

    def json(self) -> dict:
        """The reply as one JSON object, parsed leniently (fences, trailing commas, truncation).

        Raises JSONRepairError when nothing usable is there."""
        return parse_json_object(self.text)


@dataclass
class TeacherFailure:
    kind: str  # "failed": error or retries exhausted; "not_run": budget spent or stopped after a fatal error
    error: str
    status: int | None = None
    ok = False


class TeacherError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


class BudgetExhausted(TeacherError):
    """The hard call budget is spent; nothing was sent."""


class _Retryable(Exception):
    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay  # from Retry-After, else None (use backoff)


def parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from Retry-After (seconds or HTTP date) or OpenAI's retry-after-ms; None if absent/garbled."""
    if ms := headers.get("retry-after-ms"):
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return f"HTTP {resp.status_code}: {msg}"
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status_code}: {resp.text[:500]}"


def _reply_from(data: dict, cached: bool) -> TeacherReply:
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    return TeacherReply(
        text=(choice.get("message") or {}).get("content") or "",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached=cached,
        finish_reason=choice.get("finish_reason"),
    )


def load_usage(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TeacherClient:
    """Thread-safe; one client per run. ``sleep`` and ``rng`` are injectable so tests need no real waiting."""

    def __init__(self, config: TeacherConfig, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        if config.max_concurrency < 1:
            raise ValueError(f"teacher concurrency must be >= 1, got {config.max_concurrency}")
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._usage_lock = threading.Lock()  # one writer at a time, so an older snapshot never lands last
        self._slots = threading.BoundedSemaphore(config.max_concurrency)  # bounds chat() from any thread too
        self._stats: dict[str, dict[str, int]] = {}
        self._budget_used = 0  # calls counted against max_calls
        self._reserved = 0  # requests holding a budget unit while in flight
        self.json_mode_supported: bool | None = None  # learnt from the server's first 400 about response_format
        self._cache = Path(config.cache_dir) if config.cache_dir is not None else None
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/") + "/", headers=headers, timeout=config.timeout_s,
            limits=httpx.Limits(max_connections=config.max_concurrency,
                                max_keepalive_connections=config.max_concurrency),
        )
        self._usage_file = Path(config.usage_file) if config.usage_file is not None else None
        if self._usage_file is not None and self._usage_file.is_file():
            self.merge_usage(self._usage_file)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- accounting -------------------------------------------------------------------------
    def _add(self, stage: str, **counts: int) -> None:
        with self._lock:
            s = self._stats.setdefault(stage, dict.fromkeys(COUNTERS, 0))
            for k, v in counts.items():
                s[k] += v

    def usage(self) -> dict:
        with self._lock:
            stages = {name: dict(s) for name, s in self._stats.items()}
            used = self._budget_used
        total = {k: sum(s[k] for s in stages.values()) for k in COUNTERS}
        remaining = None if self.config.max_calls is None else max(0, self.config.max_calls - used)
        return {"model": self.config.model, "base_url": self.config.base_url, "max_calls": self.config.max_calls,
                "budget_used": used, "calls_remaining": remaining, "total": total, "stages": stages}

    def save_usage(self, path: str | Path | None = None) -> None:
        """Write the usage to ``path`` (default: the configured usage file)."""
        path = path if path is not None else self._usage_file
        if path is None:
            raise ValueError("save_usage needs a path: this client has no usage_file configured")
        with self._usage_lock:
            _write_atomic(Path(path), json.dumps(self.usage(), indent=2) + "\n")

    def merge_usage(self, usage: dict | str | Path, *, count_against_budget: bool = True) -> None:
        """Add a previous run's usage (dict or file) so a resumed run's saved totals add up.

        Merge once, at start, then ``save_usage`` to the same file: it holds the accumulated totals."""
        if not isinstance(usage, dict):
            usage = load_usage(usage)
        for stage, counts in usage.get("stages", {}).items():
            self._add(stage, **{k: int(counts.get(k, 0)) for k in COUNTERS})
        if count_against_budget:
            with self._lock:
                self._budget_used += int(usage.get("budget_used", usage.get("total", {}).get("calls", 0)))

    @property
    def budget_exhausted(self) -> bool:
        with self._lock:
            return self.config.max_calls is not None and self._budget_used >= self.config.max_calls

    # ---- cache --------------------------------------------------------------------------------
    def _key(self, body: dict) -> str:
        teacher = self.config.cache_identity or self.config.base_url.rstrip("/")
        canon = json.dumps({"base_url": teacher, "body": body},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self._cache is None else self._cache / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> TeacherReply | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            return _reply_from(json.loads(path.read_text())["response"], cached=True)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError):
            return None  # unreadable entry: treat as a miss and overwrite it

    def _cache_put(self, key: str, body: dict, response: dict) -> None:
        if (path := self._cache_path(key)) is not None:
            _write_atomic(path, json.dumps({"request": body, "response": response}, ensure_ascii=False))

    # ---- requests -----------------------------------------------------------------------------
    def _body(self, req: TeacherRequest) -> dict:
        body: dict[str, Any] = {"model": self.config.model, "messages": req.messages, "temperature": req.temperature}
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if req.seed is not None:
            body["seed"] = req.seed
        if req.json_object:
            body["response_format"] = {"type": "json_object"}
        body.update(req.extra or {})
        return body

    def _reserve(self) -> bool:
        with self._lock:
            if self.config.max_calls is not None and self._budget_used + self._reserved >= self.config.max_calls:
                return False
            self._reserved += 1
            return True

    def _post_once(self, body: dict, stage: str) -> dict:
        """One HTTP attempt (plus the response_format fallback); raises _Retryable or TeacherError."""
        while True:
            send = body
            if "response_format" in body and self.json_mode_supported is False:
                send = {k: v for k, v in body.items() if k != "response_format"}
            self._add(stage, attempts=1)
            try:
                with self._slots:
                    resp = self._http.post("chat/completions", json=send)
            except httpx.TimeoutException as e:
                raise _Retryable(f"timeout after {self.config.timeout_s}s: {type(e).__name__}") from e
            except httpx.TransportError as e:
                raise _Retryable(f"connection error: {type(e).__name__}: {e}") from e
            status = resp.status_code
            rejects_json_mode = "response_format" in resp.text or "json_object" in resp.text
            if status == 400 and "response_format" in send and rejects_json_mode:
                self.json_mode_supported = False  # this server lacks JSON mode: resend without, parse leniently
                continue
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retryable(_error_message(resp), parse_retry_after(resp.headers))
            if status >= 400:
                raise TeacherError(_error_message(resp), status, fatal=status in FATAL_STATUS)
            try:
                data = resp.json()
                data["choices"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise _Retryable(f"malformed response: {resp.text[:200]!r}") from e
            if "response_format" in send:
                self.json_mode_supported = True
            return data

    def _backoff(self, retry: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.config.retry_after_max_s)
        # full jitter: uniform in [0, min(cap, base * 2^retry)] spreads retries of many threads apart
        return self._rng.uniform(0, min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** retry))

    def _request(self, req: TeacherRequest, stage: str) -> TeacherReply:
        body = self._body(req)
        key = self._key(body)
        if (reply := self._cache_get(key)) is not None:
            self._add(stage, cached=1, cached_prompt_tokens=reply.prompt_tokens,
                      cached_completion_tokens=reply.completion_tokens)
            return reply
        if not self._reserve():
            raise BudgetExhausted(f"teacher call budget of {self.config.max_calls} calls is spent")
        try:
            for retry in range(self.config.max_retries + 1):
                try:
                    data = self._post_once(body, stage)
                    break
                except _Retryable as e:
                    if retry == self.config.max_retries:
                        raise TeacherError(f"gave up after {retry + 1} attempts: {e}") from e
                    self._add(stage, retries=1)
                    self._sleep(self._backoff(retry, e.delay))
            reply = _reply_from(data, cached=False)
            with self._lock:
                self._budget_used += 1
        finally:
            with self._lock:
                self._reserved -= 1
        self._add(stage, calls=1, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        # The call is paid for: hand the reply back even if the disk refuses these writes.
        if self._usage_file is not None:  # before the cache: a kill in between re-sends (and counts) the call
            try:
                self.save_usage()
            except OSError as e:
                log.warning("teacher usage file write failed: %s", e)
        try:
            self._cache_put(key, body, data)
        except OSError as e:
            log.warning("teacher cache write failed: %s", e)
        return reply

    def chat(self, messages: list[dict], *, stage: str, temperature: float = 1.0, max_tokens: int | None = 2048,
             json_object: bool = False, seed: int | None = None, extra: dict | None = None) -> TeacherReply:
        """One completion. Raises BudgetExhausted (nothing sent) or TeacherError (after retries / non-retryable)."""
        req = TeacherRequest(messages, temperature, max_tokens, json_object, seed, extra)
        try:
            return self._request(req, stage)
        except BudgetExhausted:
            self._add(stage, not_run=1)
            raise
        except TeacherError:
            self._add(stage, failed=1)
            raise

    def chat_many(self, requests: Sequence[TeacherRequest | dict | list], *, stage: str,
                  on_result: Callable[[int, TeacherReply | TeacherFailure], None] | None = None,
                  ) -> list[TeacherReply | TeacherFailure]:
        """Run requests with bounded concurrency; results in input order, failures returned, never raised.

        Items are TeacherRequest, dicts of its fields, or bare message lists. ``on_result(i, result)`` is
        called on this thread as each finishes (to write progress). When the budget is spent or a fatal
        error (401/403/404) occurs, the rest become TeacherFailure(kind="not_run"); in-flight ones finish.
        """
        reqs = [r if isinstance(r, TeacherRequest) else TeacherRequest(**r) if isinstance(r, dict)
                else TeacherRequest(list(r)) for r in requests]
        results: list[TeacherReply | TeacherFailure | None] = [None] * len(reqs)
        stop: list[str] = []  # set once by a fatal error; read by workers not yet started

        def run(i: int) -> TeacherReply | TeacherFailure:
            if stop:
                self._add(stage, not_run=1)
                return TeacherFailure("not_run", stop[0])
            try:
                return self._request(reqs[i], stage)
            except BudgetExhausted as e:
                self._add(stage, not_run=1)
                return TeacherFailure("not_run", str(e))
            except TeacherError as e:
                if e.fatal and not stop:
                    stop.append(f"stopped after a fatal error: {e}")
                self._add(stage, failed=1)
                return TeacherFailure("failed", str(e), e.status)
            except Exception as e:  # a bug or disk error in one request must not lose the others' results
                self._add(stage, failed=1)
                return TeacherFailure("failed", f"{type(e).__name__}: {e}")

        pool = ThreadPoolExecutor(max_workers=max(1, min(self.config.max_concurrency, len(reqs))))
        try:
            futures = {pool.submit(run, i): i for i in range(len(reqs))}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                if on_result is not None:
                    on_result(i, results[i])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: drop queued, let in-flight finish (and cache)
        return results  # type: ignore[return-value]
