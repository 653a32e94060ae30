"""Data scaling study: train on nested subsets of the data, evaluate each, fit score = a + b * ln(n).

Subsets are the first n rows of one seeded shuffle, so every larger subset contains the smaller ones
and only the amount of data changes. Every size trains from the same base model with the same settings.
Writes scaling.json (table + fit) and scaling.png into the output directory.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


def parse_sizes(text: str) -> list[int]:
    """'1000,2000,4000' -> [1000, 2000, 4000] (sorted, unique, each >= 1)."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"bad --scaling {text!r}: write comma-separated example counts, e.g. 1000,2000,4000") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"bad --scaling {text!r}: need at least one count, each >= 1")
    return sizes


def nested_subsets(rows: list, sizes: list[int], seed: int = 0) -> dict[int, list]:
    """{n: the first n rows of a seeded shuffle}; a size above len(rows) is an error."""
    too_big = [n for n in sizes if n > len(rows)]
    if too_big:
        raise ValueError(f"--scaling size {too_big[0]} exceeds the {len(rows)} training examples; "
                         f"use sizes up to {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return {n: [rows[i] for i in order[:n]] for n in sizes}


def fit_log_linear(sizes, scores) -> dict:
    """Least-squares fit of score = a + b * ln(n): {"a", "b", "r2"} (b: gain per e-fold of data;
    b * ln 2 per doubling)."""
    x, y = np.log(np.asarray(sizes, dtype=float)), np.asarray(scores, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("the fit needs at least two different sizes")
    b, a = np.polyfit(x, y, 1)
    residual = float(np.sum((y - (a + b * x)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return {"a": float(a), "b": float(b), "per_doubling": float(b * math.log(2)), "r2": r2}


def default_evaluator(model, tasks: list[str], query_instruction: str | None = None) -> dict:
    """speedx.embed.evaluation.evaluate_model: {task: {"main_score": float, ...}}; query_instruction
    goes before every retrieval query."""
    from speedx.embed.evaluation import evaluate_model

    return evaluate_model(model, tasks, query_instruction=query_instruction)


def mean_score(results: dict) -> float:
    return float(np.mean([r["main_score"] for r in results.values()]))


def run_scaling(rows: list[dict], sizes: list[int], cfg, tasks: list[str], out_dir: str | Path,
                evaluate=None, log=print) -> dict:
    """Train cfg.model on each nested subset, evaluate on tasks, fit, and write scaling.json/.png.
    evaluate(model, tasks) -> {task: {"main_score"}} (default: speedx.embed.evaluation)."""
    from speedx.embed.trainer import load_model, train_embedder

    evaluate = evaluate or default_evaluator
    subsets = nested_subsets(rows, sizes, cfg.seed)  # checks the sizes before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_model, _ = load_model(cfg)
    base = evaluate(base_model, tasks)  # also catches unknown task names before any training
    del base_model
    log(f"base model: {mean_score(base):.4f}")
    table = []
    for n, subset in subsets.items():
        started = time.time()
        model, stats = train_embedder(subset, cfg)
        results = evaluate(model, tasks)
        table.append({"n": n, "score": mean_score(results), "tasks": {t: r["main_score"] for t, r in results.items()},
                      "steps": stats["steps"], "train_loss": stats["train_loss"],
                      "seconds": round(time.time() - started, 2)})
        log(f"n={n}: {table[-1]['score']:.4f} ({stats['steps']} steps, {table[-1]['seconds']:.0f} s)")
    fit = fit_log_linear([r["n"] for r in table], [r["score"] for r in table]) if len(table) > 1 else None
    base_scores = {t: r["main_score"] for t, r in base.items()}
    report = {"tasks": tasks, "base": {"score": mean_score(base), "tasks": base_scores},
              "table": table, "fit": fit, "config": asdict(cfg), "examples_available": len(rows)}
    (out_dir / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_scaling(report, out_dir / "scaling.png")
    if fit:
        log(f"fit: score = {fit['a']:.4f} {fit['b']:+.4g} * ln(n)  ({fit['per_doubling']:+.4g} per doubling, "
            f"R^2 {fit['r2']:.3f})")
    return report


def plot_scaling(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sizes = [r["n"] for r in report["table"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["score"] for r in report["table"]], "o", label="trained")
    if report["fit"]:
        fit, grid = report["fit"], np.geomspace(min(sizes), max(sizes), 100)
        ax.plot(grid, fit["a"] + fit["b"] * np.log(grid), "-",
                label=f"{fit['a']:.4g} {fit['b']:+.3g} ln n (R² {fit['r2']:.2f})")
    ax.axhline(report["base"]["score"], color="gray", ls="--", label="base model")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])  # the trained sizes, not 10^k ticks
    ax.minorticks_off()
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"mean main score ({', '.join(report['tasks'])})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
