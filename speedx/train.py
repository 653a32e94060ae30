"""`python -m speedx.train`: train a text-embedding model on synthesized (or mined) examples.

With no arguments it fine-tunes the bundled all-MiniLM-L6-v2 on speedx-out/examples.jsonl (what
`python -m speedx.generate` writes) with the fused InfoNCE loss on CPU or GPU, and saves a
sentence-transformers directory to speedx-out/model (load it with SentenceTransformer(path)).
Queries get the `Instruct: {instruction}\\nQuery: {query}` prefix, documents none. A causal-LM
directory as --model trains with last-token (EOS) pooling and LoRA, merged before saving.
Multi-GPU: `torchrun --nproc-per-node N -m speedx.train ...` (negatives are shared across GPUs).

Scaling study: `--scaling 1000,2000,4000` trains on nested subsets of the data, evaluates each on
--eval-tasks and fits score = a + b * ln(n); it writes scaling.json and scaling.png to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from pathlib import Path

from speedx.synth.run_files import ensure_writable_dir

EXIT_BAD_INPUT = 2
DEFAULT_DATA = "speedx-out/examples.jsonl"
DEFAULT_SCALING_TASKS = "stsb,scifact"
OUTPUT_MARKERS = ("speedx_train.json", "scaling.json")  # what a run of this command leaves in --out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m speedx.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="training JSONL: synthesis examples.jsonl, mined output, "
                   "or sentence-transformers anchor/positive/negative rows; a run directory means its "
                   f"examples.jsonl (default: {DEFAULT_DATA})")
    p.add_argument("--model", default="default", help="base model: 'default' (all-MiniLM-L6-v2), a "
                   "sentence-transformers directory, or a Hugging Face encoder / causal-LM directory")
    p.add_argument("--out", default=None, help="output directory (default: speedx-out/model, or "
                   "speedx-out/scaling with --scaling); an earlier output of this command there is replaced")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that holds no earlier "
                   "output of this command (everything in it is deleted first)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (E5: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="queries per batch (per device); every query is "
                   "scored against all positives and negatives of the batch")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-5, or 1e-4 with LoRA)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps with linear warm-up")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters (merged before saving) instead of all weights "
                   "(default: on for causal LMs, off for encoders)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (E5: 16)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (E5: 32)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (E5: 0.1)")
    p.add_argument("--pooling", choices=("auto", "mean", "lasttoken"), default="auto",
                   help="auto: the model's own, else mean for encoders and last token (EOS) for causal LMs")
    p.add_argument("--mini-batch-size", type=int, default=None, help="GradCache: embed each batch in chunks of "
                   "this size (same gradient, memory of one chunk) for batches larger than memory allows")
    p.add_argument("--scale", type=float, default=50.0, help="InfoNCE scale = 1 / temperature (E5: 50)")
    p.add_argument("--max-negatives", type=int, default=1, help="hard negatives per example to use (default 1, as E5); "
                   "rows with fewer train in batches of their own")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text (default: the model's; "
                   "512 for causal LMs)")
    p.add_argument("--seed", type=int, default=0, help="seeds LoRA init, batch order and --scaling subsets")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="default: cuda when available (bf16 autocast there), else cpu")
    p.add_argument("--scaling", default=None, metavar="N1,N2,...",
                   help="scaling study on nested subsets of these sizes (e.g. 1000,2000,4000)")
    p.add_argument("--eval-tasks", default=None, help="comma list of evaluation tasks (speedx.embed.evaluation) "
                   f"run after training (default: none; {DEFAULT_SCALING_TASKS} with --scaling)")
    p.add_argument("--eval-instruction", default=None, help="task instruction for the evaluation's retrieval queries, "
                   "given them as in training (`Instruct: {instruction}\\nQuery: {query}`); default: bare queries")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_tasks(text: str | None) -> list[str]:
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not tasks:
        raise ValueError(f"bad --eval-tasks {text!r}: write task names separated by commas")
    return tasks


def query_prefix(instruction: str | None) -> str | None:
    """What training puts before a query with this instruction (None: nothing)."""
    from speedx.embed.data import format_query

    return format_query("", instruction) if instruction else None


def prepare_out(out: Path, overwrite: bool, reads: list[Path]) -> None:
    """Make `out` an empty writable directory. A non-empty one is emptied (no stale files of an earlier
    model stay) only when it holds an earlier output of this command, or with overwrite; never when it
    holds a path this run reads (the data, the base model)."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite and not any((out / name).is_file() for name in OUTPUT_MARKERS):
            raise ValueError(f"--out {out} is not empty: pass --overwrite to replace it, or choose another directory")
        for path in reads:
            if path.resolve().is_relative_to(out.resolve()):
                raise ValueError(f"replacing --out {out} would delete {path}, which this run reads: "
                                 "choose another directory")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    ensure_writable_dir(out)


def run(args) -> int:
    from speedx.embed.data import load_training_rows
    from speedx.embed.default_embedder import resolve_embedder
    from speedx.embed.scaling import default_evaluator, nested_subsets, parse_sizes

    # Cheap checks first (the trainer import takes seconds).
    sizes = parse_sizes(args.scaling) if args.scaling is not None else None
    tasks = parse_tasks(args.eval_tasks if args.eval_tasks is not None or sizes is None else DEFAULT_SCALING_TASKS)
    if args.eval_instruction is not None and not tasks:
        raise ValueError("--eval-instruction applies to the evaluation: give --eval-tasks too")
    data = Path(args.data)
    if not data.exists():
        default = args.data == DEFAULT_DATA
        hint = "run `python -m speedx.generate` first or pass --data FILE" if default else "check --data"
        raise ValueError(f"no training data at {data}: {hint}")
    if tasks:
        from speedx.embed.evaluation import resolve_task

        for task in tasks:  # an unknown name fails now, not after training
            resolve_task(task)
    rows = load_training_rows(data, max_negatives=args.max_negatives)
    if sizes:
        nested_subsets(rows, sizes)  # a size above the data is an error before anything loads

    from speedx.embed.trainer import TrainConfig

    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      max_steps=args.max_steps, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, pooling=args.pooling, mini_batch_size=args.mini_batch_size,
                      scale=args.scale, seed=args.seed, max_length=args.max_length,
                      warmup_ratio=args.warmup_ratio, device=args.device, progress=not args.no_progress)
    cfg.check()
    out = Path(args.out or ("speedx-out/scaling" if sizes else "speedx-out/model"))
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: the first process prepares it for all
        prepare_out(out, args.overwrite, reads=[data, Path(resolve_embedder(args.model))])

    evaluate = functools.partial(default_evaluator, query_instruction=query_prefix(args.eval_instruction))
    if sizes:
        from speedx.embed.scaling import run_scaling

        run_scaling(rows, sizes, cfg, tasks, out, evaluate=evaluate)
        print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
        return 0

    from speedx.embed.trainer import train_embedder

    model, stats = train_embedder(rows, cfg, out)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one report, from the first process
        return 0
    print(f"trained on {stats['examples']} examples: {stats['steps']} steps, loss {stats['train_loss']:.4f}, "
          f"{stats['train_seconds']:.0f} s; saved to {out}")
    if tasks:
        results = evaluate(model, tasks)
        (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        for task, result in results.items():
            print(f"{task}: {result['main_score']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: data rows, model path, sizes, task names
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
