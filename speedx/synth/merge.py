"""`python -m speedx.generate merge --out DIR SHARD_DIR ...`: join shard runs with dedup across them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.pipeline import RunState, summarize
from speedx.synth.records import dedup_text, export_sentence_transformers
from speedx.synth.run_files import atomic_write_json, read_jsonl


def merge_runs(shards: list[Path], out: Path) -> dict:
    for shard in shards:
        if not (shard / "manifest.json").is_file():
            raise ValueError(f"{shard} is not a run directory (no manifest.json)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; merge into a new directory")
    examples = sorted((r for s in shards for r in read_jsonl(s / "examples.jsonl")), key=lambda r: (r["slot"], r["id"]))
    rejections = [r for s in shards for r in read_jsonl(s / "rejected.jsonl")]
    tasks = {}
    for shard in shards:
        for task in read_jsonl(shard / "tasks.jsonl"):
            tasks.setdefault(task["id"], task)
    dedup, kept = Deduplicator(), []
    for record in examples:  # the lowest slot wins, as in a single run
        reason = dedup.check_and_add(record["id"], dedup_text(record))
        if reason:
            rejections.append({k: record[k] for k in ("id", "slot", "family", "task_id")} | {
                "reason": f"duplicate_{reason}", "text": json.dumps(record["raw"], ensure_ascii=False), "merged": True})
        else:
            kept.append(record)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("examples.jsonl", kept), ("rejected.jsonl", rejections), ("tasks.jsonl", list(tasks.values()))):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    manifests = [json.loads((s / "manifest.json").read_text()) for s in shards]
    manifest = {
        "merged_from": [str(s) for s in shards],
        "configs": [m.get("config") for m in manifests],
        "wall_seconds": sum(m.get("wall_seconds", 0.0) for m in manifests),
        **summarize(RunState.load(out)),
    }
    manifest["export"] = export_sentence_transformers(kept, out / "sentence-transformers")
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedx.generate merge", description=__doc__)
    parser.add_argument("shards", nargs="+", type=Path, help="shard run directories")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the merged run")
    args = parser.parse_args(argv)
    try:
        manifest = merge_runs(args.shards, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(args.shards)} shards into {args.out}: {manifest['examples']} examples")
    return 0
