"""`python -m speedx.generate merge --out DIR SHARD_DIR ...`: join shard runs with dedup across them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.pipeline import RunState, summarize
from speedx.synth.records import dedup_text, export_sentence_transformers
from speedx.synth.run_files import (LOCK_FILE, atomic_write_json, ensure_writable_dir, lock_run_dir, read_jsonl,
                                   read_manifest)


TOKEN_KEYS = ("prompt_tokens", "cached_tokens", "output_tokens", "revisor_prompt_tokens", "revisor_output_tokens")


def check_shards(shards: list[Path]) -> list[dict]:
    """The shards' manifests, after checking that they are the finished shards of one run: the same
    settings but --shard, each shard once."""
    if len({s.resolve() for s in shards}) < len(shards):
        raise ValueError("a run directory is named twice; give each shard once")
    manifests = []
    for shard in shards:
        if not (shard / "manifest.json").is_file():
            raise ValueError(f"{shard} is not a run directory (no manifest.json)")
        manifest = read_manifest(shard / "manifest.json")
        # "incomplete" is a run that ended with slots out of --max-attempts; "running" (or none) is one
        # that is still going or was killed, "interrupted" one stopped by Ctrl-C, "failed" one that crashed.
        status = manifest.get("status")
        if status not in ("complete", "incomplete"):
            raise ValueError(f"{shard} is not finished (status {status or 'missing'} in its manifest.json): "
                             "resume it (re-run its command) before merging")
        manifests.append(manifest)
    configs = [{k: v for k, v in m.get("config", {}).items() if k != "shard"} for m in manifests]
    for shard, config in zip(shards[1:], configs[1:]):
        # a key one manifest lacks was not recorded by an older version: not a difference
        changed = sorted(k for k in config.keys() & configs[0].keys() if config[k] != configs[0][k])
        if changed:
            raise ValueError(f"{shard} was made with other settings than {shards[0]} ({', '.join(changed)}): "
                             "merge the shards of one run")
    shard_ids = [m.get("config", {}).get("shard") for m in manifests]
    if len(set(shard_ids)) < len(shard_ids):
        raise ValueError(f"two directories hold the same --shard ({', '.join(map(str, shard_ids))})")
    return manifests


def merge_runs(shards: list[Path], out: Path) -> dict:
    manifests = check_shards(shards)
    not_empty = f"--out {out} is not an empty directory; merge into a new one"
    if out.exists() and not out.is_dir():
        raise ValueError(not_empty)
    ensure_writable_dir(out)
    lock = lock_run_dir(out)  # a second merge into `out` at the same time stops here
    try:
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ValueError(not_empty)
        return write_merged(shards, manifests, out)
    finally:
        lock.close()


def write_merged(shards: list[Path], manifests: list[dict], out: Path) -> dict:
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
                "reason": f"duplicate_{reason}", "text": json.dumps(record["raw"], ensure_ascii=False), "merged": True,
            } | {k: record[k] for k in TOKEN_KEYS if k in record})  # its tokens were spent all the same
        else:
            kept.append(record)
    for name, rows in (("examples.jsonl", kept), ("rejected.jsonl", rejections), ("tasks.jsonl", list(tasks.values()))):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    manifest = {
        "merged_from": [str(s) for s in shards],
        "configs": [m.get("config") for m in manifests],
        "wall_seconds": sum(m.get("wall_seconds", 0.0) for m in manifests),
        "status": "complete" if all(m["status"] == "complete" for m in manifests) else "incomplete",
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
