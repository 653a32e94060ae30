"""`python -m speedx.generate`: write validated, deduplicated embedding training data.

With no arguments it runs the embedded default model on tasks brainstormed from the built-in
topic taxonomy and writes 64 examples under ./speedx-out/. Re-running with the same arguments
resumes a killed run; `--shard i/n` splits the work; `python -m speedx.generate merge` joins shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from speedx.cli_types import non_empty, number
from speedx.engine.config import EngineConfig
from speedx.synth import exit_codes
from speedx.synth.families import DEFAULT_MIX, parse_families, parse_mix

# Settings that must match for a re-run to resume a run directory (num_examples may grow). The
# dtypes and the quantization change the logits and so the sampled text; manifests from before they were recorded lack them.
RESUME_KEYS = ("model", "lora", "families", "mix", "seed", "temperature", "top_p", "max_tokens", "tasks", "topics",
               "num_topics", "revisor", "revisor_lora", "json_mode", "shard", "dtype", "kv_cache_dtype", "quantization",
               "tokenizer")
PATH_KEYS = ("model", "lora", "tasks", "topics", "revisor", "revisor_lora", "tokenizer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m speedx.generate", description=__doc__, epilog=exit_codes.HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model, path = non_empty("'default', a HF directory or a .gguf file"), non_empty("a path")
    price, count = number(float, at_least=0), number(int, at_least=1)
    p.add_argument("--families", type=non_empty("a comma list of families"), default=None,
                   help="comma list of retrieval, classification, sts, short_short, long_long, bitext "
                   "(default: all but bitext; for --model default also not long_long, whose 300-word texts "
                   "the 135M model cannot write)")
    p.add_argument("--mix", default=DEFAULT_MIX, help="family weights: classification:sts:retrieval:matching "
                   "(default 7:7:7:2, the paper's) or name=weight pairs")
    p.add_argument("--num-examples", type=count, default=64, help="valid unique examples to write")
    p.add_argument("--out", type=non_empty("a directory path"), default="speedx-out",
                   help="run directory (created; re-use it to resume)")
    p.add_argument("--temperature", type=number(float, at_least=0), default=1.0)
    p.add_argument("--top-p", type=number(float, above=0, at_most=1), default=1.0)
    p.add_argument("--max-tokens", type=number(int, at_least=16), default=1024,
                   help="per generated example (at least 16: room for its JSON)")
    p.add_argument("--tasks", type=path, default=None, help="tasks file: JSONL {task, family?} or one task per line")
    p.add_argument("--topics", type=path, default=None, help="topics file (one 'A > B > C' path per line) for "
                   "brainstorming; default: the built-in taxonomy")
    p.add_argument("--num-topics", type=count, default=None, help="topics to brainstorm tasks for "
                   "(default: num_examples / 4, at least 4)")
    p.add_argument("--revisor", type=model, default=None, help="model that revises each example once (a second pass)")
    p.add_argument("--revisor-lora", type=path, default=None, help="PEFT LoRA adapter of the revisor, merged at load")
    p.add_argument("--shard", type=shard_text, default="0/1", help="i/n: this process does example slots s with s %% n == i")
    p.add_argument("--json-mode", choices=("constrained", "repair"), default="constrained",
                   help="constrained: grammar-masked decoding (always valid JSON); repair: lenient parsing")
    p.add_argument("--max-attempts", type=count, default=8,
                   help="attempts per example slot on average: the run makes at most this many times its slots "
                   "in all, and one slot at most 4x as many")
    p.add_argument("--gpu-hour-price", type=price, default=2.0, help="$ per device-hour for the cost report")
    p.add_argument("--api-price-in", type=price, default=2.5, help="teacher API $ per 1M input tokens (GPT-4o)")
    p.add_argument("--api-price-out", type=price, default=10.0, help="teacher API $ per 1M output tokens (GPT-4o)")
    p.add_argument("--no-progress", action="store_true")
    EngineConfig.add_cli_args(p, helps={
        "model": "generator: 'default' (the embedded SmolLM2-135M-Instruct), a HF directory or a .gguf file",
        "lora": "PEFT LoRA adapter of the generator, merged at load",
        "seed": "seeds the brainstorm, the plan and every attempt (attempts are deterministic per seed, slot "
                "and attempt number)"})
    return p


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index = count = -1
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"got {text!r}; give i/n with 0 <= i < n, e.g. 0/4")
    return index, count


def shard_text(text: str) -> str:
    parse_shard(text)
    return text


def check_arguments(args) -> dict:
    """Everything that can be wrong with the arguments, checked before anything is written."""
    from speedx.synth.pipeline import AttemptBudget, RunState, shard_slots
    from speedx.synth.run_files import ensure_writable_dir, lock_run_dir, read_manifest
    from speedx.synth.tasks import load_saved_tasks, load_tasks_file, load_topics

    families = parse_families(args.families, args.model)
    weights = parse_mix(args.mix, families)
    families = [f for f in families if weights[f.name] > 0]
    if args.revisor_lora and not args.revisor:
        raise ValueError("--revisor-lora needs --revisor (the base model the adapter was trained on)")
    from speedx import SamplingParams
    from speedx.models.loader import resolve_model_path

    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    except ValueError as exc:
        raise ValueError(f"--temperature / --top-p: {str(exc).removeprefix('SamplingParams: ')}") from None
    for flag, model in (("--model", args.model), ("--revisor", args.revisor)):
        if model is not None:
            try:
                resolve_model_path(model)
            except FileNotFoundError as exc:
                raise ValueError(f"{flag}: {exc}") from None
    for flag, adapter in (("--lora", args.lora), ("--revisor-lora", args.revisor_lora)):
        if adapter and not (Path(adapter) / "adapter_config.json").is_file():
            raise ValueError(f"{flag} {adapter}: not a PEFT adapter directory (no adapter_config.json)")
    shard = parse_shard(args.shard)
    tasks = load_tasks_file(args.tasks, families) if args.tasks else None
    topics = None if tasks else load_topics(args.topics)
    out = Path(args.out)
    ensure_writable_dir(out)
    config = {key: getattr(args, key) for key in RESUME_KEYS}
    lock = lock_run_dir(out)  # before reading the run's files: no other process may change them now
    try:
        manifest = read_manifest(out / "manifest.json")
        previous = manifest.get("config", {})
        # a key the manifest lacks was not recorded by the version that made it: not a change
        changed = [k for k in RESUME_KEYS if k in previous and not same_setting(k, previous[k], config[k])]
        if changed:
            was = "; ".join(f"--{k.replace('_', '-')} {previous[k]} in the run, {config[k]} in this command"
                            for k in changed)
            raise ValueError(f"--out {out} holds a run made with other settings ({was}): "
                             "use the same arguments to resume, or a new --out")
        if previous.get("num_examples", 0) > args.num_examples:  # its examples beyond would count as this run's
            raise ValueError(f"--out {out} holds a run of --num-examples {previous['num_examples']}: resume it with "
                             "at least that many (it may grow), or use a new --out")
        saved_tasks = load_saved_tasks(out / "tasks.jsonl", families)
        # A run that ended with this --num-examples and no attempt left to make: nothing to load a model for.
        ended = manifest.get("status") in ("complete", "incomplete") and "export" in manifest \
            and previous.get("num_examples") == args.num_examples
        slots = shard_slots(args.num_examples, shard)
        budget = AttemptBudget.for_run(len(slots), args.max_attempts)
        state = RunState.load(out) if ended else None
        if ended and not state.open_slots(slots, budget):
            lock.close()
            return {"ended": manifest | {"empty_slots": state.empty_slots_reason(slots, budget)}, "out": out}
    except BaseException:
        lock.close()
        raise
    return {"families": families, "weights": weights, "shard": shard, "tasks": tasks, "topics": topics,
            "out": out, "config": config, "saved_tasks": saved_tasks, "lock": lock}


def same_setting(key: str, old, new) -> bool:
    """Equal values, or one file named by a relative and an absolute path."""
    if old == new:
        return True
    if key not in PATH_KEYS or not (isinstance(old, str) and isinstance(new, str)):
        return False
    try:
        return os.path.samefile(old, new)
    except OSError:  # either one is missing (or 'default')
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        from speedx.synth.merge import main as merge_main

        return merge_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad value (2), already printed
        return exc.code
    try:
        checked = check_arguments(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if "ended" in checked:
        manifest = checked["ended"]
        print(f"{checked['out']} holds this run, {manifest['status']} ({manifest['examples']} examples): "
              "nothing left to do" + incomplete_hint(manifest, args.max_attempts))
        return exit_codes.OK if manifest["status"] == "complete" else exit_codes.INCOMPLETE
    from speedx.synth.cli_run import run_generate

    try:
        manifest = run_generate(args, checked)
    except ValueError as exc:  # e.g. a schema the grammar compiler rejects
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except KeyboardInterrupt:  # what was written is kept: every finished request is one fsynced line
        print(f"\ninterrupted: re-run the same command to resume the run in {checked['out']}", file=sys.stderr)
        return exit_codes.INTERRUPTED
    finally:
        checked["lock"].close()
    print(f"run {manifest['status']}" + incomplete_hint(manifest, args.max_attempts))
    return exit_codes.OK if manifest["status"] == "complete" else exit_codes.INCOMPLETE


def incomplete_hint(manifest: dict, max_attempts: int) -> str:
    if manifest["status"] == "complete":
        return ""
    return (f": {manifest.get('empty_slots') or 'slots left empty'}; re-run the same command with a larger "
            f"--max-attempts (now {max_attempts}) to give them more")


if __name__ == "__main__":
    sys.exit(main())
