"""Write any model speedx loads (in particular the embedded GGUF) as a plain Hugging Face checkpoint.

TRL, PEFT and transformers train Hugging Face directories; GGUF files are for inference. The export
dequantizes GGUF weights through our own loader (the same tensors speedx's engine runs), writes a
config.json for the matching transformers architecture, one model.safetensors, the tokenizer (with
its chat template) and a generation_config.json. speedx's engine loads the result back unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from speedx.models.config import ModelConfig
from speedx.models.loader import (
    is_gguf,
    load_config_and_weights,
    load_tokenizer,
    resolve_model_path,
)

MARKER = "speedx_export.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _source_stamp(source: Path, tokenizer: Path | None, dtype: torch.dtype) -> dict:
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return {
        "source": str(source.resolve()),
        "tokenizer": None if tokenizer is None else str(Path(tokenizer).resolve()),
        "dtype": str(dtype).removeprefix("torch."),
        # size + mtime of every source file: a re-downloaded or edited model is exported again.
        "files": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files},
    }


def hf_config(config: ModelConfig, dtype: torch.dtype):
    """A transformers config object for our ModelConfig (serialised in the installed version's format)."""
    import transformers

    if config.model_type == "llama" and config.qkv_bias:
        # Llama's attention_bias would also add an o_proj bias that the GGUF does not have.
        raise ValueError("a Llama-architecture GGUF with q/k/v biases cannot be exported as a transformers Llama")
    arch = ARCHITECTURES[config.model_type]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    eos = config.eos_token_ids
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    kwargs = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "architectures": [arch],
        "dtype": str(dtype).removeprefix("torch."),
    }
    if config.model_type == "llama":
        kwargs["mlp_bias"] = False
        kwargs["attention_bias"] = False
    if config.model_type in ("mistral", "qwen2"):
        kwargs["sliding_window"] = config.sliding_window
        kwargs["use_sliding_window"] = config.sliding_window is not None
    return config_cls(**kwargs)


def _expected_names(hf_cfg) -> set[str]:
    """Parameter names transformers expects for this config (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    names = set(model.state_dict())
    if hf_cfg.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def export_hf_checkpoint(
    model_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None
) -> Path:
    """Write `model_path` ("default", a .gguf file or an HF directory) as an HF checkpoint in `out_dir`.

    `tokenizer`: a tokenizer directory for GGUF files that carry none. Idempotent: returns at once when
    `out_dir` already holds an export of the same source files and dtype.
    """
    source = resolve_model_path(model_path)
    out = Path(out_dir)
    stamp = _source_stamp(source, tokenizer, dtype)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{out} exists and is not a speedx export; choose an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # written last: a half-finished export is never mistaken for a finished one

    config, weights = load_config_and_weights(source)
    if is_gguf(source):
        hf_cfg = hf_config(config, dtype)
    else:  # keep every field of the original config.json, only the stored dtype changes
        from transformers import AutoConfig

        hf_cfg = AutoConfig.from_pretrained(str(source))
        hf_cfg.dtype = dtype
    expected = _expected_names(hf_cfg)

    tensors = {}
    for name, tensor in weights:
        if name == "rope_freq_factors":
            raise ValueError(
                f"{source} uses GGUF rope frequency factors (Llama 3.1 scaling); export the original HF checkpoint"
            )
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[name] = tensor.to(dtype).contiguous()
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise ValueError(
            f"cannot export {source}: missing tensors {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    hf_cfg.save_pretrained(out)
    if source.is_dir() and (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id).save_pretrained(out)
    tok = load_tokenizer(Path(tokenizer) if tokenizer is not None else source)
    tok.save_pretrained(out)
    marker.write_text(json.dumps(stamp, indent=1))
    return out
