"""Write a randomly initialised Llama-shaped checkpoint for speed measurements (no download needed).

Random bf16 weights (std 0.02, made on the GPU when there is one), config.json with the chosen
shape, and a tiny byte-level BPE tokenizer trained in place whose ids the config pads up to the
shape's vocabulary. Runs that ignore EOS then cost exactly what the real model costs.

    python bench/random_llama.py --shape llama3-8b /tmp/llama3-8b-random
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936),
    "tiny": (128, 384, 2, 4, 2, 1024),  # smoke runs of the bench scripts on CPU
}


def write_tokenizer(out: Path) -> None:
    text = "the quick brown fox jumps over the lazy dog while a robot paints the sky in bright colors " * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    args = parser.parse_args()
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[args.shape]
    head_dim = hidden // heads
    args.out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(args.out)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, hidden_act="silu", torch_dtype="bfloat16")
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def rand(*shape):
        return (torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    kv = kv_heads * head_dim
    save_file({"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": ones(hidden)}, str(args.out / "model-00.safetensors"))
    for layer in range(layers):
        p = f"model.layers.{layer}."
        save_file({
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
        }, str(args.out / f"model-{layer + 1:02d}.safetensors"))
    print(f"wrote {args.shape} to {args.out}")


if __name__ == "__main__":
    main()
