"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a packed, paged batch."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from speedx.kernels.registry import Kernels, twins
from speedx.models.attention import AttentionMetadata, CpuStep, PagedAttention
from speedx.models.config import ModelConfig
from speedx.models.layers import RMSNorm, RotaryEmbedding, SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, kernels: Kernels):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = PagedAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            rotary,
            config.qkv_bias,
            kernels,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, kernels)

    def forward(self, positions, hidden, residual, meta):
        """-> (this layer's MLP output, the residual stream before it); the next layer (or the final
        norm) adds the two, fused into its RMSNorm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward_cpu(self, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata, step: CpuStep
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward on the bf16 CPU kernels with the step's scratch buffers; the residual stream is
        updated in place (the first layer, residual None, takes `hidden` itself as the stream)."""
        if residual is None:
            residual = hidden
            self.input_layernorm.norm_into_cpu(step.normed, hidden, None, None, step.num_threads)
        else:
            self.input_layernorm.norm_into_cpu(step.normed, hidden, residual, residual, step.num_threads)
        hidden = self.self_attn.forward_cpu(step.normed, meta, step)
        self.post_attention_layernorm.norm_into_cpu(step.normed, hidden, residual, residual, step.num_threads)
        return self.mlp.forward_cpu(step.normed), residual


class LlamaForCausalLM(nn.Module):
    """kernels: the engine's (kernels/registry.py select); the PyTorch twins when None."""

    def __init__(self, config: ModelConfig, max_position: int, kernels: Kernels | None = None):
        super().__init__()
        self.config = config
        self.kernels = kernels = kernels or twins()
        self.rotary = RotaryEmbedding(config.head_dim, max_position, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary, kernels) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed tokens [tokens] -> final hidden states [tokens, hidden]."""
        hidden, residual = self.embed_tokens(input_ids), None
        if self.fused_cpu_step(hidden, meta):
            return self._forward_cpu(hidden, meta)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden, residual)[0]

    def fused_cpu_step(self, hidden: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step takes _forward_cpu: the engine runs every op of a layer on the C++ CPU
        kernels (a bf16 model and KV cache) and the step's metadata is on the host."""
        return self.kernels.fused_cpu_step and meta.host is not None and hidden.dtype == torch.bfloat16

    def _forward_cpu(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """forward with the per-layer Python work taken out of the loop: the host metadata, thread
        count and scratch buffers are set up once per step, the residual stream is updated in place,
        and modules are entered through forward() (no nn.Module call machinery, no hooks)."""
        c, tokens = self.config, hidden.shape[0]
        step = CpuStep(
            host=meta.host, num_threads=torch.get_num_threads(), normed=torch.empty_like(hidden),
            q=hidden.new_empty(tokens, c.num_attention_heads, c.head_dim),
            attn_out=hidden.new_empty(tokens, c.num_attention_heads, c.head_dim),
        )
        residual = None  # the embedding lookup's own output becomes the stream: free to update in place
        for layer in self.layers:
            hidden, residual = layer.forward_cpu(hidden, residual, meta, step)
        out = torch.empty_like(hidden)
        self.norm.norm_into_cpu(out, hidden, residual, residual, step.num_threads)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # fp32 logits for sampling

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters; every parameter must be set."""
        params = dict(self.named_parameters())
        missing = {(name, shard) for name in params for shard in _shards_of(name)}
        for name, tensor in weights:
            if name == "rope_freq_factors":
                self.rotary.set_frequency_factors(tensor)
                continue
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            target, shard = _fused_target(name.removeprefix("model."))
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a {self.config.model_type} model")
            param = params[target]
            rows = self._shard_rows(target, shard)
            dest = param if rows is None else param[rows[0] : rows[1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            missing.discard((target, shard))
        if missing:
            names = sorted(f"{name}[{shard}]" if shard else name for name, shard in missing)
            raise ValueError(f"checkpoint is missing {len(names)} tensors, e.g. {names[:3]}")

    def _shard_rows(self, target: str, shard: str | None) -> tuple[int, int] | None:
        if shard is None:
            return None
        c = self.config
        q, kv, inter = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter), "up": (inter, 2 * inter)}[shard]


_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}


def _shards_of(param_name: str) -> tuple[str | None, ...]:
    shards = tuple(shard for part, (fused, shard) in _FUSED.items() if f".{fused}." in param_name)
    return shards or (None,)


def _fused_target(name: str) -> tuple[str, str | None]:
    """'layers.3.self_attn.k_proj.weight' -> ('layers.3.self_attn.qkv_proj.weight', 'k')."""
    for part, (fused, shard) in _FUSED.items():
        if f".{part}." in name:
            return name.replace(part, fused), shard
    return name, None
