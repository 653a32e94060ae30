"""Output tokens/s of speedx next to Hugging Face `transformers.generate` (and vLLM if installed).

Same model weights, dtype, prompts and forced output length for every contender; medians over
repeats; JSON out. Default workload (the engine-core target): the embedded SmolLM2-135M-Instruct
in bf16, 64 copies of an 80-token chat prompt, 128 new tokens each.

    python bench/throughput.py                       # default workload
    python bench/throughput.py --num-prompts 256 --output-len 256 --repeats 5 --skip-hf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from speedx import LLM, SamplingParams
from speedx.models.loader import load_config_and_weights, resolve_model_path

CHAT = (
    "Write a short story about a robot who learns to paint. Describe the colors, the brushes, the light in "
    "the studio and how it feels when the first painting is finished and shown to the people of the city. "
    "Give the robot a name, a friend who teaches it, and one mistake that turns out to be the best part of "
    "the picture. Keep it warm, concrete and under three hundred words."
)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def chat_prompt(llm: LLM, target_len: int) -> list[int]:
    words = CHAT.split()
    for cut in range(len(words), 0, -1):
        ids = llm.apply_chat_template([{"role": "user", "content": " ".join(words[:cut])}])
        if len(ids) <= target_len:
            return ids
    raise ValueError(f"cannot build a chat prompt of {target_len} tokens")


def hf_model_like(model_path, dtype: torch.dtype, device: str):
    """A transformers LlamaForCausalLM holding exactly the weights speedx loads (GGUF dequantized)."""
    import transformers

    config, weights = load_config_and_weights(resolve_model_path(model_path))
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[config.model_type]
    hf_config = getattr(transformers, f"{arch}Config")(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
    )
    hf_config._attn_implementation = "sdpa"
    model = getattr(transformers, f"{arch}ForCausalLM")(hf_config)
    state = dict(weights)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def time_speedx(llm: LLM, prompts, output_len: int) -> float:
    llm.engine.pool.reset_prefix_cache()  # sharing within a run counts; carry-over between repeats does not
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


@torch.inference_mode()
def time_hf(model, prompts, output_len: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
        do_sample=False, pad_token_id=0,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + output_len
    return elapsed


def time_vllm(model_path, prompts, output_len: int, dtype: str, repeats: int) -> list[float] | None:
    try:
        import vllm
    except ImportError:
        return None
    engine = vllm.LLM(str(resolve_model_path(model_path)), dtype=dtype, enable_prefix_caching=True)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    times = []
    for _ in range(repeats + 1):
        engine.reset_prefix_cache()
        start = time.perf_counter()
        engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=80)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="bench/results/throughput.json")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype)
    device = str(llm.device)
    prompt = chat_prompt(llm, args.prompt_len)
    prompts = [prompt] * args.num_prompts
    total_out = args.num_prompts * args.output_len
    print(f"{args.num_prompts} prompts x {len(prompt)} tokens in, {args.output_len} out, {args.dtype} on {device_name(device)}")

    time_speedx(llm, prompts[:4], 4)  # warm-up
    results = {"speedx": [time_speedx(llm, prompts, args.output_len) for _ in range(args.repeats)]}
    del llm
    if not args.skip_hf:
        hf = hf_model_like(args.model, getattr(torch, args.dtype), device)
        time_hf(hf, prompts[:4], 4, device)
        results["transformers"] = [time_hf(hf, prompts, args.output_len, device) for _ in range(args.repeats)]
        del hf
    vllm_times = time_vllm(args.model, prompts, args.output_len, args.dtype, args.repeats)
    if vllm_times:
        results["vllm"] = vllm_times

    report = {
        "device": device_name(device), "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
        "num_prompts": args.num_prompts, "prompt_len": len(prompt), "output_len": args.output_len, "contenders": {},
    }
    print(f"{'engine':<14}{'median s':>10}{'out tok/s':>12}")
    for name, times in results.items():
        median = statistics.median(times)
        report["contenders"][name] = {"seconds": times, "median_seconds": median, "output_tokens_per_s": total_out / median}
        print(f"{name:<14}{median:>10.2f}{total_out / median:>12.1f}")
    if "transformers" in results:
        ratio = statistics.median(results["transformers"]) / statistics.median(results["speedx"])
        report["speedup_vs_transformers"] = ratio
        print(f"speedx / transformers: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
