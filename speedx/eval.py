"""`python -m speedx.eval`: score an embedding model with MTEB on local data, fully offline.

A task is a name from the evaldata folder (see --list), a BEIR folder (corpus.jsonl, queries.jsonl,
qrels/test.tsv), an STS TSV (sentence1, sentence2, score), or a standard MTEB task name whose data is
already in the local Hugging Face cache. Metrics are MTEB's: nDCG@10 (retrieval), cosine Spearman (STS),
accuracy (classification). The evaldata folder is $SPEEDX_EVALDATA, else ../shared/evaldata beside the
repository. Prints a results table and writes JSON (model, tasks, scores, versions, time).
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: nothing here may download.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import argparse
import sys

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m speedx.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (bundled all-MiniLM-L6-v2) or a local "
                   "sentence-transformers / transformers directory (default: default)")
    p.add_argument("--tasks", default="stsb,scifact", help="comma-separated task specs (default: stsb,scifact)")
    p.add_argument("--out", default="speedx-out/eval.json", help="JSON results file (default: speedx-out/eval.json)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: 64)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--query-instruction", default=None, help="text prepended to retrieval queries (e.g. an "
                   "instruction the model was trained with); documents and STS sentences are left as they are")
    p.add_argument("--list", action="store_true", help="list the local task names and exit")
    return p


def quiet_progress_bars() -> None:
    # Per-step bars from datasets/transformers (corpus formatting, weight loading) drown the results table.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def print_table(results: dict[str, dict]) -> None:
    rows = [("task", "type", "metric", "score", "seconds")]
    rows += [(spec, r["task_type"], r["metric"], f"{r['main_score']:.4f}", f"{r['seconds']:.1f}") for spec, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from speedx.embed.evaluation import (
        LOCAL_TASKS,
        EvalInputError,
        evaldata_dir,
        evaluate_model,
        list_local_tasks,
    )

    if args.list:
        try:
            print(f"evaldata: {evaldata_dir()}")
        except EvalInputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for name in list_local_tasks():
            print(f"  {name:<12} {LOCAL_TASKS[name][0]:<15} {LOCAL_TASKS[name][4]}")
        return 0
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise EvalInputError("--tasks is empty; give comma-separated task names or paths (see --list)")
        if args.batch_size < 1:
            raise EvalInputError("--batch-size must be >= 1")
        quiet_progress_bars()
        results = evaluate_model(args.model, tasks, batch_size=args.batch_size, device=args.device, out=args.out,
                                 query_instruction=args.query_instruction)
    except EvalInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_table(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
