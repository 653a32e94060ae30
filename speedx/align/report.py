"""`speedx align report DIR`: per stage teacher calls and tokens, examples in/out, time, and the
teacher calls per final example next to E5-mistral's and SPEED's budgets."""

from __future__ import annotations

import json
from pathlib import Path

from speedx.align.pipeline import read_manifest
from speedx.align.stages import STAGES

# (teacher calls, final examples) as published
REFERENCE_BUDGETS = {"E5-mistral": (500_000, 500_000), "SPEED": (45_000, 920_415)}


def build_report(out: Path) -> dict:
    rows = []
    for name in STAGES:
        manifest = read_manifest(out, name)
        teacher = manifest.get("teacher") or {}
        stats = manifest.get("stats", {})
        rows.append({
            "stage": name, "status": manifest.get("status", "not run"), "seconds": manifest.get("seconds"),
            "device": manifest.get("device"), "teacher_calls": teacher.get("calls", 0),
            "cached_calls": teacher.get("cached", 0), "prompt_tokens": teacher.get("prompt_tokens", 0),
            "completion_tokens": teacher.get("completion_tokens", 0),
            "examples_in": stats.get("examples_in"), "examples_out": stats.get("examples_out"),
        })
    calls = sum(r["teacher_calls"] for r in rows)
    final = rows[-1]["examples_out"] or 0
    return {
        "out": str(out), "stages": rows, "teacher_calls": calls,
        "teacher_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows), "final_examples": final,
        "calls_per_final_example": calls / final if final else None,
        "reference_calls_per_example": {k: c / n for k, (c, n) in REFERENCE_BUDGETS.items()},
    }


def print_report(report: dict) -> None:
    header = f"{'stage':<12}{'status':<12}{'calls':>7}{'cached':>8}{'prompt tok':>12}{'compl tok':>11}{'in':>7}{'out':>7}{'seconds':>9}"
    print(header)
    print("-" * len(header))
    for r in report["stages"]:
        def num(v):
            return "-" if v is None else str(v)
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        print(f"{r['stage']:<12}{r['status']:<12}{r['teacher_calls']:>7}{r['cached_calls']:>8}{r['prompt_tokens']:>12}"
              f"{r['completion_tokens']:>11}{num(r['examples_in']):>7}{num(r['examples_out']):>7}{secs:>9}")
    per = report["calls_per_final_example"]
    print(f"\nteacher: {report['teacher_calls']} calls, {report['teacher_tokens']} tokens; "
          f"final examples: {report['final_examples']}")
    print("teacher calls per final example: " + ("-" if per is None else f"{per:.3f}") + "  (" + ", ".join(
        f"{name} {value:.3f}" for name, value in report["reference_calls_per_example"].items()) + ")")


def main(out: str) -> int:
    path = Path(out)
    if not (path / "config.json").is_file():  # every run writes it first
        raise ValueError(f"{out} is not an alignment run directory (no config.json)")
    report = build_report(path)
    print_report(report)
    (path / "report.json").write_text(json.dumps(report, indent=2))
    return 0
