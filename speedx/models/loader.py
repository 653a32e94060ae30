"""Find a model and read its config, weights (Hugging Face tensor names) and tokenizer.

Accepted: "default" (the embedded SmolLM2), a Hugging Face directory with safetensors
(sharded or not), or a .gguf file (dequantized with the `gguf` package).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from speedx.models.config import ModelConfig
from speedx.models.default_model import default_model_path
from speedx.models.gguf_tokenizer import load_gguf_tokenizer

# GGUF architectures we can map onto the Llama-family decoder (Mistral GGUFs say "llama").
GGUF_ARCHITECTURES = ("llama", "qwen2")


def resolve_model_path(model: str | Path) -> Path:
    if str(model) == "default":
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return ggufs[0]
        return path
    raise FileNotFoundError(
        f"model {str(model)!r} not found: pass 'default', a Hugging Face model directory "
        "(config.json + *.safetensors) or a .gguf file. speedx never downloads from a hub."
    )


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


# ---------------------------------------------------------------- safetensors directories


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    return files


def iter_safetensors_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------- GGUF files


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; speedx reads {', '.join(GGUF_ARCHITECTURES)} GGUF files"
        )

    def get(key, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    names = [t.name for t in reader.tensors]
    vocab = get("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
    rope_scaling = None
    if get("rope.scaling.type") in ("linear",):
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type="qwen2" if arch == "qwen2" else "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or hidden // heads,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
    )


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        hf = _GGUF_LAYER_NAMES.get(kind)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    hf = _GGUF_TOP_NAMES.get(parts[0])
    return None if hf is None else f"{hf}.{parts[1]}"


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the rotary halves of q/k rows; undo it (rotate-half layout).
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    permuted = config.model_type == "llama"
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            yield "rope_freq_factors", torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
            continue
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"unexpected tensor {tensor.name!r} in GGUF file")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.array(tensor.data, dtype=np.float32)  # copy: the reader memory-maps read-only
        else:
            data = dequantize(tensor.data, tensor.tensor_type)
        data = data.reshape(shape)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _unpermute_rope(data, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _unpermute_rope(data, config.num_key_value_heads)
        yield name, torch.from_numpy(np.ascontiguousarray(data))


@dataclass
class QuantizedWeight:
    """A GGUF weight kept quantized: `blocks` holds its raw bytes, uint8 [n, k / 32 * block bytes]
    (each row whole blocks of 32 values), `format` its type ("q4_0", "q4_1", "q8_0")."""

    format: str
    blocks: torch.Tensor
    shape: tuple[int, int]  # (n, k): the dequantized weight's


# The GGUF types speedx's CPU matmul reads as they are (csrc/cpu_gemm.h).
_KEPT_QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def gguf_quantized_weights(path: Path) -> dict[str, QuantizedWeight]:
    """The 2-D Q4_0 / Q4_1 / Q8_0 weights of a GGUF model, by Hugging Face tensor name, as raw blocks.

    q/k rows are un-permuted like iter_gguf_weights does, moving whole rows of blocks (exact). A tied
    lm_head (no output.weight) appears as "lm_head.weight", the embedding's blocks."""
    reader = open_gguf(path)
    config = gguf_config(reader)
    out = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name) if tensor.name != "rope_freqs.weight" else None
        if name is None or tensor.tensor_type.name not in _KEPT_QUANT_TYPES or len(tensor.shape) != 2:
            continue
        n, k = (int(d) for d in reversed(tensor.shape))
        blocks = np.asarray(tensor.data).reshape(n, -1)
        if config.model_type == "llama" and name.endswith("q_proj.weight"):
            blocks = _unpermute_rope(blocks, config.num_attention_heads)
        elif config.model_type == "llama" and name.endswith("k_proj.weight"):
            blocks = _unpermute_rope(blocks, config.num_key_value_heads)
        out[name] = QuantizedWeight(tensor.tensor_type.name.lower(), torch.from_numpy(np.array(blocks)), (n, k))  # a copy: the reader maps the file read-only
    if config.tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on corrupt files
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc


# ---------------------------------------------------------------- public entry points


def load_config_and_weights(path: Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Config plus a lazy iterator of (Hugging Face tensor name, tensor) pairs."""
    if is_gguf(path):
        reader = open_gguf(path)
        config = gguf_config(reader)
        return config, iter_gguf_weights(reader, config)
    return ModelConfig.from_pretrained_dir(path), iter_safetensors_weights(path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        if is_gguf(path):
            return load_gguf_tokenizer(path)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:  # transformers' own message names a missing package or file
        raise ValueError(
            f"could not load a tokenizer from {path}: a checkpoint needs its tokenizer files "
            f"(tokenizer.json, or tokenizer_config.json with its vocabulary); pass tokenizer=DIR to "
            f"take them from another directory. transformers said: {' '.join(str(err).split())}"
        ) from None
