"""Weight loaders and architectures: sharded safetensors, GGUF (llama.cpp layout), Llama 3.1, Mistral."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_tiny_model
from helpers import assert_matches_hf, make_llm, random_prompts, write_gguf


@pytest.mark.parametrize("kind", ["llama31", "mistral"])
def test_more_architectures_match_hf(kind, tmp_path):
    model, tok = build_tiny_model(tmp_path, kind)
    # Long prompts so Llama-3.1 rope scaling (original context 64) really matters.
    assert_matches_hf(make_llm(tmp_path), model, random_prompts(len(tok), [90, 7, 130]))


def test_sharded_safetensors(tmp_path):
    model, tok = build_tiny_model(tmp_path, "llama")
    for f in tmp_path.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_matches_hf(make_llm(tmp_path), model, random_prompts(len(tok), [9, 4]))


def test_gguf_matches_original_weights(tmp_path):
    model, tok = build_tiny_model(tmp_path, "llama")
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(model, gguf_file)
    llm = make_llm(gguf_file, tokenizer=str(tmp_path))
    assert_matches_hf(llm, model, random_prompts(len(tok), [12, 31, 5]))


def test_gguf_quantized_dequantizes_close_to_original(tmp_path):
    from speedx.models.loader import load_config_and_weights

    model, _ = build_tiny_model(tmp_path, "llama")
    gguf_file = tmp_path / "tiny-q8.gguf"
    write_gguf(model, gguf_file, formats={})
    config, weights = load_config_and_weights(gguf_file)
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    original = model.state_dict()
    loaded = dict(weights)
    assert set(loaded) == set(original)
    for name, tensor in loaded.items():
        ref = original[name].float()
        # Q8_0 keeps ~2 significant digits per 32-value block; permutation mistakes would be O(1) off.
        assert (tensor - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-6, name


def test_gguf_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    from speedx import LLM

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        LLM(str(path))
