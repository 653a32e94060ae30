"""LLM's vLLM-compatible surface beyond generate: greedy below a tiny temperature, chat template
options and content parts, and what a model's generation_config.json changes."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_llm, random_prompts

from speedx import SamplingParams


def test_temperatures_below_1e_5_decode_greedily(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    prompts = random_prompts(len(tok), [6, 9], seed=4)
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)]
    for temperature in (1e-45, 1e-30, 9e-6):  # dividing logits by the first two overflows fp32
        params = SamplingParams(temperature=temperature, seed=7, max_tokens=8)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == greedy


def test_chat_joins_text_parts_with_newlines_as_vllm(tiny_llama):
    path, _, _ = tiny_llama
    llm = make_llm(path)
    parts = [{"role": "user", "content": [{"type": "text", "text": "the lazy"}, {"type": "text", "text": "dog"}]}]
    plain = [{"role": "user", "content": "the lazy\ndog"}]
    assert llm.apply_chat_template(parts) == llm.apply_chat_template(plain)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]
    with pytest.raises(ValueError, match="only text content parts"):
        llm.chat(image, use_tqdm=False)
    with pytest.raises(ValueError, match="message 0: expected a dict with 'role'"):
        llm.chat([{"content": "no role"}], use_tqdm=False)


def test_chat_template_options_reach_the_template(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    conversation = [{"role": "user", "content": "the lazy dog"}, {"role": "assistant", "content": "jumps over"}]
    ids = llm.apply_chat_template(conversation, add_generation_prompt=False, continue_final_message=True)
    expected = tok.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
    assert ids == tok.encode(expected, add_special_tokens=False) and expected.endswith("jumps over")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(conversation, continue_final_message=True, use_tqdm=False)
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = llm.chat(conversation[:1], SamplingParams(max_tokens=2), use_tqdm=False, chat_template=template,
                   add_generation_prompt=False, chat_template_kwargs={"greeting": "the quick fox "})[0]
    assert out.prompt_token_ids == tok.encode("the quick fox the lazy dog", add_special_tokens=False)


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """A copy of the tiny model whose generation_config.json a test may rewrite."""
    path = tmp_path / "model"
    shutil.copytree(tiny_llama[0], path)
    return path


def write_generation_config(path, **settings):
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **settings}))


def test_generation_config_eos_ids_end_generation(tiny_llama, model_copy):
    _, _, tok = tiny_llama
    prompt = random_prompts(len(tok), [7], seed=5)[0]
    free = make_llm(model_copy).generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                         use_tqdm=False)[0].outputs[0].token_ids
    end_of_turn = next(t for t in free[3:] if t != tok.eos_token_id)  # a token greedy decoding reaches
    write_generation_config(model_copy, eos_token_id=[tok.eos_token_id, end_of_turn])
    out = make_llm(model_copy).generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[: free.index(end_of_turn) + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_generation_config_sampling_settings_are_the_defaults(tiny_llama, model_copy):
    _, _, tok = tiny_llama
    prompt = random_prompts(len(tok), [7], seed=5)[0]
    write_generation_config(model_copy, temperature=1e-6, top_k=5, max_new_tokens=5)
    llm = make_llm(model_copy)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens, defaults.top_p) == (1e-6, 5, 5, 1.0)
    defaults.max_tokens = 9  # a copy: the next call's defaults are the model's again
    out = llm.generate([prompt], use_tqdm=False)[0].outputs[0]
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids == greedy.token_ids
    write_generation_config(model_copy, top_p=7)
    with pytest.raises(ValueError, match="generation_config.json: SamplingParams: top_p must be"):
        make_llm(model_copy)
    (model_copy / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not a JSON object"):
        make_llm(model_copy)
