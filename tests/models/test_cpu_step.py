"""The bf16 CPU step (LlamaForCausalLM._forward_cpu: metadata once per step, scratch buffers shared by
the layers, the residual stream updated in place) computes bit for bit what the module-by-module
path computes, in decode-only steps and in mixed steps of decodes and prompt chunks."""

from __future__ import annotations

import pytest
import torch
from helpers import make_llm, random_prompts

from speedx import SamplingParams
from speedx.models.llama import LlamaForCausalLM


def run_recording_logits(llm, prompts, params) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """(tokens of each prompt, the logits of every step, how many steps took the fused CPU path)."""
    model = llm.engine.runner.model
    logits, fused = [], 0
    compute_logits, forward_cpu = model.compute_logits, model._forward_cpu

    def recording_compute_logits(hidden):
        logits.append(compute_logits(hidden).clone())
        return logits[-1]

    def counting_forward_cpu(hidden, meta):
        nonlocal fused
        fused += 1
        return forward_cpu(hidden, meta)

    model.compute_logits, model._forward_cpu = recording_compute_logits, counting_forward_cpu
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del model.compute_logits, model._forward_cpu
    return [o.outputs[0].token_ids for o in outputs], logits, fused


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 20])  # 20: chunked prompts next to decodes
def test_fused_cpu_step_equals_the_module_path(tiny_model, monkeypatch, max_num_batched_tokens):
    path, _, tok = tiny_model
    llm = make_llm(path, dtype="bfloat16", max_num_batched_tokens=max_num_batched_tokens)
    prompts = random_prompts(len(tok), [1, 7, 18, 33, 45, 9], seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    tokens, logits, fused = run_recording_logits(llm, prompts, params)
    assert fused == len(logits) > 0  # every step took the fused path
    llm.reset_prefix_cache()
    monkeypatch.setattr(LlamaForCausalLM, "fused_cpu_step", lambda self, hidden, meta: False)
    ref_tokens, ref_logits, ref_fused = run_recording_logits(llm, prompts, params)
    assert ref_fused == 0

    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for step, ref in zip(logits, ref_logits):
        assert torch.equal(step, ref)


def test_fused_cpu_step_only_for_bf16_on_the_cpu_kernels(tiny_llama):
    """fp32 models keep PyTorch's own ops (token-for-token transformers); they never take it."""
    path, _, tok = tiny_llama
    llm = make_llm(path)  # float32
    _, _, fused = run_recording_logits(llm, random_prompts(len(tok), [5, 9]), SamplingParams(temperature=0, max_tokens=3))
    assert fused == 0
