"""Run the stages in order; a stage whose manifest says complete is skipped, so a killed run resumes.

Teacher calls go through one cached, budgeted client for the whole run (cache and usage live in the
run directory), so a resumed stage replays its finished calls from the cache at no cost.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

from speedx.align.config import AlignConfig
from speedx.align.stages import STAGE_FUNCTIONS, STAGES, TEACHER_STAGES, BudgetReached, Context, TeacherUnusable
from speedx.synth.run_files import atomic_write_json

EXIT_FAILED = 1
EXIT_BUDGET = 3


def stage_range(from_stage: str | None, until_stage: str | None) -> list[str]:
    for name in (from_stage, until_stage):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    first = STAGES.index(from_stage) if from_stage else 0
    last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
    if first > last:
        raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
    return list(STAGES[first : last + 1])


def read_manifest(out: Path, stage: str) -> dict:
    path = out / stage / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def open_teacher(config: AlignConfig, out: Path, stack: ExitStack):
    from speedx.align.teacher import TeacherClient, TeacherConfig

    base_url, identity = config.teacher.base_url, None
    if base_url == "local":  # the local model answers as the teacher, through the real HTTP path
        from speedx.serving import start_server

        server = stack.enter_context(start_server(config.teacher.local_model, served_model_name=config.teacher.model,
                                                   seed=config.seed))
        base_url, identity = server.url, f"local:{config.teacher.local_model}"  # (a new port every run)
    return stack.enter_context(TeacherClient(TeacherConfig(
        cache_identity=identity,
        base_url=base_url, model=config.teacher.model, api_key=os.environ.get(config.teacher.api_key_env),
        max_concurrency=config.teacher.concurrency, max_calls=config.teacher.max_calls, cache_dir=out / "teacher_cache",
        usage_file=out / "teacher_usage.json",  # merged now, rewritten after every paid call
    )))


def run_pipeline(config: AlignConfig, from_stage: str | None = None, until_stage: str | None = None, log=print) -> int:
    """Exit status: 0 when every selected stage is complete, EXIT_BUDGET when the teacher budget ran out."""
    import torch

    stages = stage_range(from_stage, until_stage)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.to_dict())
    ctx = Context(config, out)
    with ExitStack() as stack:
        for name in stages:
            # --from STAGE redoes that stage and every one after it: they are built on its output.
            if read_manifest(out, name).get("status") == "complete" and from_stage is None:
                log(f"[{name}] complete, skipped")
                continue
            if name in TEACHER_STAGES and ctx.teacher is None:
                ctx.teacher = open_teacher(config, out, stack)
            log(f"[{name}] running")
            previous = read_manifest(out, name)  # an interrupted attempt's time still counts
            carried = previous.get("seconds", 0.0) if previous.get("status") != "complete" else 0.0
            start = time.perf_counter()

            def write_manifest(status: str, stats: dict) -> dict:
                manifest = {
                    "stage": name, "status": status, "stats": stats,
                    "seconds": carried + time.perf_counter() - start,
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
                }
                if ctx.teacher is not None:
                    ctx.teacher.save_usage()  # the stage's failed and cached counts too
                    manifest["teacher"] = ctx.teacher.usage()["stages"].get(name)
                atomic_write_json(ctx.dir(name) / "manifest.json", manifest)
                return manifest

            try:
                stats = STAGE_FUNCTIONS[name](ctx)
                status = "complete"
            except BudgetReached as exc:
                stats, status = {"error": str(exc)}, "incomplete"
            except (ValueError, FileNotFoundError, TeacherUnusable) as exc:  # no usable data: say so, no traceback
                stats, status = {"error": str(exc)}, "failed"
            except KeyboardInterrupt:
                write_manifest("interrupted", {})  # its time still counts when it is resumed
                raise
            manifest = write_manifest(status, stats)
            log(f"[{name}] {status} in {manifest['seconds']:.1f} s: {json.dumps(stats)}")
            if status == "incomplete":
                log(f"stopped: {stats['error']}. Finished calls are cached; raise teacher.max_calls "
                    "(or --max-teacher-calls) and run again to resume.")
                return EXIT_BUDGET
            if status == "failed":
                log(f"error: stage {name} failed: {stats['error']}")
                return EXIT_FAILED
    return 0
