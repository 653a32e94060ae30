"""Throughput of the whole synthesis path against the bare engine on the same planned prompts.

The bare engine generates the first attempt of every slot in one batch with the same sampling
settings and JSON schemas (grammar masks are part of the engine). The pipeline then runs the same
slots as `python -m speedx.generate` does, retries and all: prompting, parsing, validation, dedup,
durable writes, and surplus attempts that keep the batch full (also run without them, to compare).
Target: the pipeline's output tokens/s at least 80% of the bare engine's.

    python bench/synthesis.py                   # the default job's shape: 64 slots, 1024 max tokens
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
from speedx.engine.config import EngineConfig
from speedx.synth.families import parse_families, parse_mix
from speedx.synth.pipeline import Planner, SynthesisRun
from speedx.synth.tasks import Task


def bare_engine(llm: LLM, planner: Planner, num_examples: int, params_factory) -> dict:
    requests = [planner.request(slot, 0) for slot in range(num_examples)]
    prompts = [llm.apply_chat_template(r.messages) for r in requests]
    params = [params_factory(seed=r.seed, json_schema=r.family.json_schema()) for r in requests]
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(o.num_output_tokens for o in outs), "requests": len(outs)}


def pipeline(llm: LLM, planner: Planner, num_examples: int, params_factory, max_attempts: int, surplus: bool) -> dict:
    llm.reset_prefix_cache()
    out_dir = Path(tempfile.mkdtemp(prefix="speedx-bench-"))
    try:
        run = SynthesisRun(llm, planner, out_dir, list(range(num_examples)), "constrained", params_factory,
                           max_attempts=max_attempts, model_name="bench", surplus=surplus)
        start = time.perf_counter()
        run.run()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out_dir)
    records = run.state.examples + run.state.rejections
    return {"seconds": seconds, "output_tokens": sum(r["output_tokens"] for r in records),
            "examples": len(run.state.examples), "attempts": len(records), "occupancy": run.occupancy.report()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results/synthesis.json")
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args()

    llm = LLM.from_config(EngineConfig.from_cli_args(args))
    families = parse_families(None, args.model)
    tasks = [Task(f"x{i}", f.name, text) for f in families for i, text in enumerate(f.example_tasks)]
    planner = Planner(families, parse_mix("7:7:7:2", families), tasks, seed=0)
    params_factory = partial(SamplingParams, temperature=args.temperature, max_tokens=args.max_tokens)
    warm = planner.request(0, 0)  # compile the grammars before timing
    llm.generate([llm.apply_chat_template(warm.messages)], params_factory(json_schema=warm.family.json_schema()),
                 use_tqdm=False)
    for family in families:
        llm.engine.structured_outputs.grammar(SamplingParams(json_schema=family.json_schema()).json_schema_text).result()

    results = {
        "engine": bare_engine(llm, planner, args.num_examples, params_factory),
        "pipeline, surplus": pipeline(llm, planner, args.num_examples, params_factory, args.max_attempts, surplus=True),
        "pipeline, no surplus": pipeline(llm, planner, args.num_examples, params_factory, args.max_attempts,
                                         surplus=False),
    }
    print(f"{device_name(str(llm.device))}; {args.num_examples} slots, max {args.max_tokens} tokens")
    print(f"{'path':<22}{'seconds':>9}{'out tok/s':>11}{'examples':>10}{'attempts':>10}{'occupancy':>11}")
    engine_rate = results["engine"]["output_tokens"] / results["engine"]["seconds"]
    for name, r in results.items():
        r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
        occupancy = r.get("occupancy", {}).get("mean")
        print(f"{name:<22}{r['seconds']:>9.1f}{r['output_tokens_per_s']:>11.1f}{r.get('examples', '-'):>10}"
              f"{r.get('attempts', r.get('requests')):>10}{'-' if occupancy is None else f'{occupancy:.0%}':>11}")
        if name != "engine":
            r["share_of_engine_rate"] = r["output_tokens_per_s"] / engine_rate
            tenths = " ".join("-" if f is None else f"{f:.0%}" for f in r["occupancy"]["by_tenth_of_time"])
            print(f"  {r['share_of_engine_rate']:.0%} of the bare engine's tok/s (target >= 80%); "
                  f"occupancy by tenth of the run: {tenths}")
    report = {"device": device_name(str(llm.device)), "model": args.model, "num_examples": args.num_examples,
              "max_tokens": args.max_tokens, "max_attempts": args.max_attempts, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
