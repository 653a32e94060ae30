"""`python -m speedx.align run [pipeline.toml] [--preset NAME] [--out DIR] [--from STAGE] [--until STAGE]`
and `python -m speedx.align report DIR`.

Runs the SPEED alignment stages (brainstorm, seed, junior_sft, root, judge, senior_dpo, revisions,
revisor_sft, final), each in its own folder with a manifest; finished stages are skipped, so the
same command resumes a killed run without repeating a paid teacher call. `--preset tiny` runs the
whole pipeline on CPU in minutes with the embedded model as student and local teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speedx.align.stages import STAGES
from speedx.synth.run_files import ensure_writable_dir

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speedx.align", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) the pipeline")
    run.add_argument("config", nargs="?", help="pipeline TOML file (see speedx/align/config.py)")
    run.add_argument("--preset", choices=("tiny", "paper"), help="start from a preset; the file overrides it")
    run.add_argument("--out", help="run directory (default: the config's out)")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help=f"re-run from this stage ({', '.join(STAGES)})")
    run.add_argument("--until", dest="until_stage", metavar="STAGE", help="stop after this stage")
    run.add_argument("--max-teacher-calls", type=int, help="hard budget of teacher calls for the whole run")
    report = commands.add_parser("report", help="per-stage calls, tokens, examples and time of a run")
    report.add_argument("out", help="run directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "report":
            from speedx.align.report import main as report_main

            return report_main(args.out)
        from speedx.align.config import load_config
        from speedx.align.pipeline import run_pipeline, stage_range

        if args.config is None and args.preset is None:
            raise ValueError("give a pipeline TOML file or --preset (tiny runs anywhere; paper needs a teacher API)")
        config = load_config(args.config, args.preset, args.out)
        if args.max_teacher_calls is not None:
            if args.max_teacher_calls < 0:
                raise ValueError("--max-teacher-calls must be >= 0")
            config.teacher.max_calls = args.max_teacher_calls
        stage_range(args.from_stage, args.until_stage)  # checked before anything runs
        check_resume(config, args.from_stage)
        ensure_writable_dir(Path(config.out), "out")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run_pipeline(config, args.from_stage, args.until_stage)
    except KeyboardInterrupt:  # finished teacher calls are cached, finished stages kept
        print(f"\ninterrupted: run the same command to resume {config.out}", file=sys.stderr)
        return 130


def check_resume(config, from_stage: str | None) -> None:
    """A run directory resumes with its own settings; --from STAGE redoes that stage and the later
    ones, so it may change them."""
    saved = Path(config.out) / "config.json"
    if from_stage is not None or not saved.is_file():
        return
    from speedx.align.config import changed_settings

    changed = changed_settings(json.loads(saved.read_text()), config)
    if changed:
        raise ValueError(f"{config.out} holds a run made with other settings ({', '.join(changed)}): use the same "
                         "settings to resume, --from STAGE to redo a stage and the later ones with these, or a new out")
