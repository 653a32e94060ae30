"""Hard-negative mining throughput: queries/s of the whole mining pass and of its FAISS stage.

Workload from real text: the SciFact corpus in ../shared/evaldata (titles are the queries, the
first sentence of each abstract their positive, abstract sentences the candidate corpus); a
generated corpus stands in when that file is absent. Rows:
- end-to-end: `mine_hard_negatives` with a loaded model (embedding queries and corpus, exact
  search, window selection), run once (embedding dominates; on CPU it is slow to repeat);
  the embedding share is timed inside the same run.
- search+select: exact FAISS search plus window selection on the run's own embeddings, and on a
  larger synthetic corpus (the real embeddings tiled with noise), median of --repeats.
FAISS-GPU rows are added when faiss has GPUs; the end-to-end row runs per embedding device.

    python bench/mining.py                                   # ~1-2 min on 2 CPU cores
    python bench/mining.py --queries 2000 --corpus 20000 --search-corpus 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from throughput import device_name

from speedx.embed.mining import (
    build_index,
    load_embedder,
    mine_hard_negatives,
    search,
    select_negatives,
)

RESULTS = Path(__file__).parent / "results" / "mining.json"
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "evaldata" / "scifact" / "corpus.jsonl"
SETTINGS = {"num_negatives": 15, "range_min": 2, "range_max": 200, "margin": 0.95, "sampling": "top"}


def scifact_workload(num_queries: int, corpus_size: int) -> tuple[list[dict], list[str], str]:
    """Records (title -> first abstract sentence) and a corpus of abstract sentences holding every positive."""
    if not SCIFACT.exists():
        return generated_workload(num_queries, corpus_size) + ("generated",)
    records, sentences = [], []
    for line in SCIFACT.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        parts = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", doc["text"]) if len(s.split()) >= 5]
        if not parts or not doc["title"].strip():
            continue
        if len(records) < num_queries:
            records.append({"query": doc["title"], "positive": parts[0], "negatives": []})
        sentences.extend(parts)
        if len(records) >= num_queries and len(sentences) >= 2 * corpus_size:
            break
    corpus = list(dict.fromkeys([r["positive"] for r in records] + sentences))[:corpus_size]
    return records, corpus, str(SCIFACT)


def generated_workload(num_queries: int, corpus_size: int) -> tuple[list[dict], list[str]]:
    rng = random.Random(0)
    words = ["protein", "cell", "gene", "therapy", "risk", "patients", "dose", "trial", "mouse", "model", "signal",
             "tumor", "immune", "response", "blood", "brain", "heart", "study", "effect", "increase", "reduce",
             "level", "expression", "pathway", "infection", "vaccine"]
    corpus = list(dict.fromkeys(" ".join(rng.choices(words, k=rng.randint(8, 30))) for _ in range(corpus_size)))
    records = [{"query": " ".join(doc.split()[:5]), "positive": doc, "negatives": []} for doc in corpus[:num_queries]]
    return records, corpus


class TimedEmbedder:
    """Passes encode() through to the model, keeping its time and output (the run's own embeddings)."""

    def __init__(self, model):
        self.model, self.seconds, self.outputs = model, 0.0, []

    def encode(self, texts, **kwargs):
        start = time.perf_counter()
        out = self.model.encode(texts, **kwargs)
        self.seconds += time.perf_counter() - start
        self.outputs.append(out)
        return out


def time_search_select(queries: np.ndarray, docs: np.ndarray, use_gpu: bool, repeats: int) -> float:
    """Median seconds of index build + exact search + window selection (no exclusions but the margin)."""
    k = min(SETTINGS["range_max"], len(docs))
    positive_scores = np.full(len(queries), 0.9, dtype=np.float32)
    times = []
    for _ in range(repeats + 1):  # the first is the warm-up
        start = time.perf_counter()
        scores, ids = search(build_index(docs, use_gpu), queries, k)
        select_negatives(scores, ids, positive_scores, [()] * len(queries), **SETTINGS)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def tile_with_noise(vectors: np.ndarray, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = vectors[rng.integers(0, len(vectors), rows)] + rng.normal(0, 0.02, (rows, vectors.shape[1])).astype(np.float32)
    return np.ascontiguousarray(out / np.linalg.norm(out, axis=1, keepdims=True), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--queries", type=int, default=200, help="records mined end to end")
    parser.add_argument("--corpus", type=int, default=1200, help="candidate sentences embedded end to end")
    parser.add_argument("--search-queries", type=int, default=2000, help="queries for the large search-only row")
    parser.add_argument("--search-corpus", type=int, default=100_000, help="synthetic corpus for the search-only row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    records, corpus, source = scifact_workload(args.queries, args.corpus)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    faiss_gpus = faiss.get_num_gpus()
    rows = []
    for device in devices:
        model = load_embedder(args.model, device=device)
        model.encode(corpus[:args.batch_size], batch_size=args.batch_size)  # warm-up
        timed = TimedEmbedder(model)
        start = time.perf_counter()
        mine_hard_negatives(records, model=timed, corpus=corpus, batch_size=args.batch_size, device=device, **SETTINGS)
        seconds = time.perf_counter() - start
        rows.append({"stage": "end-to-end", "embed_device": device, "faiss": "gpu" if faiss_gpus and device != "cpu"
                     else "cpu", "corpus": len(corpus), "queries": len(records), "seconds": seconds,
                     "embed_seconds": timed.seconds, "queries_per_s": len(records) / seconds})
    query_emb, doc_emb = timed.outputs

    searches = [("real", query_emb, doc_emb[: len(corpus)]),
                ("synthetic", tile_with_noise(query_emb, args.search_queries, 1),
                 tile_with_noise(doc_emb, args.search_corpus, 2))]
    for kind, queries, docs in searches:
        for use_gpu in [False] + ([True] if faiss_gpus else []):
            seconds = time_search_select(queries, docs, use_gpu, args.repeats)
            rows.append({"stage": f"search+select ({kind})", "embed_device": None, "faiss": "gpu" if use_gpu else "cpu",
                         "corpus": len(docs), "queries": len(queries), "seconds": seconds, "embed_seconds": None,
                         "queries_per_s": len(queries) / seconds})

    names = {d: device_name(d) for d in devices}
    print(f"hard-negative mining, model {args.model}, data {source}, settings {SETTINGS}")
    print(f"{'stage':<26} {'embed':>5} {'faiss':>5} {'corpus':>8} {'queries':>7} {'seconds':>8} {'embed s':>8} {'queries/s':>10}")
    for r in rows:
        embed_s = f"{r['embed_seconds']:.2f}" if r["embed_seconds"] is not None else "-"
        print(f"{r['stage']:<26} {r['embed_device'] or '-':>5} {r['faiss']:>5} {r['corpus']:>8} {r['queries']:>7} "
              f"{r['seconds']:>8.3f} {embed_s:>8} {r['queries_per_s']:>10.1f}")
    report = {"device": names, "faiss_version": faiss.__version__, "faiss_gpus": faiss_gpus,
              "torch_threads": torch.get_num_threads(), "model": args.model, "data": source, "settings": SETTINGS,
              "repeats": {"end-to-end": 1, "search+select": args.repeats}, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
