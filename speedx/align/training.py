"""SPEED's three trainings with TRL + PEFT LoRA: junior SFT, senior DPO, revisor SFT.

Data (JSON-able dicts, as the pipeline writes them to disk):
  SFT: {"messages": [chat messages of the prompt], "completion": str}
  DPO: {"messages": [chat messages of the prompt], "chosen": str, "rejected": str}
Both become TRL *conversational* prompt/completion datasets: TRL renders them with the model's chat
template, masks the prompt (SFT: completion_only_loss; DPO scores completions only) and, for
conversational data, relies on the template to close the assistant turn. Where the template does not
close it with the EOS token we append EOS to the completion, so the model always learns to stop.

Outputs are standard PEFT adapters (adapter_config.json + adapter_model.safetensors) plus the
tokenizer and train_log.json; speedx's engine merges them at load: LLM(base, lora=adapter_dir).
The revisor is `train_sft` on (generation prompt, task, root example) -> revised example records.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from speedx.models.hf_export import export_hf_checkpoint
from speedx.models.loader import resolve_model_path

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The paper's hyper-parameters per stage (SPEED.md stages 4, 7, 9); batch is the effective batch size.
JUNIOR_SFT = {"lr": 1e-4, "batch_size": 16}
SENIOR_DPO = {"lr": 1e-5, "beta": 0.1, "batch_size": 16}
REVISOR_SFT = {"lr": 5e-6, "batch_size": 24}


# ---------------------------------------------------------------- inputs


def hf_base(base_model: str | Path, out_dir: str | Path) -> Path:
    """An HF directory for `base_model`: itself if it is one, else an export next to `out_dir` (cached)."""
    source = resolve_model_path(base_model)
    if source.is_dir() and (source / "config.json").is_file():
        return source
    stem = source.name.removesuffix(".gguf")
    return export_hf_checkpoint(source, Path(out_dir).parent / f"hf-base-{stem}")


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages")
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{j}] must be a dict with string 'role' and 'content'")  # noqa: TRY004
        clean.append({"role": m["role"], "content": m["content"]})  # extra keys would upset Arrow's schema
    if clean[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt messages end with an assistant turn; put that text in the completion")
    return clean


def _check_records(records: Iterable[dict], text_fields: tuple[str, ...], kind: str) -> list[dict]:
    records = list(records)
    if not records:
        raise ValueError(f"no {kind} records: nothing to train on")
    checked = []
    for i, record in enumerate(records):
        where = f"{kind} record {i}"
        if not isinstance(record, dict):
            # ValueError, not TypeError: callers catch one error type for bad data.
            raise ValueError(f"{where} is a {type(record).__name__}, not a dict")  # noqa: TRY004
        for field in ("messages", *text_fields):
            if field not in record:
                raise ValueError(f"{where} has no {field!r} field (needs messages, {', '.join(text_fields)})")
        for field in text_fields:
            if not isinstance(record[field], str) or not record[field]:
                raise ValueError(f"{where}: {field!r} must be a non-empty string")
        checked.append({"messages": _check_messages(record["messages"], where), **{f: record[f] for f in text_fields}})
    return checked


def eos_suffix(tokenizer) -> str:
    """'' when the chat template ends an assistant turn with EOS (ChatML, Mistral, ...), else the EOS token."""
    probe = "SPEEDX_PROBE_TEXT"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    return "" if tokenizer.eos_token in text.split(probe)[-1] else tokenizer.eos_token


def _assistant(text: str, suffix: str) -> list[dict]:
    return [{"role": "assistant", "content": text + suffix}]


# ---------------------------------------------------------------- shared setup


def _device(device: str | None) -> tuple[str, bool]:
    """(device type, bf16): fp32 on CPU, bf16 on CUDA when the card supports it."""
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    return kind, kind == "cuda" and torch.cuda.is_bf16_supported()


def _load(base: Path, bf16: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if not tokenizer.chat_template:
        raise ValueError(f"{base} has no chat template: SPEED's prompts are chats, train a chat (instruct) model")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16 if bf16 else torch.float32)
    return model, tokenizer


def _hparams(train_fn, given: dict) -> dict:
    """`given` keyword arguments completed with `train_fn`'s defaults (unknown names are a TypeError)."""
    params = {n: p.default for n, p in inspect.signature(train_fn).parameters.items() if p.kind == p.KEYWORD_ONLY}
    unknown = set(given) - set(params) - {"base_model", "records", "pairs", "out_dir"}
    if unknown:
        raise TypeError(f"{train_fn.__name__}() got unexpected keyword arguments {sorted(unknown)}")
    return {n: given.get(n, default) for n, default in params.items()}


def _lora(hp: dict):
    from peft import LoraConfig

    return LoraConfig(r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                      target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")


def _common_args(out_dir, hp: dict) -> dict:
    from transformers import TrainingArguments

    kind, bf16 = _device(hp["device"])
    # transformers >= 5.x renamed gradient_checkpointing (TRL defaults it to True) to activation_checkpointing.
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return dict(
        output_dir=str(out_dir), learning_rate=hp["lr"], per_device_train_batch_size=hp["batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"], num_train_epochs=hp["epochs"],
        max_steps=hp["max_steps"], seed=hp["seed"], data_seed=hp["seed"], logging_steps=hp["logging_steps"],
        max_length=hp["max_length"],
        bf16=bf16, use_cpu=kind == "cpu",
        **{checkpointing: kind == "cuda"},  # saves GPU memory on 8B models; only slows small CPU runs
        save_strategy="no", report_to="none",  # out_dir holds just the final adapter; no hub, no trackers
    )


def _run(trainer, out_dir: Path, stage: str, n: int, hparams: dict, summary=None) -> Path:
    """Train, save the adapter + tokenizer, write train_log.json."""
    import peft
    import transformers
    import trl

    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(out_dir))  # a PeftModel saves just the adapter; the tokenizer goes along
    history = trainer.state.log_history
    logged = [h for h in history if "loss" in h]
    steps = trainer.state.global_step
    log = {
        "stage": stage,
        "base_model": str(trainer.speedx_base),
        "num_examples": n,
        "steps": steps,
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / max(steps, 1), 4),
        "losses": [h["loss"] for h in logged],
        "loss_steps": [h["step"] for h in logged],
        **(summary(logged) if summary else {}),
        "hyperparameters": hparams,
        "device": trainer.args.device.type,
        "bf16": bool(trainer.args.bf16),
        "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "log_history": history,
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return out_dir


# ---------------------------------------------------------------- SFT (junior generator, revisor)


def train_sft(base_model, records, out_dir, *, lr=1e-4, batch_size=16, epochs=1, max_steps=-1, lora_r=16,
              lora_alpha=32, lora_dropout=0.05, max_length=2048, seed=0, gradient_accumulation_steps=1,
              logging_steps=1, device=None) -> Path:
    """LoRA SFT with completion-only loss; returns `out_dir` (PEFT adapter + tokenizer + train_log.json).

    `base_model`: an HF directory, a .gguf file or "default" (a GGUF is exported once to hf-base-* beside
    out_dir). `batch_size` is per device: the effective batch is batch_size * gradient_accumulation_steps.
    `max_steps` > 0 overrides `epochs`. `device`: None picks CUDA when available.
    """
    hparams = _hparams(train_sft, locals())
    records = list(records)
    trainer = make_sft_trainer(base_model, records, out_dir, **hparams)
    return _run(trainer, Path(out_dir), "sft", len(records), hparams)


def make_sft_trainer(base_model, records, out_dir, **hparams):
    """The configured TRL SFTTrainer (dataset tokenized, labels built) without training it; `train_sft`'s arguments."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    hp = _hparams(train_sft, hparams)
    records = _check_records(records, ("completion",), "SFT")
    out_dir = Path(out_dir)
    base = hf_base(base_model, out_dir)
    args = SFTConfig(
        **_common_args(out_dir, hp),
        completion_only_loss=True,  # loss on the completion tokens only (the default for prompt/completion data)
    )
    model, tokenizer = _load(base, args.bf16)
    suffix = eos_suffix(tokenizer)
    data = Dataset.from_list(
        [{"prompt": r["messages"], "completion": _assistant(r["completion"], suffix)} for r in records]
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=_lora(hp))
    trainer.speedx_base = base
    return trainer


def merge_adapter(base_model, adapter_dir, out_dir) -> Path:
    """Fold a LoRA adapter into its base and save a full HF checkpoint (+ tokenizer): the DPO stage's start."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    base = hf_base(base_model, out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")  # keep the base's stored dtype
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------- DPO (senior generator)


def train_dpo(base_model, pairs, out_dir, *, lr=1e-5, beta=0.1, batch_size=16, epochs=1, max_steps=-1, lora_r=16,
              lora_alpha=32, lora_dropout=0.05, max_length=2048, seed=0, gradient_accumulation_steps=1,
              logging_steps=1, device=None) -> Path:
    """LoRA DPO (sigmoid loss) against the adapter-disabled base; returns `out_dir` (adapter + tokenizer + log).

    Pass the merged junior (see `merge_adapter`) as `base_model`: it is then both the starting policy and
    the reference. train_log.json adds first_step_loss (ln 2, since a fresh LoRA leaves the policy equal
    to the reference; recorded when logging_steps == 1) and the final rewards/accuracies and margins.
    Other arguments as in `train_sft`.
    """
    hparams = _hparams(train_dpo, locals())
    pairs = list(pairs)
    trainer = make_dpo_trainer(base_model, pairs, out_dir, **hparams)
    return _run(trainer, Path(out_dir), "dpo", len(pairs), hparams, summary=_dpo_summary)


def make_dpo_trainer(base_model, pairs, out_dir, **hparams):
    """The configured TRL DPOTrainer without training it; `train_dpo`'s arguments."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    hp = _hparams(train_dpo, hparams)
    pairs = _check_records(pairs, ("chosen", "rejected"), "DPO")
    out_dir = Path(out_dir)
    base = hf_base(base_model, out_dir)
    args = DPOConfig(**_common_args(out_dir, hp), beta=hp["beta"], loss_type=["sigmoid"])  # the original DPO loss
    model, tokenizer = _load(base, args.bf16)
    suffix = eos_suffix(tokenizer)
    data = Dataset.from_list([
        {"prompt": p["messages"], "chosen": _assistant(p["chosen"], suffix),
         "rejected": _assistant(p["rejected"], suffix)}
        for p in pairs
    ])
    # ref_model=None + peft_config: TRL scores the reference with the adapter disabled, i.e. the base itself.
    # A fresh LoRA has B=0, so policy == reference at step 0.
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=_lora(hp))
    trainer.speedx_base = base
    return trainer


def _dpo_summary(logged: list[dict]) -> dict:
    last = logged[-1] if logged else {}
    first = logged[0] if logged and logged[0]["step"] == 1 else None  # a later first log averages several steps
    return {
        "first_step_loss": None if first is None else first["loss"],
        "ln2": math.log(2),
        "final": {k: last[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                       "rewards/rejected") if k in last},
    }
