"""Greedy (and seeded sampled) generation must equal Hugging Face transformers token for token."""

from __future__ import annotations

import torch
from helpers import assert_matches_hf, count_preemptions, hf_greedy, llm_bytes_per_token, make_llm, random_prompts

from speedx import SamplingParams
from speedx.engine.sampler import counter_uniform

def test_batch_of_different_lengths(tiny_model):
    path, model, tok = tiny_model
    llm = make_llm(path)
    assert_matches_hf(llm, model, random_prompts(len(tok), [1, 5, 17, 33, 50, 8]))


def test_tiny_pool_forces_preemption(tiny_llama):
    path, model, tok = tiny_llama
    # 16 blocks x 4 tokens = 64 slots for 6 sequences needing up to 54 each: preemption must happen.
    llm = make_llm(path, kv_cache_memory=16 * 4 * llm_bytes_per_token(model))
    assert llm.engine.stats().kv_cache_blocks == 16
    prompts = random_prompts(len(tok), [30, 12, 25, 7, 19, 28], seed=1)
    preempted = count_preemptions(llm)
    assert_matches_hf(llm, model, prompts)
    assert sum(preempted) > 0
    assert llm.engine.stats().kv_cache_free_blocks == 16  # nothing leaked


def test_shared_prefix_hits_prefix_cache(tiny_model):
    path, model, tok = tiny_model
    llm = make_llm(path)
    prefix = random_prompts(len(tok), [21], seed=2)[0]
    prompts = [prefix + tail for tail in random_prompts(len(tok), [3, 9, 1], seed=3)]
    first = assert_matches_hf(llm, model, prompts[:1])
    assert first[0].num_cached_tokens == 0
    later = assert_matches_hf(llm, model, prompts[1:])
    assert all(out.num_cached_tokens == 20 for out in later)  # 5 full blocks of the 21-token prefix


def test_whole_prompt_cached_recomputes_only_its_last_token(tiny_model):
    path, model, tok = tiny_model
    llm = make_llm(path)
    prompt = random_prompts(len(tok), [20], seed=6)[0]  # 5 full blocks of 4
    # Copies of one prompt in one call: the first prefills it, the others wait a step, then find
    # all 5 blocks cached and compute only their last token, in a copy of its block.
    outs = assert_matches_hf(llm, model, [prompt] * 4)
    assert [out.num_cached_tokens for out in outs] == [0, 19, 19, 19]
    # Writing that token into a copy left the cached block intact for later hits.
    longer = assert_matches_hf(llm, model, [prompt + [7, 8]])
    assert longer[0].num_cached_tokens == 20
    # n > 1 forks after that one token: the samples share the copied block, copy-on-write again.
    forked = assert_matches_hf(llm, model, [prompt], n=3)
    assert forked[0].num_cached_tokens == 19


def test_chunked_prefill(tiny_model):
    path, model, tok = tiny_model
    llm = make_llm(path, max_num_batched_tokens=7)
    assert_matches_hf(llm, model, random_prompts(len(tok), [40, 3, 22], seed=4))


def test_n_greater_than_one_forks_share_prompt(tiny_model):
    path, model, tok = tiny_model
    llm = make_llm(path)
    # Greedy samples must all equal HF: any copy-on-write slip in the forked KV would diverge them.
    assert_matches_hf(llm, model, random_prompts(len(tok), [10, 13], seed=5), n=3)


def test_seeded_samples_follow_hf_logits(tiny_llama):
    """Each sampled token equals the engine's draw applied to HF's logits for the same prefix."""
    path, model, tok = tiny_llama
    llm = make_llm(path)
    prompts = random_prompts(len(tok), [6, 11], seed=6)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.02, max_tokens=12, n=2, seed=1234)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert out.outputs[0].token_ids != out.outputs[1].token_ids or len(out.outputs[0].token_ids) < 3
        for sample in out.outputs:
            tokens = prompt + sample.token_ids
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0].float()
            for step, token in enumerate(sample.token_ids):
                pos = len(prompt) + step
                expected = llm.kernels.sample_tokens(
                    logits[pos - 1 : pos], torch.tensor([0.8]), torch.tensor([40]), torch.tensor([0.9]),
                    torch.tensor([0.02]), torch.tensor([counter_uniform(1234, sample.index, pos)], dtype=torch.float64),
                )
                assert int(expected) == token


def test_mixed_strings_and_token_ids(tiny_llama):
    path, model, tok = tiny_llama
    llm = make_llm(path)
    text = "the quick brown fox"
    ids = tok.encode("a small robot paints")
    outs = llm.generate([text, ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert outs[0].prompt == text and outs[0].prompt_token_ids == tok.encode(text)
    assert outs[1].prompt is None and outs[1].prompt_token_ids == ids
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(model, out.prompt_token_ids, 8)
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
