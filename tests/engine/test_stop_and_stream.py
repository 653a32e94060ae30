"""Stop strings, stop token ids, min_tokens, ignore_eos, streaming order and callbacks, seeds in batches."""

from __future__ import annotations

import random

from helpers import hf_greedy, make_llm, random_prompts

from speedx import SamplingParams


def test_stop_token_ids_and_min_tokens(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path)
    prompt = random_prompts(len(tok), [10], seed=11)[0]
    free = hf_greedy(model, prompt, 16)
    stop_id = free[3]
    first = free.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == free[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    # min_tokens hides the stop id until enough tokens exist.
    out = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=16, min_tokens=first + 2, stop_token_ids=[stop_id]), use_tqdm=False
    )[0]
    assert len(out.outputs[0].token_ids) >= first + 2
    assert stop_id not in out.outputs[0].token_ids[: first + 2]


def test_stop_token_text_is_left_out_unless_asked_for(tiny_llama):
    """As vLLM: the stop token's id ends token_ids, its text is not in the text (EOS alike)."""
    path, _, tok = tiny_llama
    llm = make_llm(path)
    prompt = random_prompts(len(tok), [10], seed=11)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    ids = free.outputs[0].token_ids
    stop_id = next(t for t in ids[2:] if tok.decode([t]).strip())  # a token with visible text
    for include in (False, True):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id],
                                                    include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        assert out.token_ids[-1] == stop_id and out.stop_reason == stop_id
        assert out.text == tok.decode(out.token_ids if include else out.token_ids[:-1], skip_special_tokens=True)


def test_min_tokens_passes_over_stop_strings_that_end_before_it(tiny_llama):
    """As vLLM (since vllm-project/vllm#22014): stop strings count where they end in the text of a
    token after the first min_tokens; one that ends in the text of those tokens is passed over."""
    path, _, tok = tiny_llama
    llm = make_llm(path)
    prompt = random_prompts(len(tok), [7], seed=12)[0]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ids = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    texts = [tok.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    text = texts[-1]
    # A character whose first appearance ends in the text of token `early`, and that shows up again later on.
    stop, early = next((c, i) for c in sorted(set(text)) if c.strip() and text.count(c) > 1
                       for i in range(1, len(ids)) if c in texts[i] and text.rfind(c) >= len(texts[i]))
    at = text.find(stop, len(texts[early]))  # the first one that ends after the text of the first `early` tokens
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                min_tokens=early), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:at] and len(out.token_ids) > early
    assert text.find(stop) < len(texts[early])  # it ends in the min_tokens-th token's text: passed over


def test_stop_strings_are_searched_without_decoding_the_whole_output_per_token(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    decode, calls = llm.engine.tokenizer.decode, []
    llm.engine.tokenizer.decode = lambda *args, **kwargs: calls.append(args) or decode(*args, **kwargs)
    try:
        out = llm.generate(random_prompts(len(tok), [7], seed=12), SamplingParams(
            temperature=0, max_tokens=40, ignore_eos=True, stop="\u2603 never"), use_tqdm=False)[0].outputs[0]
    finally:
        llm.engine.tokenizer.decode = decode
    assert out.finish_reason == "length" and out.text == decode(out.token_ids, skip_special_tokens=True)
    assert len(calls) == 1  # the finished output's text; stop strings were searched in text decoded per token


def test_max_tokens_none_runs_to_the_context_length(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path, max_model_len=24)
    out = llm.generate(random_prompts(len(tok), [10]), SamplingParams(max_tokens=None, ignore_eos=True, seed=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 14 and out.finish_reason == "length"


def test_stop_strings_truncate_text(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path)
    prompt = random_prompts(len(tok), [7], seed=12)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    at = text.find(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop), use_tqdm=False)[0]
    assert out.outputs[0].text == text[:at]
    assert out.outputs[0].stop_reason == stop and out.outputs[0].finish_reason == "stop"
    kept = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0]
    assert kept.outputs[0].text == text[: at + len(stop)]


def test_ignore_eos_reaches_max_tokens(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    outs = llm.generate(random_prompts(len(tok), [3, 8]), SamplingParams(max_tokens=30, ignore_eos=True, seed=1), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 30 and o.outputs[0].finish_reason == "length" for o in outs)


def test_stream_yields_each_request_as_it_finishes(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    prompts = random_prompts(len(tok), [5, 5, 5])
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 2, 6)]
    order = [index for index, out in llm.stream(prompts, params)]
    assert order == [1, 2, 0]  # shortest first
    seen = []
    outs = llm.generate(prompts, params, use_tqdm=False, on_finish=lambda i, o: seen.append((i, len(o.outputs[0].token_ids))))
    assert seen == [(1, 2), (2, 6), (0, 12)]
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 2, 6]


def test_seeded_request_same_alone_and_in_a_batch_of_32(tiny_llama):
    path, _, tok = tiny_llama
    llm = make_llm(path)
    target = random_prompts(len(tok), [9], seed=13)[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=777)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids

    rng = random.Random(5)
    others = random_prompts(len(tok), [rng.randrange(1, 40) for _ in range(31)], seed=14)
    other_params = [
        SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([-1, 5]), max_tokens=rng.randrange(1, 24),
                       seed=rng.choice([None, 1, 2]))
        for _ in others
    ]
    batch = others[:17] + [target] + others[17:]
    batch_params = other_params[:17] + [params] + other_params[17:]
    outs = llm.generate(batch, batch_params, use_tqdm=False)
    assert outs[17].outputs[0].token_ids == alone


def test_chat_applies_template(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path)
    conversation = [{"role": "user", "content": "the lazy dog"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    expected_ids = tok.encode(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert out.prompt_token_ids == expected_ids
    assert out.outputs[0].token_ids == hf_greedy(model, expected_ids, 6)
