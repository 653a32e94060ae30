"""Output tokens/s of speedx next to Hugging Face `transformers.generate` (and vLLM if installed).

Same model weights, dtype, prompts and forced output length for every contender; medians over
repeats; JSON out. Workloads:
  chat   (default; the engine-core target) copies of one chat prompt of --prompt-len tokens;
  random nano-vllm's: random token ids, input and output lengths drawn from [100, 1024]
         (--min-len/--max-len), EOS ignored; transformers is skipped (it would pad every prompt);
  fixed  random token ids, exactly --prompt-len in and --output-len out (the 1024/1024 grid).
On CUDA it also prints the roofline fraction: a lower bound on the run's time (every decode step
reads all weights once, every output token reads its context's KV once, prefill at peak bf16
FLOP/s, all at the measured copy bandwidth / matmul rate) over the measured time.

    python bench/throughput.py                       # default workload
    python bench/throughput.py --num-prompts 256 --output-len 256 --repeats 5 --skip-hf
    python bench/throughput.py --model DIR --workload random --num-prompts 1000 --skip-hf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from speedx import LLM, SamplingParams
from speedx.engine.config import EngineConfig
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


def random_prompts(num: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths[:num]]


def make_workload(args, llm: LLM) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) of args.workload: chat, random (nano-vllm's) or fixed."""
    n, vocab = args.num_prompts, llm.engine.vocab_size
    if args.workload == "random":
        rng = random.Random(1)
        prompt_lens = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
        output_lens = [rng.randint(args.min_len, args.max_len) for _ in range(n)]
        return random_prompts(n, prompt_lens, vocab), output_lens
    if args.workload == "chat":
        return [chat_prompt(llm, args.prompt_len)] * n, [args.output_len] * n
    return random_prompts(n, [args.prompt_len] * n, vocab), [args.output_len] * n


def time_speedx(llm: LLM, prompts, output_lens: list[int], temperature=0.0, top_p=1.0) -> tuple[float, int]:
    """Seconds and engine steps for one run."""
    llm.reset_prefix_cache()  # sharing within a run counts; carry-over between repeats does not
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=n, ignore_eos=True) for n in output_lens]
    steps = 0
    step = llm.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counted_step
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    llm.engine.step = step
    assert [len(o.outputs[0].token_ids) for o in outputs] == list(output_lens)
    return elapsed, steps


def roofline_seconds(llm: LLM, prompts, output_lens, steps: int) -> dict:
    """Lower bound on a run's GPU time from measured bandwidth and matmul rate (see the docstring)."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    import triton.testing

    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
    mm_ms = triton.testing.do_bench(lambda: a @ a)
    bandwidth = 2 * n / (copy_ms * 1e-3)  # bytes read + written per second
    flops = 2 * 8192**3 / (mm_ms * 1e-3)
    model = llm.engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    kv_per_token = llm.engine.runner.kv_bytes_per_token(model.config, llm.kv_cache_dtype)
    kv_bytes = sum(kv_per_token * (len(p) * o + o * (o + 1) // 2) for p, o in zip(prompts, output_lens))
    prefill_tokens = sum(len(p) for p in prompts)
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    seconds = (steps * weight_bytes + kv_bytes) / bandwidth + 2 * params * prefill_tokens / flops
    return {"seconds": seconds, "copy_GB_per_s": bandwidth / 1e9, "bf16_TFLOP_per_s": flops / 1e12, "steps": steps}


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
    parser.add_argument("--workload", choices=["chat", "random", "fixed"], default="chat")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=80)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=100, help="random workload: shortest input/output")
    parser.add_argument("--max-len", type=int, default=1024, help="random workload: longest input/output")
    parser.add_argument("--hf-num-prompts", type=int, default=0, help="time transformers on this many prompts (0: all)")
    parser.add_argument("--temperature", type=float, default=0.0, help="speedx only (transformers stays greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="speedx only")
    parser.add_argument("--profile", metavar="FILE", help="also write a cProfile (host time) of one more speedx run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="bench/results/throughput.json")
    EngineConfig.add_cli_args(parser, defaults={"dtype": "bfloat16"})
    args = parser.parse_args()

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    device, async_scheduling, llm_config = str(llm.device), llm.engine.async_scheduling, llm.config.as_dict()
    dtype = llm.dtype
    prompts, output_lens = make_workload(args, llm)
    total_out = sum(output_lens)
    print(f"{args.workload}: {args.num_prompts} prompts, {sum(map(len, prompts))} tokens in, {total_out} out, "
          f"{args.dtype} (quantization {args.quantization}) on {device_name(device)}")

    time_speedx(llm, prompts, [4] * len(prompts))  # warm-up: every prefill shape of the run, compiled once
    runs = [time_speedx(llm, prompts, output_lens, args.temperature, args.top_p) for _ in range(args.repeats)]
    results = {"speedx": [seconds for seconds, _ in runs]}
    if args.profile:
        import cProfile
        import io
        import pstats

        with cProfile.Profile() as profiler:
            time_speedx(llm, prompts, output_lens, args.temperature, args.top_p)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        Path(args.profile).write_text(text.getvalue())
    roofline = roofline_seconds(llm, prompts, output_lens, runs[0][1]) if device.startswith("cuda") else None
    del llm
    if args.workload == "random":
        args.skip_hf = True  # per-prompt lengths: transformers would pad every prompt and output
    if not args.skip_hf:
        hf_prompts = prompts[: args.hf_num_prompts or None]
        hf = hf_model_like(args.model, dtype, device)
        time_hf(hf, hf_prompts[:4], 4, device)
        # speedx's time for the same subset is scaled by token count: tok/s is what is compared.
        results["transformers"] = [time_hf(hf, hf_prompts, args.output_len, device) * len(prompts) / len(hf_prompts)
                                   for _ in range(args.repeats)]
        del hf
    vllm_times = time_vllm(args.model, prompts, args.output_len, str(dtype).removeprefix("torch."), args.repeats)
    if vllm_times:
        results["vllm"] = vllm_times

    report = {
        "device": device_name(device), "torch": torch.__version__, "model": args.model, "dtype": str(dtype).removeprefix("torch."),
        "workload": args.workload, "num_prompts": args.num_prompts, "input_tokens": sum(map(len, prompts)),
        "output_tokens": total_out, "temperature": args.temperature, "top_p": args.top_p, "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization, "cuda_graphs": not args.enforce_eager,
        "async_scheduling": async_scheduling, "engine_config": llm_config, "contenders": {},
    }
    print(f"{'engine':<14}{'median s':>10}{'out tok/s':>12}")
    for name, times in results.items():
        median = statistics.median(times)
        report["contenders"][name] = {"seconds": times, "median_seconds": median, "output_tokens_per_s": total_out / median}
        print(f"{name:<14}{median:>10.2f}{total_out / median:>12.1f}")
    if roofline:
        fraction = roofline["seconds"] / statistics.median(results["speedx"])
        report["roofline"] = {**roofline, "fraction": fraction}
        print(f"roofline: {roofline['seconds']:.2f} s lower bound ({roofline['steps']} steps) = {fraction:.0%} of speedx's time")
    if "transformers" in results:
        ratio = statistics.median(results["transformers"]) / statistics.median(results["speedx"])
        report["speedup_vs_transformers"] = ratio
        print(f"speedx / transformers: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
