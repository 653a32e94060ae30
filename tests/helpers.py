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


_GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}


def write_gguf(model, path, arch: str = "llama", formats: dict[str, str] | None = None) -> None:
    """A HF model as llama.cpp's converter writes it (llama: q/k rows permuted). formats None: every
    tensor F32; else each matrix in the GGUF type formats[short name] (default Q8_0), e.g.
    {"ffn_down": "Q4_0"}; vectors stay F32."""
    import gguf

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
        if name in _GGUF_TOP_NAMES:
            out = f"{_GGUF_TOP_NAMES[name]}.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            out = f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(module)
            if arch == "llama" and heads:  # llama.cpp's rope permutation (loader._unpermute_rope undoes it)
                data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if formats is not None and data.ndim == 2:
            kind = gguf.GGMLQuantizationType[formats.get(out.split(".")[-2], "Q8_0")]
            q = gguf.quants.quantize(data, kind)
            writer.add_tensor(out, q, raw_shape=q.shape, raw_dtype=kind)
        else:
            writer.add_tensor(out, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
