"""The body of `python -m speedx.generate` once the arguments are known to be good."""

from __future__ import annotations

import math
import platform
import time
from functools import partial
from pathlib import Path

from speedx.synth.pipeline import Planner, RunState, SynthesisRun, shard_slots, summarize
from speedx.synth.records import export_sentence_transformers
from speedx.synth.report import Progress, cost_report, print_summary
from speedx.synth.run_files import atomic_write_json, atomic_write_jsonl, read_jsonl, read_manifest
from speedx.synth.tasks import Task, brainstorm_tasks

WALL_TIME_EVERY_SECONDS = 2.0  # how often a running synthesis records its wall time in manifest.json


def sampling_factory(temperature: float, top_p: float, max_tokens: int):
    from speedx import SamplingParams

    return partial(SamplingParams, temperature=temperature, top_p=top_p, max_tokens=max_tokens)


def load_or_make_tasks(args, checked, llm) -> tuple[list[Task], dict]:
    if checked["saved_tasks"]:  # read and checked with the arguments
        return checked["saved_tasks"], {"source": "resumed"}
    if checked["tasks"] is not None:
        tasks, stats = checked["tasks"], {"source": "file", "file": args.tasks}
    else:
        num_topics = args.num_topics or max(4, math.ceil(args.num_examples / 4))
        params = sampling_factory(args.temperature, args.top_p, 128)
        tasks, stats = brainstorm_tasks(llm, checked["families"], checked["topics"], num_topics, args.seed,
                                        args.json_mode, params, show_progress=not args.no_progress)
        stats["source"] = "brainstorm"
        missing = {f.name for f in checked["families"]} - {t.family for t in tasks}
        if missing:  # a weak model may fail a family entirely; fall back to that family's example tasks
            from speedx.synth.families import FAMILIES

            for name in sorted(missing):
                for text in FAMILIES[name].example_tasks:
                    tasks.append(Task(f"x{len(tasks)}", name, text, None, "builtin"))
            stats["fallback_families"] = sorted(missing)
    # At once or not at all: a resume plans every request from this file, so it must never be partial.
    atomic_write_jsonl(checked["out"] / "tasks.jsonl", [task.to_json() for task in tasks])
    return tasks, stats


def compile_schemas(llm, families) -> None:
    """Compile every schema of the run up front, so a rejected one stops the run before any file is written."""
    from speedx import SamplingParams
    from speedx.synth.prompts import brainstorm_schema

    schemas = {"brainstorm": brainstorm_schema()} | {f.name: f.json_schema() for f in families}
    for name, schema in schemas.items():
        try:
            llm.engine.structured_outputs.grammar(SamplingParams(json_schema=schema).json_schema_text).result()
        except Exception as exc:  # xgrammar raises assorted types; the run must stop with exit code 2
            raise ValueError(f"the grammar compiler rejected the {name} schema: {exc}") from exc


def run_generate(args, checked) -> dict:
    """Run (or resume) the synthesis; its manifest, whose status is "complete" or "incomplete"."""
    import torch

    import speedx
    from speedx import LLM
    from speedx.engine.config import EngineConfig

    out: Path = checked["out"]
    manifest_path = out / "manifest.json"
    previous = read_manifest(manifest_path)
    start = time.perf_counter()  # the device is held (and paid for) from the model load on
    engine_config = EngineConfig.from_cli_args(args)
    llm = LLM.from_config(engine_config)
    if args.json_mode == "constrained":
        compile_schemas(llm, checked["families"])
    # The settings go on disk before any other file of the run, so that whatever a killed or failed
    # run leaves behind (tasks.jsonl first) is only ever resumed with the same settings.
    manifest = {"config": checked["config"] | {"num_examples": args.num_examples}, "status": "running",
                "wall_seconds": previous.get("wall_seconds", 0.0) + time.perf_counter() - start,
                "tasks": previous.get("tasks")}
    atomic_write_json(manifest_path, manifest)
    tasks, task_stats = load_or_make_tasks(args, checked, llm)
    if task_stats["source"] == "resumed" and previous.get("tasks"):
        task_stats = previous["tasks"]  # keep how they were made (and the brainstorm's tokens)
    revisor = None
    if args.revisor:
        same = (args.revisor, args.revisor_lora) == (args.model, args.lora)
        revisor_llm = llm if same else LLM.from_config(engine_config.replace(model=args.revisor, lora=args.revisor_lora))
        revisor = (revisor_llm, sampling_factory(args.temperature, args.top_p, args.max_tokens))
    planner = Planner(checked["families"], checked["weights"], tasks, args.seed)
    slots = shard_slots(args.num_examples, checked["shard"])
    progress = None if args.no_progress else Progress(len(slots))
    manifest |= {
        "versions": {"speedx": speedx.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(llm.device),
        "tasks": {**task_stats, "count": len(tasks)},
    }

    def record_wall_time(final: bool = False) -> None:
        """The run's device time so far, on disk: a SIGKILLed run still counts the time it spent."""
        now = time.perf_counter()
        if final or now - record_wall_time.last >= WALL_TIME_EVERY_SECONDS:
            manifest["wall_seconds"] = previous.get("wall_seconds", 0.0) + now - start
            atomic_write_json(manifest_path, manifest)
            record_wall_time.last = now

    record_wall_time.last = start
    record_wall_time(final=True)
    run = SynthesisRun(llm, planner, out, slots, args.json_mode, sampling_factory(args.temperature, args.top_p, args.max_tokens),
                       args.max_attempts, args.model, revisor, progress, on_step=record_wall_time)
    if progress:
        progress.start(len(run.state.filled))
    stopped = None  # "interrupted" / "failed": merge must not take such a run as finished
    try:
        run.run()
    except KeyboardInterrupt:
        stopped = "interrupted"
        raise
    except BaseException:
        stopped = "failed"
        raise
    finally:
        if progress:
            progress.close()
        state = RunState.load(out)
        summary = summarize(state)
        manifest.update(summary)
        manifest["attempts"] = {"made": state.num_attempts, "budget": run.budget.total,
                                "per_slot_limit": run.budget.per_slot}
        manifest["empty_slots"] = state.empty_slots_reason(slots, run.budget)
        if run.occupancy is not None:
            manifest["occupancy"] = run.occupancy.report() | {"surplus_attempts": run.surplus}
        manifest["status"] = stopped or ("complete" if summary["examples"] >= len(slots) else "incomplete")
        record_wall_time(final=True)
        manifest["cost"] = cost_report(summary, manifest["wall_seconds"], args, llm.device, manifest["tasks"])
        atomic_write_json(manifest_path, manifest)
    examples = list(read_jsonl(out / "examples.jsonl"))
    manifest["export"] = export_sentence_transformers(examples, out / "sentence-transformers")
    atomic_write_json(manifest_path, manifest)
    print_summary(manifest, len(slots))
    return manifest
