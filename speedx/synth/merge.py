"""`python -m speedx.generate merge --out DIR SHARD_DIR ...`: join the shards of one run, with dedup
across them. Every shard of the run's --shard k/n must be there (--allow-partial: those at hand)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.pipeline import RunState, summarize
from speedx.synth import exit_codes
from speedx.synth.records import dedup_text, export_sentence_transformers
from speedx.synth.report import merge_costs, print_summary
from speedx.synth.run_files import (LOCK_FILE, atomic_write_json, ensure_writable_dir, lock_run_dir, read_jsonl,
                                   read_manifest)


TOKEN_KEYS = ("prompt_tokens", "cached_tokens", "output_tokens", "revisor_prompt_tokens", "revisor_output_tokens")


def check_shards(shards: list[Path], allow_partial: bool = False) -> tuple[list[dict], list[str]]:
    """The shards' manifests and the run's shards missing from them, after checking that they are
    finished shards of one run: the same settings but --shard, each shard once, none missing unless
    `allow_partial`."""
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
    shard_ids = [m.get("config", {}).get("shard", "0/1") for m in manifests]
    if len(set(shard_ids)) < len(shard_ids):
        raise ValueError(f"two directories hold the same --shard ({', '.join(map(str, shard_ids))})")
    missing = missing_shards(shard_ids)
    if missing and not allow_partial:
        raise ValueError(f"shards {', '.join(missing)} of the run are missing: name their directories too, "
                         "or pass --allow-partial to merge the shards at hand")
    return manifests, missing


def missing_shards(shard_ids: list[str]) -> list[str]:
    """The i/n shards of the run that `shard_ids` (i/n texts of one n, checked when they were made) lack."""
    count = int(shard_ids[0].split("/")[1])
    present = {int(shard.split("/")[0]) for shard in shard_ids}
    return [f"{i}/{count}" for i in range(count) if i not in present]


def merge_runs(shards: list[Path], out: Path, allow_partial: bool = False) -> dict:
    manifests, missing = check_shards(shards, allow_partial)
    not_empty = f"--out {out} is not an empty directory; merge into a new one"
    if out.exists() and not out.is_dir():
        raise ValueError(not_empty)
    ensure_writable_dir(out)
    lock = lock_run_dir(out)  # a second merge into `out` at the same time stops here
    try:
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ValueError(not_empty)
        return write_merged(shards, manifests, missing, out)
    finally:
        lock.close()


def write_merged(shards: list[Path], manifests: list[dict], missing: list[str], out: Path) -> dict:
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
    complete = not missing and all(m["status"] == "complete" for m in manifests)
    manifest = {
        "merged_from": [str(s) for s in shards],
        "configs": [m.get("config") for m in manifests],
        "missing_shards": missing,
        "wall_seconds": sum(m.get("wall_seconds", 0.0) for m in manifests),
        "status": "complete" if complete else "incomplete",
        # each shard made (or read) the tasks itself: their brainstorms all count
        "tasks": {key: sum(m.get("tasks", {}).get(key, 0) for m in manifests)
                  for key in ("requests", "prompt_tokens", "output_tokens")} | {"count": len(tasks)},
        **summarize(RunState.load(out)),
    }
    manifest["cost"] = merge_costs([m["cost"] for m in manifests], manifest["examples"])
    manifest["export"] = export_sentence_transformers(kept, out / "sentence-transformers")
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedx.generate merge", description=__doc__, epilog=exit_codes.HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path, help="shard run directories")
    parser.add_argument("--out", required=True, type=Path, help="new directory for the merged run")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge the shards given even if some of the run's --shard i/n are missing")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad value (2), already printed
        return exc.code
    try:
        manifest = merge_runs(args.shards, args.out, args.allow_partial)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(f"merged {len(args.shards)} shards into {args.out}")
    print_summary(manifest, manifest["configs"][0]["num_examples"])
    return exit_codes.OK if manifest["status"] == "complete" else exit_codes.INCOMPLETE
