"""JSON-schema-constrained decoding: every finished output is JSON that fits its schema."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from helpers import count_preemptions, llm_bytes_per_token, make_llm, random_prompts

from speedx import SamplingParams
from speedx.engine.structured_output import StructuredOutputs

KEYS = ["name", "city", "job"]


def schema(keys=KEYS, max_length=8) -> dict:
    return {
        "type": "object",
        "properties": {k: {"type": "string", "maxLength": max_length} for k in keys},
        "required": list(keys),
        "additionalProperties": False,
    }


def assert_fits(completion, keys=KEYS):
    assert completion.finish_reason == "stop", completion
    data = json.loads(completion.text)  # strict: no raw control characters either
    assert list(data) == list(keys)
    assert all(isinstance(v, str) for v in data.values())


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return make_llm(tiny_llama[0])


@pytest.fixture
def count_compiles(monkeypatch):
    calls = []
    real = StructuredOutputs._compile

    def counting(self, grammar):
        calls.append(grammar)
        return real(self, grammar)

    monkeypatch.setattr(StructuredOutputs, "_compile", counting)
    return calls


@pytest.mark.parametrize(
    "bad, message",
    [("not json", "json_schema is not valid JSON"), ("[1, 2]", "must be a JSON Schema object"),
     (5, "must be a JSON Schema object"), ({"enum": {1, 2}}, "must hold only JSON values")],
)
def test_bad_json_schema_params(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(json_schema=bad)


def test_schema_as_text_or_dict_is_one_cache_key():
    assert SamplingParams(json_schema=json.dumps(schema(), indent=2)).json_schema_text == SamplingParams(json_schema=schema()).json_schema_text


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 0), (1.0, 1000), (1.0, 2000)])
def test_batch_always_gives_valid_json(llm, tiny_llama, temperature, seed):
    tok = tiny_llama[2]
    prompts = random_prompts(len(tok), [3 + i % 7 for i in range(16)], seed=seed or 0)
    params = [SamplingParams(temperature=temperature, max_tokens=96, json_schema=schema(), seed=None if seed is None else seed + i)
              for i in range(16)]
    for out in llm.generate(prompts, params, use_tqdm=False):
        assert out.error is None
        assert_fits(out.outputs[0])
        assert out.outputs[0].token_ids[-1] not in llm.engine.eos_token_ids  # ended on "}", no EOS step


def test_n_samples_each_follow_the_schema(llm, tiny_llama):
    tok = tiny_llama[2]
    prompts = random_prompts(len(tok), [5, 9], seed=3)
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=96, json_schema=schema(), seed=5), use_tqdm=False)
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for completion in out.outputs:
            assert_fits(completion)
        assert len({c.text for c in out.outputs}) > 1  # the samples really are independent


def test_unconstrained_requests_unaffected_by_constrained_ones(llm, tiny_llama):
    tok = tiny_llama[2]
    prompts = random_prompts(len(tok), [4, 11, 7, 13], seed=4)
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompts[0], prompts[2]], free, use_tqdm=False)
    constrained = SamplingParams(temperature=0, max_tokens=96, json_schema=schema())
    mixed = llm.generate(prompts, [free, constrained, free, constrained], use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == [o.outputs[0].token_ids for o in alone]
    assert_fits(mixed[1].outputs[0])
    assert_fits(mixed[3].outputs[0])


def test_bad_schemas_fail_alone(llm, tiny_llama, monkeypatch):
    tok = tiny_llama[2]
    prompts = random_prompts(len(tok), [5, 6, 7], seed=6)
    good = SamplingParams(temperature=0, max_tokens=96, json_schema=schema())
    unsupported = SamplingParams(temperature=0, max_tokens=96, json_schema={"type": "object", "properties": {"a": {"type": "foo"}}})
    outs = llm.generate(prompts, [good, unsupported, good], use_tqdm=False)
    assert "request 1: the JSON schema is not supported: Unsupported type" in outs[1].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert_fits(outs[0].outputs[0])
    assert_fits(outs[2].outputs[0])

    # A compile that fails later, in the background, fails that request only.
    def broken(self, grammar):
        raise RuntimeError("out of memory while compiling")

    monkeypatch.setattr(StructuredOutputs, "_compile", broken)
    late = SamplingParams(temperature=0, max_tokens=96, json_schema=schema(["late"]))
    outs = llm.generate(prompts, [good, late, SamplingParams(temperature=0, max_tokens=5)], use_tqdm=False)
    assert "could not be compiled: out of memory while compiling" in outs[1].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert_fits(outs[0].outputs[0])
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) > 0


def test_each_schema_compiles_once(llm, tiny_llama, count_compiles):
    tok = tiny_llama[2]
    keys = ["cache", "test", "keys"]
    params = SamplingParams(temperature=1.0, max_tokens=96, json_schema=schema(keys))
    for _ in range(2):
        for out in llm.generate(random_prompts(len(tok), [4, 5, 6]), params, use_tqdm=False):
            assert_fits(out.outputs[0], keys)
    same_as_text = SamplingParams(temperature=0, max_tokens=96, json_schema=json.dumps(schema(keys), indent=1))
    assert_fits(llm.generate([[5, 6]], same_as_text, use_tqdm=False)[0].outputs[0], keys)
    assert len(count_compiles) == 1
    other = SamplingParams(temperature=0, max_tokens=96, json_schema=schema(keys, max_length=4))
    assert_fits(llm.generate([[5, 6]], other, use_tqdm=False)[0].outputs[0], keys)
    assert len(count_compiles) == 2


def test_pending_compile_does_not_block_others(llm, tiny_llama, monkeypatch):
    tok = tiny_llama[2]
    release = threading.Event()
    real = StructuredOutputs._compile

    def slow(self, grammar):
        release.wait(timeout=20)  # compiles only once the unconstrained request has finished
        return real(self, grammar)

    monkeypatch.setattr(StructuredOutputs, "_compile", slow)
    prompts = random_prompts(len(tok), [6, 8], seed=9)
    params = [SamplingParams(temperature=0, max_tokens=96, json_schema=schema(["slow", "compile"])),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    order = []
    for index, out in llm.stream(prompts, params):
        order.append(index)
        release.set()
        if index == 0:
            assert_fits(out.outputs[0], ["slow", "compile"])
    assert order == [1, 0]


def test_waits_for_compile_without_spinning(llm, tiny_llama, monkeypatch):
    tok = tiny_llama[2]
    real = StructuredOutputs._compile

    def slow(self, grammar):
        time.sleep(0.3)
        return real(self, grammar)

    monkeypatch.setattr(StructuredOutputs, "_compile", slow)
    empty_steps = []
    real_schedule = llm.engine.scheduler.schedule

    def counting_schedule():
        batch = real_schedule()
        empty_steps.append(not batch.sequences)
        return batch

    monkeypatch.setattr(llm.engine.scheduler, "schedule", counting_schedule)
    keys = ["waits", "here"]
    outs = llm.generate(random_prompts(len(tok), [5, 7]), SamplingParams(temperature=0, max_tokens=96, json_schema=schema(keys)), use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert 1 <= sum(empty_steps) <= 2


def test_stop_rules_with_schema(llm, tiny_llama):
    tok = tiny_llama[2]
    prompt = random_prompts(len(tok), [6], seed=10)[0]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, json_schema=schema()), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and cut.text.startswith('{"name')  # cut short, as in vLLM
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=96, json_schema=schema()), use_tqdm=False)[0].outputs[0]
    assert_fits(full)
    # min_tokens hides EOS, which the grammar forbids anyway: same JSON.
    late = SamplingParams(temperature=0, max_tokens=96, min_tokens=10, json_schema=schema())
    assert llm.generate([prompt], late, use_tqdm=False)[0].outputs[0].token_ids == full.token_ids
    # A number root could go on after any digit: it ends on EOS, which is kept out of the text.
    number = SamplingParams(temperature=1.0, max_tokens=64, seed=3, skip_special_tokens=False,
                            json_schema={"type": "integer", "minimum": 0})
    for out in llm.generate(random_prompts(len(tok), [4] * 6, seed=11), number, use_tqdm=False):
        c = out.outputs[0]
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in llm.engine.eos_token_ids and json.loads(c.text) >= 0


def test_preemption_keeps_matchers_valid(tiny_llama):
    path, model, tok = tiny_llama
    prompts = random_prompts(len(tok), [12, 9, 14, 7, 11, 10], seed=12)
    params = SamplingParams(temperature=0, max_tokens=96, json_schema=schema())
    roomy = make_llm(path).generate(prompts, params, use_tqdm=False)
    llm = make_llm(path, kv_cache_memory=40 * 4 * llm_bytes_per_token(model))
    preempted = count_preemptions(llm)
    tight = llm.generate(prompts, params, use_tqdm=False)
    assert sum(preempted) > 0
    for a, b in zip(roomy, tight):
        assert_fits(b.outputs[0])
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_mask_covers_a_vocab_larger_than_the_tokenizer(tiny_llama):
    tok = tiny_llama[2]
    vocab = len(tok) + 13  # lm_head rows padded past the tokenizer
    outputs = StructuredOutputs(tok, vocab, [tok.eos_token_id])
    matcher = outputs.matcher(outputs.grammar(json.dumps(schema())).result())
    logits = torch.zeros(2, vocab)
    outputs.mask.apply(logits, [matcher, None])
    allowed = (logits[0] == 0).nonzero().squeeze(1).tolist()
    assert [tok.decode([t]) for t in allowed] == ["{"]
    assert bool((logits[1] == 0).all())
