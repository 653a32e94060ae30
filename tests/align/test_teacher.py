"""Teacher client against a scripted local OpenAI-compatible server (127.0.0.1 only, no real sleeps for backoff)."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from speedx.align.teacher import (
    BudgetExhausted,
    JSONRepairError,
    TeacherClient,
    TeacherConfig,
    TeacherError,
    TeacherFailure,
    TeacherReply,
    add_teacher_arguments,
    parse_retry_after,
)

COMPLETION_TOKENS = 5


class FakeOpenAI:
    """Scripted /v1/chat/completions. `script` holds actions for the next requests, in order, then it answers
    normally; `rules` maps a user message to an action for every request carrying it.
    Actions: (status, headers, body) | ("hang", seconds) | "ok"."""

    def __init__(self):
        self.script: list = []
        self.rules: dict[str, object] = {}
        self.reject_response_format = False
        self.delay = 0.0
        self.reply = lambda content: f"echo: {content}"
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    @property
    def count(self) -> int:
        return len(self.bodies)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        with self.lock:
            self.bodies.append(body)
            self.headers.append(dict(h.headers))
            action = self.rules.get(content) or (self.script.pop(0) if self.script else "ok")
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if isinstance(action, tuple) and action[0] == "hang":
                time.sleep(action[1])
                return
            if self.reject_response_format and "response_format" in body:
                action = (400, {}, {"error": {"message": "Unknown parameter: 'response_format'."}})
            if action == "ok":
                action = (200, {}, {
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply(content)},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(content), "completion_tokens": COMPLETION_TOKENS,
                              "total_tokens": len(content) + COMPLETION_TOKENS},
                })
            status, headers, payload = action
            data = json.dumps(payload).encode()
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def server():
    fake = FakeOpenAI()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            fake.handle(self)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # a "hang" handler may still be sleeping at teardown
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    fake.clients = []
    yield fake
    for client in fake.clients:
        client.close()
    httpd.shutdown()
    httpd.server_close()


def make_client(server, sleeps=None, **kw) -> TeacherClient:
    kw.setdefault("api_key", "sk-test")
    kw.setdefault("timeout_s", 5.0)
    config = TeacherConfig(base_url=server.base_url, model="teacher-x", **kw)
    client = TeacherClient(config, sleep=(sleeps.append if sleeps is not None else lambda s: None),
                           rng=random.Random(0))
    server.clients.append(client)
    return client


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_retries_honour_retry_after_then_succeed(server):
    server.script = [(429, {"Retry-After": "7"}, {"error": {"message": "slow down"}}),
                     (503, {}, {"error": {"message": "overloaded"}}),
                     ("hang", 1.0)]
    sleeps: list[float] = []
    client = make_client(server, sleeps, timeout_s=0.2, backoff_base_s=1.0, backoff_max_s=60.0)
    reply = client.chat(msgs("hello"), stage="seed", temperature=0.0)
    assert reply.text == "echo: hello" and reply.finish_reason == "stop" and not reply.cached
    assert server.count == 4  # 429, 503, timeout, success
    assert sleeps[0] == 7.0  # Retry-After used instead of the computed backoff
    assert len(sleeps) == 3 and 0 <= sleeps[1] <= 2.0 and 0 <= sleeps[2] <= 4.0  # full jitter, base * 2^retry
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert server.bodies[0]["model"] == "teacher-x" and server.bodies[0]["temperature"] == 0.0
    seed = client.usage()["stages"]["seed"]
    assert (seed["calls"], seed["retries"], seed["attempts"], seed["failed"]) == (1, 3, 4, 0)


def test_retry_after_forms_and_cap(server):
    now = time.time()
    assert parse_retry_after(httpx.Headers({"Retry-After": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": formatdate(now + 30, usegmt=True)}), now=now) == \
        pytest.approx(30, abs=1)
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None

    server.script = [(429, {"Retry-After": "100000"}, {})]
    sleeps: list[float] = []
    make_client(server, sleeps, retry_after_max_s=30.0).chat(msgs("x"), stage="s")
    assert sleeps == [30.0]


def test_retries_stop_at_max_retries(server):
    server.rules["down"] = (503, {}, {"error": {"message": "overloaded"}})
    sleeps: list[float] = []
    client = make_client(server, sleeps, max_retries=2, backoff_base_s=1.0, backoff_max_s=1.5)
    [res] = client.chat_many([msgs("down")], stage="judge")
    assert isinstance(res, TeacherFailure) and res.kind == "failed" and not res.ok
    assert "overloaded" in res.error and "3 attempts" in res.error
    assert server.count == 3 and len(sleeps) == 2 and all(0 <= s <= 1.5 for s in sleeps)  # capped backoff
    with pytest.raises(TeacherError):
        client.chat(msgs("down"), stage="judge")
    judge = client.usage()["stages"]["judge"]
    assert (judge["calls"], judge["failed"], judge["attempts"], judge["retries"]) == (0, 2, 6, 4)


def test_non_retryable_400_fails_fast(server):
    server.rules["bad"] = (400, {}, {"error": {"message": "context length exceeded"}})
    sleeps: list[float] = []
    client = make_client(server, sleeps)
    with pytest.raises(TeacherError, match="context length exceeded") as exc:
        client.chat(msgs("bad"), stage="s")
    assert exc.value.status == 400 and server.count == 1 and sleeps == []


def test_response_format_fallback(server):
    client = make_client(server)
    client.chat(msgs("a"), stage="s", json_object=True)
    assert server.bodies[-1]["response_format"] == {"type": "json_object"} and client.json_mode_supported

    server.reject_response_format = True
    client = make_client(server)
    before = server.count
    reply = client.chat(msgs("b"), stage="s", json_object=True)
    assert reply.text == "echo: b" and server.count == before + 2
    assert "response_format" in server.bodies[-2] and "response_format" not in server.bodies[-1]
    assert client.json_mode_supported is False
    client.chat(msgs("c"), stage="s", json_object=True)  # remembered: no second 400
    assert server.count == before + 3 and "response_format" not in server.bodies[-1]
    assert client.usage()["stages"]["s"]["retries"] == 0


def test_cache_rerun_costs_zero_calls(server, tmp_path):
    server.reply = lambda content: f"{content} #{random.random()}"  # a new answer per call: hits must replay
    reqs = [{"messages": msgs(f"q{i}"), "temperature": 1.0, "json_object": i % 2 == 0} for i in range(5)]
    first = make_client(server, cache_dir=tmp_path).chat_many(reqs, stage="seed")
    assert server.count == 5 and all(r.ok and not r.cached for r in first)

    client = make_client(server, cache_dir=tmp_path, max_calls=0)  # a spent budget does not block cache hits
    again = client.chat_many(reqs, stage="seed")
    assert server.count == 5
    assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
    seed = client.usage()["stages"]["seed"]
    assert (seed["calls"], seed["cached"], seed["prompt_tokens"]) == (0, 5, 0)
    assert seed["cached_prompt_tokens"] == sum(len(f"q{i}") for i in range(5))
    assert seed["cached_completion_tokens"] == 5 * COMPLETION_TOKENS

    make_client(server, cache_dir=tmp_path).chat(msgs("q0"), stage="seed", temperature=0.5)  # other params: miss
    assert server.count == 6
    files = list(tmp_path.rglob("*"))
    assert len([f for f in files if f.is_file()]) == 6 and not any(f.name.startswith(".tmp-") for f in files)


def test_cache_identity_finds_replies_of_a_teacher_at_another_url(server, tmp_path):
    """A teacher served locally gets a new port every run: named by cache_identity, its replies are
    found again."""
    reqs = [{"messages": msgs(f"q{i}")} for i in range(3)]
    first = make_client(server, cache_dir=tmp_path, cache_identity="local:default").chat_many(reqs, stage="seed")
    moved = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="teacher-x", api_key="sk-test",  # nothing there
                          cache_dir=tmp_path, cache_identity="local:default")
    with TeacherClient(moved) as client:
        again = client.chat_many(reqs, stage="seed")
    assert server.count == 3 and all(r.cached for r in again) and [r.text for r in again] == [r.text for r in first]
    with pytest.raises(ValueError, match="teacher concurrency must be >= 1"):
        make_client(server, max_concurrency=0)


def test_concurrency_is_bounded_and_order_kept(server):
    server.delay = 0.05
    client = make_client(server, max_concurrency=3)
    seen: list[int] = []
    results = client.chat_many([msgs(f"m{i}") for i in range(15)], stage="s", on_result=lambda i, r: seen.append(i))
    assert [r.text for r in results] == [f"echo: m{i}" for i in range(15)]
    assert sorted(seen) == list(range(15))
    assert 2 <= server.max_in_flight <= 3


def test_accounting_is_exact_and_merges(server, tmp_path):
    client = make_client(server)
    client.chat_many([msgs("abc"), msgs("defgh")], stage="brainstorm")
    client.chat(msgs("xy"), stage="judge", temperature=0.0)
    u = client.usage()
    assert u["stages"]["brainstorm"]["prompt_tokens"] == 8
    assert u["stages"]["brainstorm"]["completion_tokens"] == 2 * COMPLETION_TOKENS
    assert u["stages"]["judge"]["prompt_tokens"] == 2 and u["stages"]["judge"]["calls"] == 1
    assert u["total"]["calls"] == 3 and u["total"]["completion_tokens"] == 3 * COMPLETION_TOKENS
    path = tmp_path / "teacher_usage.json"
    client.save_usage(path)

    resumed = make_client(server, max_calls=4)
    resumed.merge_usage(path)  # previous calls count against the budget: one call left
    resumed.chat(msgs("z"), stage="judge")
    with pytest.raises(BudgetExhausted):
        resumed.chat(msgs("w"), stage="judge")
    u2 = resumed.usage()
    assert u2["total"]["calls"] == 4 and u2["calls_remaining"] == 0
    assert u2["stages"]["judge"]["prompt_tokens"] == 3 and u2["stages"]["judge"]["not_run"] == 1
    assert u2["stages"]["brainstorm"] == u["stages"]["brainstorm"]


def test_usage_file_counts_each_call_before_its_reply_is_cached(server, tmp_path, monkeypatch):
    """A kill right after a reply is cached must not lose its call: the resumed run serves it from the cache."""
    usage, cache = tmp_path / "teacher_usage.json", tmp_path / "cache"
    client = make_client(server, cache_dir=cache, usage_file=usage, max_concurrency=3)
    cached_and_counted = []
    cache_put = TeacherClient._cache_put

    def spying_cache_put(self, key, body, response):
        cached = len(list(cache.rglob("*.json"))) + 1  # with this reply; counted before reading the usage file
        cached_and_counted.append((cached, json.loads(usage.read_text())["total"]["calls"]))
        cache_put(self, key, body, response)

    monkeypatch.setattr(TeacherClient, "_cache_put", spying_cache_put)
    client.chat_many([msgs(f"q{i}") for i in range(5)], stage="seed")
    assert len(cached_and_counted) == 5
    assert all(counted >= cached for cached, counted in cached_and_counted), cached_and_counted

    resumed = make_client(server, cache_dir=cache, usage_file=usage, max_calls=6)  # merges the file at start
    assert [r.cached for r in resumed.chat_many([msgs(f"q{i}") for i in range(5)], stage="seed")] == [True] * 5
    resumed.chat(msgs("new"), stage="seed")
    with pytest.raises(BudgetExhausted):  # the first process's 5 calls count against the budget
        resumed.chat(msgs("newer"), stage="seed")
    assert json.loads(usage.read_text())["total"]["calls"] == 6


def test_budget_stops_cleanly(server):
    server.delay = 0.02
    client = make_client(server, max_calls=3, max_concurrency=4)
    t0 = time.monotonic()
    results = client.chat_many([msgs(f"r{i}") for i in range(10)], stage="seed")
    assert time.monotonic() - t0 < 5
    assert server.count == 3
    assert sum(isinstance(r, TeacherReply) for r in results) == 3
    not_run = [r for r in results if isinstance(r, TeacherFailure)]
    assert len(not_run) == 7 and all(r.kind == "not_run" and "budget" in r.error for r in not_run)
    seed = client.usage()["stages"]["seed"]
    assert (seed["calls"], seed["not_run"], seed["failed"]) == (3, 7, 0)
    assert client.budget_exhausted
    with pytest.raises(BudgetExhausted):
        client.chat(msgs("more"), stage="seed")
    assert server.count == 3


def test_failed_request_releases_its_budget(server):
    server.rules["bad"] = (400, {}, {"error": {"message": "nope"}})
    client = make_client(server, max_calls=2, max_concurrency=1)
    results = client.chat_many([msgs("bad"), msgs("a"), msgs("b"), msgs("c")], stage="s")
    assert [r.kind if not r.ok else "ok" for r in results] == ["failed", "ok", "ok", "not_run"]


def test_fatal_error_stops_the_batch(server):
    server.rules["k"] = (401, {}, {"error": {"message": "Incorrect API key provided"}})
    client = make_client(server, max_concurrency=1)
    results = client.chat_many([msgs("k")] * 5, stage="s")
    assert server.count == 1
    assert results[0].kind == "failed" and "Incorrect API key" in results[0].error
    assert all(r.kind == "not_run" and "fatal" in r.error for r in results[1:])


def test_lenient_json_reply(server):
    server.reply = lambda content: "Sure! Here it is:\n```json\n{\"query\": \"q\", \"score\": 4,}\n```"
    reply = make_client(server).chat(msgs("j"), stage="s", json_object=True)
    assert reply.json() == {"query": "q", "score": 4}
    server.reply = lambda content: "I cannot help with that."
    with pytest.raises(JSONRepairError):
        make_client(server).chat(msgs("g"), stage="s").json()


def test_config_from_env_and_args(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEEDX_TEACHER_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("SPEEDX_TEACHER_MODEL", "env-model")
    monkeypatch.delenv("SPEEDX_TEACHER_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    cfg = TeacherConfig.from_env()
    assert (cfg.base_url, cfg.model, cfg.api_key) == ("http://127.0.0.1:9/v1", "env-model", "sk-openai")
    monkeypatch.setenv("SPEEDX_TEACHER_API_KEY", "sk-speedx")
    assert TeacherConfig.from_env().api_key == "sk-speedx"

    parser = add_teacher_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--teacher-model", "flag-model", "--max-teacher-calls", "12",
                              "--teacher-concurrency", "3"])
    cfg = TeacherConfig.from_args(args, cache_dir=tmp_path)
    assert (cfg.model, cfg.max_calls, cfg.max_concurrency) == ("flag-model", 12, 3)
    assert cfg.base_url == "http://127.0.0.1:9/v1"  # unset flag: the environment
    assert cfg.api_key == "sk-speedx" and cfg.cache_dir == tmp_path and cfg.max_retries == 6


def test_torn_cache_entry_is_a_miss(server, tmp_path):
    client = make_client(server, cache_dir=tmp_path)
    client.chat(msgs("t"), stage="s")
    [entry] = [f for f in tmp_path.rglob("*.json")]
    entry.write_text('{"request": {}, "resp')  # as if written without the atomic rename
    reply = make_client(server, cache_dir=tmp_path).chat(msgs("t"), stage="s")
    assert not reply.cached and server.count == 2
    assert make_client(server, cache_dir=tmp_path).chat(msgs("t"), stage="s").cached  # rewritten whole
