"""The OpenAI-compatible server, driven with the official `openai` client (and raw httpx for bad requests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import hf_greedy, make_llm

from speedx import SamplingParams
from speedx.serving import start_server
from speedx.serving.async_engine import IncrementalText
from speedx.serving.protocol import ChatCompletionRequest

MAX_TOKENS_LIMIT = 64
MAX_REQUEST_BYTES = 32 * 1024
MODEL = "tiny"
CHAT = [{"role": "user", "content": "the lazy dog"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "city": {"type": "string", "maxLength": 8}},
          "required": ["name", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_llama):
    llm = make_llm(tiny_llama[0], max_num_seqs=16, async_scheduling=False)  # the synchronous reference, on a GPU too
    with start_server(llm, served_model_name=MODEL, max_tokens_limit=MAX_TOKENS_LIMIT,
                      max_request_bytes=MAX_REQUEST_BYTES) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="anything", max_retries=0, timeout=60)


def chat(client, **kwargs):
    kwargs.setdefault("messages", CHAT)
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, **kwargs)


def test_chat_completion_matches_transformers_greedy(client, tiny_llama):
    _, model, tok = tiny_llama
    prompt = tok.encode(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    expected = hf_greedy(model, prompt, 12)
    reply = chat(client, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == len(prompt) + len(expected)


def test_completions_text_token_and_batched_prompts(client, tiny_llama):
    _, model, tok = tiny_llama
    ids = tok.encode("the quick brown fox")
    expected = tok.decode(hf_greedy(model, ids, 8), skip_special_tokens=True)
    by_text = client.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=["the quick brown fox", "hard negatives"], max_tokens=8,
                                      temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == expected  # greedy: both samples agree


def test_n_and_seed_reproducibility(client):
    params = dict(temperature=1.0, max_tokens=16, n=2, extra_body={"ignore_eos": True})
    first = chat(client, seed=1234, **params)
    again = chat(client, seed=1234, **params)
    other = chat(client, seed=99, **params)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 2 and texts[0] != texts[1]  # two independent samples
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts
    assert first.usage.completion_tokens == 32


def test_max_tokens_and_stop_strings(client):
    full = chat(client, temperature=0, max_tokens=20, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 20
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = chat(client, temperature=0, max_tokens=20, stop=[stop, "never-seen"], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    neutral = chat(client, temperature=0, max_tokens=20, presence_penalty=0, frequency_penalty=0, logit_bias={},
                   extra_body={"ignore_eos": True, "repetition_penalty": 1})  # unsupported, but neutral: accepted
    assert neutral.choices[0].message.content == text


@pytest.mark.parametrize("stop", [None, "stop-from-text", "frequent-character-after-min-tokens"])
def test_streamed_deltas_equal_the_whole_answer(client, stop):
    params = dict(temperature=1.0, seed=7, n=2, max_tokens=24, extra_body={"ignore_eos": True})
    whole = chat(client, **params)
    text = whole.choices[0].message.content
    if stop == "stop-from-text":  # a stop string from the middle of sample 0: the stream must never show text past it
        params["stop"] = text[len(text) // 2 : len(text) // 2 + 3]
        whole = chat(client, **params)
        assert whole.choices[0].finish_reason == "stop" and params["stop"] not in whole.choices[0].message.content
    elif stop:  # streamed before min_tokens is reached, so only a later one may cut the text
        params["stop"] = max(sorted(c for c in set(text) if c.strip()), key=text.count)
        params["extra_body"] = {"ignore_eos": True, "min_tokens": 8}
        whole = chat(client, **params)
    pieces, finish, usage = {0: [], 1: []}, {}, None
    for chunk in chat(client, stream=True, stream_options={"include_usage": True}, **params):
        assert chunk.object == "chat.completion.chunk"
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        pieces[choice.index].append(choice.delta.content or "")
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    for c in whole.choices:
        assert "".join(pieces[c.index]) == c.message.content
        assert finish[c.index] == c.finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens

    completion = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=10, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


def test_incremental_text_never_splits_a_character_nor_shows_a_stop_string(tiny_llama):
    tok = tiny_llama[2]
    ids = tok.encode("a é ü 日本 fox")  # byte-level BPE: each non-ASCII character spans several tokens
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(len(ids)))
    text = IncrementalText(tok, SamplingParams())
    pieces = [text.update(ids[:i]) for i in range(1, len(ids) + 1)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tok.decode(ids)
    # With a stop string, what is handed out before the engine cuts there stays a prefix of the cut text.
    text, sent = IncrementalText(tok, SamplingParams(stop="fox")), ""
    for i in range(1, len(ids) + 1):
        if "fox" in tok.decode(ids[:i]):
            break  # the engine finishes the sequence at this token
        sent += text.update(ids[:i])
        assert "a é ü 日本 ".startswith(sent)
    assert sent + text.finish("a é ü 日本 ") == "a é ü 日本 "


def test_sampling_settings_left_out_take_the_model_defaults():
    """The model's generation_config.json defaults (LLM.get_default_sampling_params) fill what a request leaves out."""
    defaults = SamplingParams(temperature=0.3, top_p=0.8, top_k=20, min_p=0.05)
    params = ChatCompletionRequest(messages=CHAT).sampling_params(10, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens) == (0.3, 0.8, 20, 0.05, 10)
    given = ChatCompletionRequest(messages=CHAT, temperature=0, top_p=1, top_k=-1, min_p=0).sampling_params(10, defaults)
    assert (given.temperature, given.top_p, given.top_k, given.min_p) == (0, 1, -1, 0)


def test_chat_text_parts_are_joined_as_vllm_joins_them(client, tiny_llama):
    tok = tiny_llama[2]

    def prompt_tokens(text):
        conversation = [{"role": "user", "content": text}]
        return len(tok.encode(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False))

    parts = [{"role": "user", "content": [{"type": "text", "text": "the lazy"}, {"type": "text", "text": "dog"}]}]
    assert prompt_tokens("the lazy\ndog") != prompt_tokens("the lazydog")
    assert chat(client, messages=parts, temperature=0, max_tokens=5).usage.prompt_tokens == prompt_tokens("the lazy\ndog")


def test_response_format_json_schema_and_json_object(client):
    reply = chat(client, temperature=1.0, seed=3, max_tokens=60,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    data = json.loads(reply.choices[0].message.content)
    assert sorted(data) == ["city", "name"] and all(isinstance(v, str) and len(v) <= 8 for v in data.values())
    reply = chat(client, temperature=0, max_tokens=60, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":  # a random tiny model may run out of tokens mid-object
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": CHAT, "n": 0}, "n"),
    ({"model": MODEL, "messages": CHAT, "n": 17}, "n"),
    ({"model": MODEL, "messages": CHAT, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens"),
    ({"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": CHAT, "logprobs": True}, "logprobs"),
    ({"model": MODEL, "messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": MODEL, "messages": CHAT, "frequency_penalty": -1}, "frequency_penalty"),
    ({"model": MODEL, "messages": CHAT, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"model": MODEL, "messages": CHAT, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"model": MODEL, "messages": CHAT, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": CHAT, "n": True}, "n"),
    ({"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
])
def test_malformed_chat_requests_get_openai_400s(server, body, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    error = _error(httpx.post(server.url + "/chat/completions", **kwargs), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_other_client_errors(server, client):
    base = server.url
    assert _error(httpx.post(base + "/completions", json={"model": MODEL, "prompt": [[]]}), 400)
    assert _error(httpx.post(base + "/completions", json={"model": MODEL, "prompt": [10**9]}), 400)
    too_long = {"model": MODEL, "prompt": list(range(3, 600))}  # the tiny model's context is 512
    assert _error(httpx.post(base + "/completions", json=too_long), 400)["code"] == "context_length_exceeded"
    assert _error(httpx.post(base + "/chat/completions", json={"model": "gpt-4o", "messages": CHAT}), 404)["code"] == "model_not_found"
    assert _error(httpx.get(base + "/nothing-here"), 404)
    oversized = {"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}
    assert _error(httpx.post(base + "/chat/completions", json=oversized), 413)["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)


def test_api_key(tiny_llama):
    with start_server(make_llm(tiny_llama[0]), api_key="s3cret", served_model_name=MODEL) as running:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = httpx.post(running.url + "/chat/completions", json={"messages": CHAT}, headers=headers)
            assert _error(response, 401)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.url, api_key="s3cret", max_retries=0)
        assert chat(good, temperature=0, max_tokens=4).choices[0].message.role == "assistant"
        assert httpx.get(running.url.removesuffix("/v1") + "/health").status_code == 200  # /health stays open


def test_engine_abort_request_frees_blocks_and_spares_the_others(tiny_llama):
    llm = make_llm(tiny_llama[0])
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    alone = llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0]
    engine.add_request("keep", [5, 6, 7, 8, 9], params)
    engine.add_request("drop", [9, 8, 7, 6, 5, 4], params)
    for _ in range(3):
        engine.step()
    assert engine.step_sequences and all(s.request.request_id in ("keep", "drop") for s in engine.step_sequences)
    assert engine.abort_request("drop") and not engine.abort_request("drop")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()[0]
    assert [o.request_id for o in outputs] == ["keep"]
    assert [c.token_ids for c in outputs[0].outputs] == [c.token_ids for c in alone.outputs]
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_free_blocks) == (0, 0, stats.kv_cache_blocks)


@pytest.fixture
def slow_engine(server, monkeypatch):
    """The server's engine, slowed down (so a request is surely still running when its client leaves),
    recording each abort_request(id) -> whether the request was still unfinished."""
    engine = server.llm.engine
    aborted = []
    real_abort, real_step = engine.abort_request, engine.step
    monkeypatch.setattr(engine, "abort_request", lambda rid: aborted.append((rid, real_abort(rid))) or aborted[-1][1])
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.02) or real_step())
    return engine, aborted


def _wait_for_abort(engine, aborted):
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert aborted and aborted[0][1] is True, aborted  # it was still running, and now it is gone
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()  # no request left, and no sequence holds KV blocks any more
    assert (stats.num_unfinished_requests, stats.num_running, stats.num_waiting) == (0, 0, 0)
    assert stats.kv_cache_free_blocks == stats.kv_cache_blocks


def test_client_disconnect_mid_stream_aborts_and_frees_kv(server, slow_engine):
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": MAX_TOKENS_LIMIT, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    _wait_for_abort(*slow_engine)


def test_client_gone_before_a_plain_answer_aborts_too(server, slow_engine):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    _wait_for_abort(*slow_engine)


def test_concurrent_requests_share_a_batch(server, client, monkeypatch):
    engine = server.llm.engine
    batch_sizes = []
    real_schedule = engine.scheduler.schedule

    def schedule():
        batch = real_schedule()
        batch_sizes.append(len(batch.sequences))
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    barrier = threading.Barrier(6)

    def one(i):
        barrier.wait()
        return chat(client, temperature=0.7, seed=i, max_tokens=24, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(one, range(6)))
    assert all(r.usage.completion_tokens == 24 for r in replies)
    assert max(batch_sizes) > 1, batch_sizes


def test_async_scheduling_server_gives_the_same_answers(tiny_llama, client):
    """A server whose engine launches decode steps ahead answers as the synchronous one, whole and streamed."""
    llm = make_llm(tiny_llama[0], max_num_seqs=16, async_scheduling=True)
    launched_ahead = []
    real = llm.engine._launch_ahead

    def launch_ahead(*args):
        launched_ahead.append(real(*args))
        return launched_ahead[-1]

    llm.engine._launch_ahead = launch_ahead
    with start_server(llm, served_model_name=MODEL, max_tokens_limit=MAX_TOKENS_LIMIT,
                      max_request_bytes=MAX_REQUEST_BYTES) as running:
        other = openai.OpenAI(base_url=running.url, api_key="anything", max_retries=0, timeout=60)
        for params in (dict(temperature=1.0, seed=7, n=2, max_tokens=24), dict(temperature=0, max_tokens=20)):
            expected = chat(client, **params)
            got = chat(other, **params)
            assert [(c.message.content, c.finish_reason) for c in got.choices] == \
                   [(c.message.content, c.finish_reason) for c in expected.choices]
            pieces = {c.index: [] for c in expected.choices}
            for chunk in chat(other, stream=True, **params):
                for choice in chunk.choices:
                    pieces[choice.index].append(choice.delta.content or "")
            assert {i: "".join(p) for i, p in pieces.items()} == {c.index: c.message.content for c in expected.choices}
    assert any(launched_ahead)


def test_cli_serves_with_the_env_api_key_and_stops_on_sigterm(tiny_llama):
    command = [sys.executable, "-m", "speedx.serve", "--model", str(tiny_llama[0]), "--port", "0", "--dtype", "float32",
               "--kv-cache-memory", "8MiB", "--served-model-name", MODEL, "--log-level", "warning", "--async-scheduling"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, SPEEDX_API_KEY="k3y"))
    try:
        line = next(line for line in process.stderr if line.startswith("speedx: serving"))
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "API key required" in line
        client = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="the lazy dog", max_tokens=4).usage.completion_tokens >= 1
        assert httpx.get(url + "/models").status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.stderr.close()


@pytest.mark.parametrize("flags", [["--port", "x"], ["--bogus"], ["--port", "70000"], ["--max-num-seqs", "0"]])
def test_cli_bad_flags_exit_2_with_one_line(flags):
    result = subprocess.run([sys.executable, "-m", "speedx.serve", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
