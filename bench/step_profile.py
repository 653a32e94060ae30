"""Where a generation run's time goes, step by step: device span vs host time, by step kind.

Three phases (--phases; default run,kernels,steps on CUDA and steps on a CPU):

steps: decode steps at fixed batch sizes (--batch-sizes, default 1 and 64): each step's wall time,
split on a CPU into the C++ kernels (every speedx._C kernel call timed) and the host's Python/PyTorch
work around them, then the host's top costs per step under cProfile (which inflates Python costs,
so read it for ranking, not for totals).

    python bench/step_profile.py                    # the default model on this CPU, B=1 and B=64

run and kernels: one throughput workload (see throughput.py) with every engine step timed twice:
host wall time, and the device span from the step's inputs being staged to its tokens being sampled (CUDA events).
Per kind of step (pure decode on a CUDA graph, or mixed/prefill) it prints the steps, their mean
batch, the share of the run, the host time outside the device span, and how close the device span
comes to its floor (decode: weights + KV bytes at the measured copy bandwidth; mixed: matmul FLOPs at
the measured bf16 rate). Then it profiles a few eager decode steps and one prefill step with
torch.profiler and lists the kernels that take the device time.

    python bench/step_profile.py --model /tmp/speedx-llama3-8b-random --workload fixed \\
        --num-prompts 256 --prompt-len 1024 --output-len 1024 --max-num-batched-tokens 8192
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import time
from pathlib import Path

import torch

from speedx import LLM, SamplingParams
from speedx.engine.config import EngineConfig
from throughput import chat_prompt, device_name, make_workload

# speedx._C functions that are no step's arithmetic; every other function of _C counts as a kernel.
NOT_KERNELS = {"cpu_isa", "gemm_isa", "packed_weight_size"}


class HostEvent:
    """torch.cuda.Event's record/elapsed_time on the host clock, so the script also runs on CPU."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3


def event():
    return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else HostEvent()


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_ceilings() -> tuple[float, float]:
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s) on this device (NaN on CPU)."""
    if not torch.cuda.is_available():
        return float("nan"), float("nan")
    import triton.testing

    n = 1 << 28
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    mm_ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    return 2 * n / (copy_ms * 1e-3), 2 * 8192**3 / (mm_ms * 1e-3)


class StepTimer:
    """Wraps the engine's step and the runner's prepare/launch to time every step (the end event is
    recorded after all of a step's device work is queued, so it closes the step's device span)."""

    def __init__(self, llm: LLM):
        self.engine, self.runner = llm.engine, llm.engine.runner
        self.records: list[dict] = []
        self._current: dict = {}
        prepare, launch, step = self.runner._prepare, self.runner.launch, self.engine.step

        def timed_prepare(batch, follows=None):
            out = prepare(batch, follows)
            seqs, counts = batch.sequences, batch.num_new_tokens
            decode = sum(1 for s, n in zip(seqs, counts) if n == 1 and s.num_computed_tokens == s.num_tokens - 1)
            self._current.update(
                seqs=len(seqs), tokens=sum(counts), decode=decode,
                kv_tokens=sum(s.num_computed_tokens + n for s, n in zip(seqs, counts)),
                start=event(),
            )
            self._current["start"].record()
            return out

        def timed_launch(batch, follows=None):
            out = launch(batch, follows)
            self._current["end"] = event()
            self._current["end"].record()
            return out

        def timed_step():
            self._current = {}
            start = time.perf_counter()
            outputs, stats = step()
            synchronize()
            if "end" in self._current:
                c = self._current
                kind = "decode" if c["decode"] == c["seqs"] and c["tokens"] == c["seqs"] else "mixed"
                self.records.append(dict(kind=kind, seqs=c["seqs"], tokens=c["tokens"], kv_tokens=c["kv_tokens"],
                                         wall=time.perf_counter() - start, span=c["start"].elapsed_time(c["end"]) / 1e3,
                                         preempted=stats.num_preempted))
            return outputs, stats

        self.runner._prepare, self.runner.launch, self.engine.step = timed_prepare, timed_launch, timed_step


def summarize(records, total_seconds, weight_bytes, kv_per_token, params, bandwidth, flops) -> list[dict]:
    rows = []
    for kind in ("decode", "mixed"):
        steps = [r for r in records if r["kind"] == kind]
        if not steps:
            continue
        wall, span = sum(r["wall"] for r in steps), sum(r["span"] for r in steps)
        if kind == "decode":
            floor = sum(weight_bytes + r["kv_tokens"] * kv_per_token for r in steps) / bandwidth
        else:
            floor = sum(2 * params * r["tokens"] for r in steps) / flops
        rows.append(dict(kind=kind, steps=len(steps), mean_seqs=sum(r["seqs"] for r in steps) / len(steps),
                         tokens=sum(r["tokens"] for r in steps), wall_s=wall, share_of_run=wall / total_seconds,
                         host_outside_span_s=wall - span, span_s=span, floor_s=floor, floor_over_span=floor / span))
    return rows


def kernel_tables(llm: LLM, prompts, decode_steps: int) -> tuple[str, str]:
    """torch.profiler tables of one prefill step and of `decode_steps` eager decode steps at full batch."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    runner, engine = llm.engine.runner, llm.engine
    graphs, runner.decode_graphs = runner.decode_graphs, None  # eager: every kernel shows up by name
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{i}", p, SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True))
    with profile(activities=activities) as prefill:
        engine.step()
        synchronize()
    while engine.has_unfinished_requests() and engine.step()[1].num_prefill_tokens:
        pass
    with profile(activities=activities) as decode:
        for _ in range(decode_steps):
            engine.step()
        synchronize()
    engine.abort_all()
    runner.decode_graphs = graphs
    return tuple(p.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70) for p in (prefill, decode))


class KernelTimer:
    """Times every call of a speedx._C kernel while on, in wall time and in this thread's CPU time: it
    replaces them in speedx._C with timed wrappers (callers look them up there at each call), so it
    must be installed before the model is built."""

    def __init__(self):
        from speedx import _C

        self.names = [name for name, f in vars(_C).items()
                      if callable(f) and not isinstance(f, type) and not name.startswith("_") and name not in NOT_KERNELS]
        self.on = False
        self.reset()
        for name in self.names:
            setattr(_C, name, self._timed(name, getattr(_C, name)))

    def _timed(self, name, kernel):
        @functools.wraps(kernel)
        def timed(*args, **kwargs):
            if not self.on:
                return kernel(*args, **kwargs)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return kernel(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - wall
                self.thread_seconds += time.thread_time() - cpu
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.names, 0.0)
        self.thread_seconds = 0.0  # the calling thread's CPU time inside kernels
        self.calls = dict.fromkeys(self.names, 0)


def start_decoding(llm: LLM, prompt: list[int], batch: int) -> None:
    """`batch` greedy requests of `prompt`, stepped until every one is decoding one token a step."""
    engine = llm.engine
    engine.reset_prefix_cache()
    for i in range(batch):
        engine.add_request(f"steps-{batch}-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True))
    while engine.step()[1].num_prefill_tokens:
        pass
    for _ in range(3):  # warm-up
        engine.step()


def time_decode_steps(llm: LLM, timer: KernelTimer | None, steps: int) -> dict:
    """Per-step medians over `steps` decode steps (and the fastest step: on a shared machine, the
    nearest to an idle one): wall time, and with a timer the kernels' share and
    the host's CPU time (this thread's CPU time outside the kernels: unlike wall time, it does not
    grow while other processes hold the cores)."""
    walls, kernel_walls, host_cpus, per_kernel = [], [], [], {name: [] for name in timer.names} if timer else {}
    for _ in range(steps):
        if timer:
            timer.reset()
            timer.on = True
        start, start_cpu = time.perf_counter(), time.thread_time()
        _, stats = llm.engine.step()
        walls.append(time.perf_counter() - start)
        step_cpu = time.thread_time() - start_cpu
        assert stats.num_prefill_tokens == 0, "a decode-step profile must not prefill"
        if timer:
            timer.on = False
            kernel_walls.append(sum(timer.seconds.values()))
            host_cpus.append(step_cpu - timer.thread_seconds)
            for name in timer.names:
                per_kernel[name].append((timer.seconds[name], timer.calls[name]))
    row = {"wall_ms": 1e3 * statistics.median(walls), "wall_min_ms": 1e3 * min(walls)}
    if timer:
        row["kernels_ms"] = 1e3 * statistics.median(kernel_walls)
        row["host_ms"] = 1e3 * statistics.median(w - k for w, k in zip(walls, kernel_walls))
        row["host_cpu_ms"] = 1e3 * statistics.median(host_cpus)
        row["per_kernel"] = {name: {"ms": 1e3 * statistics.median(s for s, _ in v), "calls": v[0][1]}
                             for name, v in per_kernel.items() if v and v[0][1]}
    return row


def host_costs(llm: LLM, timer: KernelTimer | None, steps: int, top: int) -> list[dict]:
    """The functions with the most own time (cProfile tottime) per decode step, kernels left out."""
    kernels = set(timer.names) if timer else set()
    with cProfile.Profile() as profiler:
        for _ in range(steps):
            llm.engine.step()
    stats = pstats.Stats(profiler).stats
    rows = []
    for (file, line, name), (_, calls, own, _, _) in stats.items():
        if name == "timed" or any(name.endswith(f".{k}>") for k in kernels):  # '<built-in method speedx._C.rms_norm>'
            continue
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        rows.append({"function": where, "calls_per_step": calls / steps, "us_per_step": 1e6 * own / steps})
    return sorted(rows, key=lambda r: -r["us_per_step"])[:top]


def decode_step_profiles(llm: LLM, timer: KernelTimer | None, batch_sizes: list[int], prompt_len: int, steps: int,
                         top: int) -> list[dict]:
    """For each batch size: decode-step wall time (untimed kernels), the same steps with the
    kernels timed (wall = kernels + host), and the top host costs."""
    prompt = chat_prompt(llm, prompt_len)
    results = []
    for batch in batch_sizes:
        start_decoding(llm, prompt, batch)
        plain = time_decode_steps(llm, None, steps)
        timed = time_decode_steps(llm, timer, steps) if timer else {}
        costs = host_costs(llm, timer, max(4, steps // 4), top)
        llm.engine.abort_all()
        results.append({"batch": batch, "prompt_tokens": len(prompt), "wall_ms": plain["wall_ms"],
                        "wall_min_ms": plain["wall_min_ms"], "timed": timed, "host_costs": costs})
    return results


def print_decode_step_profiles(results: list[dict]) -> None:
    for r in results:
        b, t = r["batch"], r["timed"]
        print(f"\ndecode step, B={b} ({r['prompt_tokens']}-token prompt): {r['wall_ms']:.2f} ms wall = "
              f"{b / r['wall_ms'] * 1e3:.1f} tok/s (fastest step {r['wall_min_ms']:.2f} ms)")
        if t:
            print(f"  with the kernels timed: {t['wall_ms']:.2f} ms = C++ kernels {t['kernels_ms']:.2f} ms "
                  f"({t['kernels_ms'] / t['wall_ms']:.0%}) + host {t['host_ms']:.2f} ms (host CPU time "
                  f"{t['host_cpu_ms']:.2f} ms)")
            for name, k in sorted(t["per_kernel"].items(), key=lambda kv: -kv[1]["ms"]):
                print(f"    {name:<24}{k['calls']:>5} calls {k['ms']:>8.2f} ms")
        print("  top host costs per step under cProfile (inflated):")
        for c in r["host_costs"]:
            print(f"    {c['us_per_step']:>8.0f} us {c['calls_per_step']:>7.0f} calls  {c['function']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default=None,
                        help="comma list of run, kernels, steps (default: run,kernels,steps on CUDA, steps on a CPU)")
    parser.add_argument("--batch-sizes", default="1,64", help="steps phase: decode batch sizes")
    parser.add_argument("--steps", type=int, default=40, help="steps phase: decode steps timed per batch size")
    parser.add_argument("--step-prompt-len", type=int, default=80, help="steps phase: chat prompt tokens")
    parser.add_argument("--top", type=int, default=15, help="steps phase: host costs listed")
    parser.add_argument("--workload", choices=["random", "fixed"], default="fixed")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--profile-steps", type=int, default=8, help="eager decode steps under torch.profiler (0: none)")
    parser.add_argument("--out", default="bench/results/step_profile.json")
    # Steps one at a time (no async scheduling): each step's span is its own.
    EngineConfig.add_cli_args(parser, defaults={"dtype": "bfloat16", "max_num_batched_tokens": 8192,
                                                "async_scheduling": False})
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    phases = set((args.phases or ("run,kernels,steps" if cuda else "steps")).split(","))
    if phases - {"run", "kernels", "steps"}:
        raise SystemExit(f"--phases: unknown {sorted(phases - {'run', 'kernels', 'steps'})}; expected run, kernels, steps")

    timer = KernelTimer() if "steps" in phases and not cuda else None  # before the model is built
    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    device = device_name("cuda" if cuda else "cpu")
    report = {"device": device, "args": vars(args)}
    if "steps" in phases:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        report["decode_steps"] = decode_step_profiles(llm, timer, batch_sizes, args.step_prompt_len, args.steps, args.top)
        print(f"decode steps of {args.model} in {args.dtype} (quantization {args.quantization}) on {device}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print_decode_step_profiles(report["decode_steps"])
    if phases & {"run", "kernels"}:
        prompts, output_lens = make_workload(args, llm)
    if "run" in phases:
        report.update(workload_run(llm, args, prompts, output_lens, device))
    if "kernels" in phases and args.profile_steps:
        prefill_table, decode_table = kernel_tables(llm, prompts[: args.max_num_seqs], args.profile_steps)
        print(f"\none prefill step:\n{prefill_table}\n{args.profile_steps} eager decode steps:\n{decode_table}")
        report.update(prefill_kernels=prefill_table, decode_kernels=decode_table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


def workload_run(llm: LLM, args, prompts, output_lens, device: str) -> dict:
    """The whole workload with every step timed; prints and returns the per-kind summary."""
    bandwidth, flops = measure_ceilings()
    model = llm.engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_per_token = llm.engine.runner.kv_bytes_per_token(model.config, llm.kv_cache_dtype)

    llm.generate(prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    timer = StepTimer(llm)
    start = time.perf_counter()
    llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in output_lens], use_tqdm=False)
    total = time.perf_counter() - start
    rows = summarize(timer.records, total, weight_bytes, kv_per_token, params, bandwidth, flops)

    print(f"\n{args.workload}: {args.num_prompts} prompts, {sum(output_lens)} tokens out in {total:.1f} s = "
          f"{sum(output_lens) / total:.0f} tok/s on {device}; KV cache "
          f"{llm.engine.stats().kv_cache_blocks * llm.engine.stats().block_size} tokens; preempted "
          f"{sum(r['preempted'] for r in timer.records)}; copy {bandwidth / 1e12:.2f} TB/s, bf16 {flops / 1e12:.0f} TFLOP/s")
    print(f"{'kind':<8}{'steps':>7}{'seqs':>7}{'wall s':>9}{'share':>7}{'host s':>8}{'span s':>8}{'floor s':>9}{'floor/span':>11}")
    for r in rows:
        print(f"{r['kind']:<8}{r['steps']:>7}{r['mean_seqs']:>7.0f}{r['wall_s']:>9.2f}{r['share_of_run']:>7.0%}"
              f"{r['host_outside_span_s']:>8.2f}{r['span_s']:>8.2f}{r['floor_s']:>9.2f}{r['floor_over_span']:>11.0%}")
    return {"seconds": total, "rows": rows, "steps": timer.records}

if __name__ == "__main__":
    main()
