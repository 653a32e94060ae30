"""Architecture hyper-parameters of a Llama-family decoder, read from config.json or GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# generation_config.json settings that vLLM takes as a request's defaults, by their SamplingParams names
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "max_new_tokens": "max_tokens"}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sampling_defaults: dict = field(default_factory=dict)  # SamplingParams fields from generation_config.json

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} in config.json; speedx runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3, Mistral, Qwen2, SmolLM2)"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 nests rope settings under rope_parameters.
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model directory or a .gguf file")
        config = cls.from_hf_dict(json.loads(config_file.read_text()))
        generation_file = Path(path) / "generation_config.json"
        if generation_file.is_file():
            try:
                config.apply_generation_config(json.loads(generation_file.read_text()))
            except (json.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ValueError(f"{generation_file} is not a JSON object of generation settings ({exc}): "
                                 "fix or remove it") from None
        return config

    def apply_generation_config(self, generation: dict) -> None:
        """generation_config.json, read as vLLM reads it: its EOS ids end generation too (an instruct
        model's end of turn is often only there), and its sampling settings are the defaults of a
        request that gives no SamplingParams."""
        eos = generation.get("eos_token_id")
        for token in [] if eos is None else [eos] if isinstance(eos, int) else eos:
            if token not in self.eos_token_ids:
                self.eos_token_ids.append(token)
        self.sampling_defaults = {name: generation[key] for key, name in GENERATION_DEFAULTS.items()
                                  if generation.get(key) is not None}
