"""LoRA adapters merged at load: the engine's greedy tokens equal PEFT's merged model in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_hf, make_llm, random_prompts

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_random_adapter(base_model, out_dir, seed, **config):
    """A LoRA with random A and B (PEFT's default init makes B zero: no effect to test)."""
    torch.manual_seed(seed)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **config)
    model = peft.get_peft_model(base_model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # large enough to change greedy tokens
    model.save_pretrained(out_dir)
    merged = model.merge_and_unload().eval()
    return merged


@pytest.fixture
def fresh_base(tiny_llama):
    from conftest import build_tiny_model

    path, _, tok = tiny_llama
    model, _ = build_tiny_model(path.parent / "unused", "llama")  # same seed: identical weights, a private copy
    return path, model, tok


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "alpha_pattern": {"down_proj": 2}}], ids=["plain", "rslora"])
def test_merged_adapter_matches_peft(tmp_path, fresh_base, config):
    path, base, tok = fresh_base
    merged = save_random_adapter(base, tmp_path / "adapter", seed=3, **config)
    prompts = random_prompts(len(tok), [5, 12, 30], seed=21)
    llm = make_llm(path, lora=str(tmp_path / "adapter"))
    assert_matches_hf(llm, merged, prompts)
    plain = make_llm(path).generate(prompts, use_tqdm=False)
    adapted = llm.generate(prompts, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in adapted]  # it did change


def test_bad_adapters_are_refused_with_a_reason(tmp_path, fresh_base):
    path, base, _ = fresh_base
    with pytest.raises(FileNotFoundError, match="not a PEFT LoRA adapter"):
        make_llm(path, lora=str(tmp_path))
    save_random_adapter(base, tmp_path / "dora", seed=4)
    config_file = tmp_path / "dora" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora not supported"):
        make_llm(path, lora=str(tmp_path / "dora"))


def test_adapter_for_another_model_is_refused(tmp_path, fresh_base):
    from conftest import build_tiny_model

    _, base, _ = fresh_base
    build_tiny_model(tmp_path / "qwen2", "qwen2")  # other layer shapes
    save_random_adapter(base, tmp_path / "adapter", seed=5)
    with pytest.raises(ValueError, match="another base model"):
        make_llm(tmp_path / "qwen2", lora=str(tmp_path / "adapter"))
