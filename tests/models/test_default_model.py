"""The embedded default model (SmolLM2-135M-Instruct GGUF) against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

from speedx import LLM, SamplingParams
from speedx.models.default_model import default_model_path

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
]


@pytest.fixture(scope="module")
def default_llm():
    return LLM("default", dtype="float32", kv_cache_memory="256MiB", quantization="none")


def test_greedy_chat_matches_transformers(default_llm):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    outputs = default_llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    for out in outputs:
        prompt = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            expected = reference.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                eos_token_id=reference.config.eos_token_id, pad_token_id=reference.config.eos_token_id,
            )[0, prompt.shape[1] :].tolist()
        assert out.outputs[0].token_ids == expected
    assert "Paris" in outputs[0].outputs[0].text


def test_chat_template_and_eos_come_from_the_checkpoint(default_llm):
    tok = default_llm.get_tokenizer()
    assert "<|im_start|>" in tok.chat_template
    ids = default_llm.apply_chat_template(CONVERSATIONS[0])
    assert tok.decode(ids).startswith("<|im_start|>system")
    assert tok.eos_token_id in default_llm.engine.eos_token_ids


def test_bf16_greedy_tokens_are_transformers_argmax_up_to_rounding():
    """bf16 runs speedx's own CPU kernels (matmul, norm, RoPE, SwiGLU). Their sums run in another
    order than transformers' bf16 ones, so exact ties can break the other way and the texts then
    part; teacher-forced on speedx's tokens, every chosen token must still be transformers' top
    logit to within two bf16 steps (a wrong kernel is off by whole units)."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    llm = LLM("default", dtype="bfloat16", kv_cache_memory="256MiB", quantization="none")
    for out in llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False):
        tokens = out.outputs[0].token_ids
        ids = torch.tensor([out.prompt_token_ids + tokens])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(out.prompt_token_ids) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
        assert (logits.max(-1).values - chosen).max() <= 0.5
