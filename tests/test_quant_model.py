"""Models with GGUF weights kept quantized (LLM(quantization=...)) against the same GGUF file
dequantized at load (quantization="none"): the same weights, so the logits must agree to fp32
rounding in fp32 and to bf16 rounding in bf16."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import build_tiny_model

from speedx import LLM, SamplingParams
from speedx.models.cpu_linear import PackedQuantLinear, resolve_quantization
from speedx.models.default_model import default_model_path

_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_quantized_gguf(model, path, arch: str, formats: dict[str, str]):
    """A HF model as llama.cpp's converter writes it (llama: q/k rows permuted), its matrices in the
    GGUF type formats[short name] (default Q8_0), e.g. {"ffn_down": "Q4_0"}; vectors stay F32."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_eos_token_id(c.eos_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        short = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
        if name in short:
            out = f"{short[name]}.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            out = f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(module)
            if arch == "llama" and heads:  # llama.cpp's rope permutation (loader._unpermute_rope undoes it)
                data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 2:
            kind = gguf.GGMLQuantizationType[formats.get(out.split(".")[-2], "Q8_0")]
            q = gguf.quants.quantize(data, kind)
            writer.add_tensor(out, q, raw_shape=q.shape, raw_dtype=kind)
        else:
            writer.add_tensor(out, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    write_quantized_gguf(model, path, kind, formats)
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
    with pytest.raises(ValueError, match="quantization must be 'auto', 'gguf' or 'none', got 'int4'"):
        LLM(str(path), quantization="int4")
    gguf_path = default_model_path()
    with pytest.raises(ValueError, match="quantization='gguf' runs on CPU only, not on cuda"):
        resolve_quantization("gguf", gguf_path, torch.device("cuda"))
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter"):
        resolve_quantization("gguf", gguf_path, torch.device("cpu"), lora=True)
    assert not resolve_quantization("auto", gguf_path, torch.device("cuda"))
    assert not resolve_quantization("auto", path, torch.device("cpu"))
    assert resolve_quantization("auto", gguf_path, torch.device("cpu"))
