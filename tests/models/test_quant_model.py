"""Models with GGUF weights kept quantized (LLM(quantization=...)) against the same GGUF file
dequantized at load (quantization="none"): the same weights, so the logits must agree to fp32
rounding in fp32 and to bf16 rounding in bf16."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_model
from helpers import write_gguf

from speedx import LLM, SamplingParams
from speedx.models.cpu_linear import PackedQuantLinear, resolve_quantization
from speedx.models.default_model import default_model_path

def prefill_logits(llm: LLM, prompts) -> torch.Tensor:
    """The logits of each prompt's last token (one generated token each, greedy)."""
    model, seen = llm.engine.runner.model, []
    compute = model.compute_logits
    model.compute_logits = lambda hidden: seen.append(compute(hidden)) or seen[-1]
    try:
        for prompt in prompts:  # one at a time: each call's logits are that prompt's
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        del model.compute_logits
    return torch.cat(seen).float()


@pytest.mark.parametrize("kind,formats", [
    ("llama", {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_1",
               "ffn_down": "Q4_0", "output": "Q4_1"}),
    ("qwen2", {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q8_0", "ffn_down": "Q4_1"}),  # q/k/v mixed: stays dense
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_logits_match_the_dequantized_model(tmp_path, kind, formats, dtype):
    model, tok = build_tiny_model(tmp_path, kind)
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, kind, formats)
    kwargs = dict(tokenizer=str(tmp_path), dtype=dtype, kv_cache_memory="8MiB", block_size=4)
    quant, dense = LLM(str(path), quantization="gguf", **kwargs), LLM(str(path), quantization="none", **kwargs)
    net = quant.engine.runner.model
    assert isinstance(net.layers[0].mlp.gate_up_proj, PackedQuantLinear)
    assert isinstance(net.layers[0].mlp.down_proj, PackedQuantLinear)
    assert isinstance(net.lm_head, PackedQuantLinear)  # qwen2: the tied embedding's Q8_0 blocks
    assert isinstance(net.layers[0].self_attn.qkv_proj, PackedQuantLinear) == (kind == "llama")
    assert not any(isinstance(m, PackedQuantLinear) for m in dense.engine.runner.model.modules())
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (1, 7, 19, 40)]
    ours, ref = prefill_logits(quant, prompts), prefill_logits(dense, prompts)
    scale = ref.abs().max()
    if dtype == "float32":  # same weights, other summation orders
        assert (ours - ref).abs().max() <= 1e-4 * scale
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    else:  # "none" rounds the dequantized weights to bf16; the quantized path keeps them exact
        assert (ours - ref).abs().max() <= 0.05 * scale


def test_default_model_quantized_logits_match_the_dequantized_model():
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646], [1, 4093, 314, 260, 3575, 282, 4649, 47]]
    kwargs = dict(dtype="float32", kv_cache_memory="64MiB", max_model_len=256)
    quant = LLM("default", quantization="auto", **kwargs)  # auto: a GGUF model on CPU keeps its blocks
    net = quant.engine.runner.model
    assert net.lm_head.weight_format == "q8_0" and net.layers[0].mlp.gate_up_proj.weight_format == "q4_1"
    ours = prefill_logits(quant, prompts)
    ref = prefill_logits(LLM("default", quantization="none", **kwargs), prompts)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_quantization_argument_errors(tiny_llama):
    path, _, _ = tiny_llama
    with pytest.raises(ValueError, match="quantization='gguf' needs a .gguf model"):
        LLM(str(path), quantization="gguf")
    with pytest.raises(ValueError, match="quantization='int4': expected one of auto, gguf, none"):
        LLM(str(path), quantization="int4")
    gguf_path = default_model_path()
    with pytest.raises(ValueError, match="quantization='gguf' runs on CPU only, not on cuda"):
        resolve_quantization("gguf", gguf_path, torch.device("cuda"))
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter"):
        resolve_quantization("gguf", gguf_path, torch.device("cpu"), lora=True)
    assert not resolve_quantization("auto", gguf_path, torch.device("cuda"))
    assert not resolve_quantization("auto", path, torch.device("cpu"))
    assert resolve_quantization("auto", gguf_path, torch.device("cpu"))
