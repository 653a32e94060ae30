"""Throughput of the whole synthesis path against the bare engine on the same prompts.

The bare engine generates the planned prompts with the same sampling settings and JSON schemas
(grammar masks are part of the engine); the pipeline run adds prompting, parsing, validation,
dedup and durable writing. Target: the pipeline costs at most 10% of the engine's output tokens/s.

    python bench/synthesis.py --num-examples 32 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

from throughput import device_name

from speedx import LLM, SamplingParams
from speedx.synth.families import parse_families, parse_mix
from speedx.synth.pipeline import Planner, SynthesisRun
from speedx.synth.tasks import Task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-examples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/synthesis.json")
    args = parser.parse_args()

    llm = LLM(args.model)
    families = parse_families(None)
    tasks = [Task(f"x{i}", f.name, text) for f in families for i, text in enumerate(f.example_tasks)]
    planner = Planner(families, parse_mix("7:7:7:2", families), tasks, seed=0)
    requests = [planner.request(slot, 0) for slot in range(args.num_examples)]
    params_factory = partial(SamplingParams, temperature=args.temperature, max_tokens=args.max_tokens)
    prompts = [llm.apply_chat_template(r.messages) for r in requests]
    params = [params_factory(seed=r.seed, json_schema=r.family.json_schema()) for r in requests]
    llm.generate(prompts[:2], [p for p in params[:2]], use_tqdm=False)  # warm-up: compile the grammars

    results = {"engine": [], "pipeline": []}
    for _ in range(args.repeats):
        llm.engine.pool.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        results["engine"].append((time.perf_counter() - start, sum(o.num_output_tokens for o in outs), len(outs)))

        llm.engine.pool.reset_prefix_cache()
        out_dir = Path(tempfile.mkdtemp(prefix="speedx-bench-"))
        run = SynthesisRun(llm, planner, out_dir, list(range(args.num_examples)), "constrained", params_factory,
                           max_attempts=1, model_name=args.model)
        start = time.perf_counter()
        run.run()
        elapsed = time.perf_counter() - start
        records = run.state.examples + run.state.rejections
        results["pipeline"].append((elapsed, sum(r["output_tokens"] for r in records), len(run.state.examples)))
        shutil.rmtree(out_dir)

    report = {"device": device_name(str(llm.device)), "model": args.model, "num_requests": args.num_examples,
              "max_tokens": args.max_tokens, "runs": results}
    print(f"{'path':<10}{'seconds':>9}{'out tok/s':>11}{'examples/s':>12}")
    rates = {}
    for name, runs in results.items():
        best = min(runs, key=lambda r: r[0] / max(r[1], 1))
        seconds, tokens, examples = best
        rates[name] = tokens / seconds
        report[name] = {"seconds": seconds, "output_tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds}
        print(f"{name:<10}{seconds:>9.2f}{tokens / seconds:>11.1f}{examples / seconds:>12.2f}")
    overhead = 1 - rates["pipeline"] / rates["engine"]
    report["pipeline_overhead"] = overhead
    print(f"pipeline overhead vs bare engine: {overhead:.1%} of output tokens/s (target <= 10%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
