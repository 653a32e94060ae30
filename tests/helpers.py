"""Helpers shared by the generation tests: random prompts and the transformers reference."""

from __future__ import annotations

import random

import torch

from speedx import LLM, SamplingParams

NEW_TOKENS = 24


def random_prompts(vocab: int, lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
        )
    return out[0, len(prompt):].tolist()


def assert_matches_hf(llm: LLM, model, prompts, max_new_tokens=NEW_TOKENS, n=1):
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, n=n)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts)
    for prompt, out in zip(prompts, outputs):
        assert out.error is None
        assert out.prompt_token_ids == prompt
        expected = hf_greedy(model, prompt, max_new_tokens)
        assert len(out.outputs) == n
        for sample in out.outputs:
            assert sample.token_ids == expected
    return outputs


def make_llm(path, **kwargs) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("block_size", 4)
    kwargs.setdefault("kv_cache_memory", "8MiB")
    return LLM(str(path), **kwargs)


def llm_bytes_per_token(model) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


def count_preemptions(llm: LLM) -> list[int]:
    """Wrap llm.engine.step so the returned list collects each step's number of preemptions."""
    counts: list[int] = []
    real_step = llm.engine.step

    def counting_step():
        finished, stats = real_step()
        counts.append(stats.num_preempted)
        return finished, stats

    llm.engine.step = counting_step
    return counts
