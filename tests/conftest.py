"""Shared fixtures: tiny randomly initialised Hugging Face checkpoints built in code (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util

import pytest
import torch

# Triton fixes interpreter vs compiler at its first import, for the whole process. Without CUDA the
# Triton tests need the interpreter, so import it interpreted here, before any test module (or a
# library one imports: transformers, peft, trl, sentence-transformers) can import it compiled and
# leave every kernel-vs-twin test skipped.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from speedx.kernels.triton_jit import import_triton, interpreter_active

    import_triton(interpret=True)
    if not interpreter_active():  # a plugin imported it first: fail loudly rather than skip the kernel tests
        raise RuntimeError("triton was imported in compiled mode before tests/conftest.py; the Triton tests on CPU "
                           "need its interpreter: run pytest with TRITON_INTERPRET=1")


@pytest.fixture(scope="session", autouse=True)
def speedx_cache_dir(tmp_path_factory):
    """The tests' speedx cache (converted GGUF tokenizers) lives in a temporary directory, not ~/.cache."""
    old = os.environ.get("SPEEDX_CACHE_DIR")
    os.environ["SPEEDX_CACHE_DIR"] = str(tmp_path_factory.mktemp("speedx-cache"))
    yield
    if old is None:
        del os.environ["SPEEDX_CACHE_DIR"]
    else:
        os.environ["SPEEDX_CACHE_DIR"] = old

CORPUS = (
    "the quick brown fox jumps over the lazy dog while a small robot paints the sky in bright colors "
    "embedding models learn to map queries and documents into one space where neighbours share meaning "
    "hard negatives look relevant but do not answer the question and so they teach the model to look closer "
) * 4


def build_tokenizer(save_dir, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(save_dir)
    return fast


TINY_CONFIGS = {
    # GQA Llama with untied head, several layers.
    "llama": dict(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen2: bias on q/k/v, tied embeddings (the SmolLM2 layout too).
    "qwen2": dict(arch="Qwen2ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    # Llama 3.1 rope scaling, head_dim 32, MHA.
    "llama31": dict(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral layout (no sliding window within these lengths).
    "mistral": dict(arch="MistralForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None),
}


def build_tiny_model(save_dir, kind: str, seed: int = 0):
    import transformers

    spec = dict(TINY_CONFIGS[kind])
    arch = spec.pop("arch")
    tokenizer = build_tokenizer(save_dir)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(
        vocab_size=len(tokenizer), max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.05,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **spec,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    if kind == "qwen2":  # random non-zero biases so the bias path is really exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(save_dir, safe_serialization=True)
    return model, tokenizer


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory):
    """(directory, HF model, tokenizer) for a tiny random checkpoint."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model, tokenizer = build_tiny_model(path, request.param)
    return path, model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-only")
    model, tokenizer = build_tiny_model(path, "llama")
    return path, model, tokenizer
