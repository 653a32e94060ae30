"""Alignment trainings on tiny random models: HF export, junior/revisor SFT (LoRA), merge, senior DPO."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_model
from helpers import assert_matches_hf, make_llm, random_prompts

from speedx.align.training import (
    LORA_TARGETS,
    eos_suffix,
    make_sft_trainer,
    merge_adapter,
    train_dpo,
    train_sft,
)
from speedx.models.hf_export import MARKER, export_hf_checkpoint

peft = pytest.importorskip("peft")
pytest.importorskip("trl")

ANIMALS = ["fox", "dog", "robot", "model", "query", "document", "sky", "negative"]
SFT_RECORDS = [
    {"messages": [{"role": "user", "content": f"describe the {a} in {n} words"}],
     "completion": "the quick brown fox jumps"}
    for n in (3, 5) for a in ANIMALS
]
DPO_PAIRS = [
    {"messages": [{"role": "user", "content": f"what does the {a} do"}],
     "chosen": "the quick brown fox jumps over the lazy dog", "rejected": "hard negatives look relevant"}
    for a in ANIMALS
]
FAST = {"batch_size": 4, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def completion_logp(model, tok, messages, text) -> float:
    """Sum of log p(completion tokens | prompt), the completion rendered as the trainers render it."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": text + eos_suffix(tok)}],
                                   tokenize=True, return_dict=True)["input_ids"]
    logp = torch.log_softmax(logits(model, full)[:-1], dim=-1)
    targets = torch.tensor(full[1:])
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1:].sum().item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("align-base")
    _, tok = build_tiny_model(path, "llama")
    return path, tok


@pytest.fixture(scope="module")
def sft_adapter(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("align-sft") / "junior"
    return train_sft(base[0], SFT_RECORDS, out, lr=1e-2, max_steps=6, **FAST)


# ---------------------------------------------------------------- export


def test_gguf_export_matches_the_original_and_loads_back(tmp_path):
    from helpers import write_gguf

    model, tok = build_tiny_model(tmp_path / "hf", "llama")
    (tmp_path / "gguf").mkdir()
    gguf_file = tmp_path / "gguf" / "tiny.gguf"
    write_gguf(model, gguf_file)
    out = export_hf_checkpoint(gguf_file, tmp_path / "export", tokenizer=tmp_path / "hf")
    ids = random_prompts(len(tok), [17], seed=5)[0]
    torch.testing.assert_close(logits(hf_model(out), ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    assert_matches_hf(make_llm(out), model, random_prompts(len(tok), [9, 23]))  # speedx's engine reads it back
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert export_hf_checkpoint(gguf_file, tmp_path / "export", tokenizer=tmp_path / "hf") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # idempotent: the marker matched, nothing rewritten
    assert json.loads((out / MARKER).read_text())["dtype"] == "float32"


def test_hf_dir_export_keeps_the_architecture(tmp_path):
    model, tok = build_tiny_model(tmp_path / "hf", "qwen2")  # tied embeddings + q/k/v biases
    out = export_hf_checkpoint(tmp_path / "hf", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    ids = random_prompts(len(tok), [11], seed=2)[0]
    torch.testing.assert_close(logits(hf_model(out), ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="not a speedx export"):
        export_hf_checkpoint(tmp_path / "hf", tmp_path / "hf")


@pytest.mark.slow
def test_default_model_export_matches_transformers_gguf_loading(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speedx.models.default_model import default_model_path

    out = export_hf_checkpoint("default", tmp_path / "smollm2")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    assert eos_suffix(tok) == ""  # ChatML closes the assistant turn with EOS itself
    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    torch.testing.assert_close(logits(hf_model(out), ids), logits(reference, ids), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- SFT


def test_sft_labels_mask_the_prompt_and_include_eos(base, tmp_path):
    path, tok = base
    trainer = make_sft_trainer(path, SFT_RECORDS[:2], tmp_path / "sft", **FAST)
    example = trainer.train_dataset[0]
    prompt_ids = tok.apply_chat_template(SFT_RECORDS[0]["messages"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    labels, input_ids = example["labels"], example["input_ids"]
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == input_ids[len(prompt_ids):]  # every completion token is learned...
    assert tok.eos_token_id in labels  # ... including EOS, which this template would not add by itself
    assert tok.decode(labels[len(prompt_ids):]).strip() == SFT_RECORDS[0]["completion"] + tok.eos_token
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["labels"][0] == -100).sum() >= len(prompt_ids)


def test_eos_is_not_doubled_when_the_template_ends_turns_with_it(base):
    _, tok = base
    assert eos_suffix(tok) == tok.eos_token
    chatml_like = tok.chat_template.replace("{{ m['content'] }}\n", "{{ m['content'] }}</s>\n")
    tok2 = type(tok).from_pretrained(str(base[0]))
    tok2.chat_template = chatml_like
    assert eos_suffix(tok2) == ""


def test_sft_lowers_the_loss_and_saves_a_peft_adapter(base, sft_adapter):
    path, tok = base
    log = json.loads((sft_adapter / "train_log.json").read_text())
    assert log["steps"] == 6 and len(log["losses"]) == 6 and log["seconds"] > 0
    assert log["losses"][-1] < log["losses"][0]
    assert log["hyperparameters"]["lr"] == 1e-2 and log["hyperparameters"]["max_length"] == 2048
    config = json.loads((sft_adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(LORA_TARGETS)
    assert (sft_adapter / "adapter_model.safetensors").is_file() and (sft_adapter / "tokenizer_config.json").is_file()
    adapted = peft.PeftModel.from_pretrained(hf_model(path), str(sft_adapter)).eval()
    record = SFT_RECORDS[0]
    assert completion_logp(adapted, tok, record["messages"], record["completion"]) > completion_logp(
        hf_model(path), tok, record["messages"], record["completion"]
    )


def test_sft_is_deterministic_with_the_seed(base, tmp_path):
    from safetensors.torch import load_file

    runs = [train_sft(base[0], SFT_RECORDS, tmp_path / f"run{i}", lr=1e-2, max_steps=2, **FAST) for i in range(2)]
    first, second = (load_file(str(r / "adapter_model.safetensors")) for r in runs)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_merged_adapter_equals_base_plus_adapter(base, sft_adapter, tmp_path):
    path, tok = base
    merged_dir = merge_adapter(path, sft_adapter, tmp_path / "merged")
    ids = random_prompts(len(tok), [15], seed=9)[0]
    adapted = peft.PeftModel.from_pretrained(hf_model(path), str(sft_adapter)).eval()
    torch.testing.assert_close(logits(hf_model(merged_dir), ids), logits(adapted, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(hf_model(path), ids), logits(adapted, ids), atol=1e-3)  # the adapter matters
    assert (merged_dir / "tokenizer_config.json").is_file()
    # speedx's engine reads both forms: the merged checkpoint, and the base with the adapter merged at load.
    prompts = random_prompts(len(tok), [7, 19], seed=4)
    assert_matches_hf(make_llm(merged_dir), adapted.merge_and_unload(), prompts)
    assert_matches_hf(make_llm(path, lora=str(sft_adapter)), hf_model(merged_dir), prompts)


# ---------------------------------------------------------------- DPO


def test_dpo_starts_at_ln2_and_widens_the_margin(base, sft_adapter, tmp_path):
    _, tok = base
    junior = merge_adapter(base[0], sft_adapter, tmp_path / "junior")
    out = train_dpo(junior, DPO_PAIRS, tmp_path / "senior", lr=5e-3, max_steps=3, **FAST)
    log = json.loads((out / "train_log.json").read_text())
    assert abs(log["first_step_loss"] - math.log(2)) < 1e-4  # policy == reference (adapter-disabled junior) at step 0
    assert log["losses"][-1] < log["first_step_loss"]
    assert log["final"]["rewards/margins"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(junior)

    reference = hf_model(junior)
    policy = peft.PeftModel.from_pretrained(hf_model(junior), str(out)).eval()

    def margin(model, pair):
        return completion_logp(model, tok, pair["messages"], pair["chosen"]) - completion_logp(
            model, tok, pair["messages"], pair["rejected"]
        )

    for pair in DPO_PAIRS[:3]:
        assert margin(policy, pair) > margin(reference, pair)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "no SFT records"),
        ([SFT_RECORDS[0], {"messages": SFT_RECORDS[0]["messages"]}], "SFT record 1 has no 'completion' field"),
        ([{"completion": "x"}], "SFT record 0 has no 'messages' field"),
        ([{"messages": "hello", "completion": "x"}], "SFT record 0: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "user"}], "completion": "x"}], r"messages\[0\] must be a dict"),
        ([{"messages": SFT_RECORDS[0]["messages"], "completion": ""}], "'completion' must be a non-empty string"),
    ],
)
def test_bad_sft_records_are_refused(base, tmp_path, records, message):
    with pytest.raises(ValueError, match=message):
        train_sft(base[0], records, tmp_path / "out")


def test_bad_dpo_pairs_and_arguments_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="no DPO records"):
        train_dpo(base[0], [], tmp_path / "out")
    with pytest.raises(ValueError, match="DPO record 2 has no 'rejected' field"):
        train_dpo(base[0], DPO_PAIRS[:2] + [{"messages": DPO_PAIRS[0]["messages"], "chosen": "a"}], tmp_path / "out")
    with pytest.raises(TypeError, match="learning_rate"):
        train_sft(base[0], SFT_RECORDS, tmp_path / "out", learning_rate=1e-4)
