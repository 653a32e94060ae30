"""Hard-negative mining with FAISS: for each query, negatives are documents the embedder ranks close
to it that are not its positive.

Queries and candidates are embedded with a sentence-transformers model, normalised, and searched
exactly (inner product = cosine) with a FAISS `IndexFlatIP`, on every GPU when FAISS has GPUs.
Negatives are then taken from a window of ranks of each query's result list, minus its positives,
its own text, and candidates that score too close to the positive (likely false negatives).
The pure parts (`select_negatives`, `margin_threshold`, `build_corpus`) work without a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import faiss
import numpy as np

from speedx.embed.data import NEGATIVE_COLUMN, format_query, parse_row

GPU_MAX_K = 2048  # FAISS GPU search returns at most 2048 neighbours per query
SAMPLING = ("top", "random")


def query_text(record: dict, instruction_prefix: bool = True) -> str:
    """The text embedded for a record's query: E5/SPEED style `Instruct: ...\\nQuery: ...` when the
    record has an instruction (queries only; documents are embedded plain). A sentence-transformers
    "anchor" is taken as written, as training takes it (it already carries its prefix)."""
    if "anchor" in record:
        return record["anchor"]
    return format_query(record["query"], record.get("instruction") if instruction_prefix else None)


def build_corpus(records: Iterable[dict]) -> list[str]:
    """The default candidate corpus: every positive and existing negative of the records, each text
    once, in first-seen order (so ids are stable across runs)."""
    return _corpus_of(validate_records(records))


def _corpus_of(rows: Iterable[dict]) -> list[str]:
    texts: dict[str, None] = {}
    for row in rows:
        texts[row["positive"]] = None
        texts.update(dict.fromkeys(row["negatives"]))
    return list(texts)


def margin_threshold(positive_scores: np.ndarray, margin: float) -> np.ndarray:
    """Highest score a negative may have: `margin * positive_score` for a non-negative positive
    score (written as `pos - (1 - margin) * |pos|` so the threshold stays below the positive when
    its score is negative). margin=0.95 equals sentence-transformers' relative_margin=0.05."""
    positive_scores = np.asarray(positive_scores, dtype=np.float32)
    return positive_scores - (1.0 - margin) * np.abs(positive_scores)


def check_settings(num_negatives: int, range_min: int, range_max: int, margin: float | None, sampling: str) -> None:
    """Raise ValueError (with what to change) for settings that cannot mine anything sensible."""
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if range_min < 0:
        raise ValueError(f"range_min must be >= 0, got {range_min}")
    if range_min >= range_max:
        raise ValueError(f"range_min ({range_min}) must be smaller than range_max ({range_max})")
    if num_negatives > range_max - range_min:
        raise ValueError(f"cannot take {num_negatives} negatives from the {range_max - range_min} ranks between "
                         f"range_min={range_min} and range_max={range_max}: widen the window or ask for fewer")
    if margin is not None and not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be in (0, 1] (or None to turn it off), got {margin}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")


def select_negatives(
    scores: np.ndarray,
    ids: np.ndarray,
    positive_scores: np.ndarray,
    exclude: Sequence[Iterable[int]],
    *,
    num_negatives: int = 15,
    range_min: int = 2,
    range_max: int = 200,
    margin: float | None = 0.95,
    sampling: str = "top",
    rng: np.random.Generator | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pick negatives from ranked search results.

    scores, ids: (n, k) search results, best first (ids of -1 are padding). Row i may give at most
    `num_negatives` of its candidates at 0-based ranks range_min <= rank < range_max (ranks count
    every result, positives included: range_min=2 skips the two nearest documents), dropping
    ids in exclude[i] and, unless margin is None, any candidate scoring above
    margin_threshold(positive_scores[i], margin). sampling="top" takes the best-ranked allowed
    candidates, "random" a uniform sample of them drawn from rng (the result is kept in rank order).
    Returns one (ids, scores) pair per row; a row may get fewer than num_negatives.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    window_scores, window_ids = scores[:, range_min:range_max], ids[:, range_min:range_max]
    allowed = window_ids >= 0
    if margin is not None:
        allowed &= window_scores <= margin_threshold(positive_scores, margin)[:, None]
    picked = []
    for row, banned in enumerate(exclude):
        keep = np.flatnonzero(allowed[row] & ~np.isin(window_ids[row], list(banned)))
        if sampling == "random" and len(keep) > num_negatives:
            keep = np.sort(rng.choice(keep, size=num_negatives, replace=False))
        else:
            keep = keep[:num_negatives]
        picked.append((window_ids[row, keep], window_scores[row, keep]))
    return picked


def load_embedder(model: str = "default", device: str | None = None):
    """A SentenceTransformer from 'default' (the bundled all-MiniLM-L6-v2) or a local directory."""
    from speedx.embed.default_embedder import load_sentence_transformer, resolve_embedder

    return load_sentence_transformer(resolve_embedder(model), device=device)


def encode(model, texts: Sequence[str], batch_size: int = 64, show_progress_bar: bool = False) -> np.ndarray:
    """Unit-length float32 embeddings (FAISS wants C-contiguous float32)."""
    embeddings = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=show_progress_bar)
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def build_index(embeddings: np.ndarray, use_gpu: bool | None = None):
    """Exact inner-product index over the embeddings, spread over every GPU when FAISS has any."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(embeddings)
    return index


def search(index, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for each query, in batches so result and scratch memory stay bounded."""
    parts = [index.search(queries[start:start + batch_size], k) for start in range(0, len(queries), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def validate_records(records: Iterable[dict]) -> list[dict]:
    """Each record as training reads it ({"anchor", "positive", "negatives"}, speedx.embed.data.parse_row):
    any layout training takes is mined; a ValueError names the record training would refuse."""
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i} is not an object")
        rows.append(parse_row(record, f"record {i}"))
    return rows


def mine_hard_negatives(
    records: Sequence[dict],
    model="default",
    corpus: Sequence[str] | None = None,
    num_negatives: int = 15,
    range_min: int = 2,
    range_max: int = 200,
    margin: float | None = 0.95,
    sampling: str = "top",
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    instruction_prefix: bool = True,
    keep_existing: bool = True,
    search_batch_size: int = 4096,
    show_progress_bar: bool = False,
) -> list[dict]:
    """Mine hard negatives for records with "query" (or a sentence-transformers "anchor") and "positive",
    any layout `python -m speedx.train` reads (e.g. examples.jsonl).

    model: a SentenceTransformer, 'default' (bundled all-MiniLM-L6-v2) or a local model directory.
    corpus: candidate documents; default: all positives and existing negatives of the records.
    Each query (with the `Instruct: ...\\nQuery: ...` prefix when the record has an instruction and
    instruction_prefix is on) is searched against the corpus; negatives come from 0-based ranks
    range_min <= rank < range_max of its results, never one of the query's positives (records that
    share a query share their positives), a text equal to the query, or an existing negative of
    the record. margin (relative; None turns it off): a candidate is dropped when
    score > margin * positive_score, the positive score being the lowest over the query's positives,
    as in sentence-transformers' `mine_hard_negatives` with relative_margin = 1 - margin.
    sampling: "top" (the best-ranked allowed) or "random" (seeded by `seed`: same inputs, same output).

    Returns a copy of each record with "negatives" = the mined ones, hardest first, followed by its
    existing negatives (when keep_existing, the default; otherwise none), and "mined_negative_scores" =
    the cosine scores of the mined ones (the first len(scores) negatives). Mined come first because
    training keeps the first --max-negatives (default 1): by default it trains on the hardest mined
    negative, and on the existing one only where mining found none. A record's sentence-transformers
    negative / negative_k columns are folded into "negatives". A record may get fewer than
    num_negatives mined negatives when its window holds too few allowed candidates.
    """
    check_settings(num_negatives, range_min, range_max, margin, sampling)
    records = list(records)
    parsed_rows = validate_records(records)
    corpus = list(dict.fromkeys(_corpus_of(parsed_rows) if corpus is None else corpus))
    if not corpus:
        raise ValueError("the candidate corpus is empty: give records with positives or a non-empty corpus")
    if isinstance(model, str):
        model = load_embedder(model, device)

    # Unique queries are embedded and searched once; positives missing from a user corpus are
    # embedded after it (ids >= len(corpus)) only to score the margin, never indexed.
    queries = [query_text(r, instruction_prefix) for r in records]
    query_row = {q: i for i, q in enumerate(dict.fromkeys(queries))}
    doc_id = {text: i for i, text in enumerate(corpus)}
    for record in records:
        doc_id.setdefault(record["positive"], len(doc_id))
    documents = list(doc_id)
    query_emb = encode(model, list(query_row), batch_size, show_progress_bar)
    doc_emb = encode(model, documents, batch_size, show_progress_bar)

    positives = [set() for _ in query_row]
    for record, q in zip(records, queries):
        positives[query_row[q]].add(doc_id[record["positive"]])
    positive_scores = np.array([min(float(query_emb[row] @ doc_emb[p]) for p in ids)
                                for row, ids in enumerate(positives)], dtype=np.float32)

    use_gpu = faiss.get_num_gpus() > 0 and not str(device or "").startswith("cpu")
    k = min(range_max, len(corpus))
    if use_gpu and k > GPU_MAX_K:
        warnings.warn(f"FAISS on GPU returns at most {GPU_MAX_K} neighbours: range_max capped to {GPU_MAX_K}")
        k = GPU_MAX_K
    index = build_index(doc_emb[: len(corpus)], use_gpu)
    scores, ids = search(index, query_emb, k, search_batch_size)

    rows = np.array([query_row[q] for q in queries], dtype=np.int64)
    exclude = []
    for record, parsed, row in zip(records, parsed_rows, rows):
        banned = set(positives[row])
        own = [record.get("query"), record.get("anchor")]  # the query's own text, as written
        existing = parsed["negatives"] if keep_existing else []
        banned.update(doc_id[t] for t in own + existing if t in doc_id)
        exclude.append(banned)
    picked = select_negatives(scores[rows], ids[rows], positive_scores[rows], exclude, num_negatives=num_negatives,
                              range_min=range_min, range_max=range_max, margin=margin, sampling=sampling,
                              rng=np.random.default_rng(seed))

    mined = []
    for record, parsed, (neg_ids, neg_scores) in zip(records, parsed_rows, picked):
        kept = {k: v for k, v in record.items() if not NEGATIVE_COLUMN.fullmatch(k)}  # now in "negatives"
        existing = parsed["negatives"] if keep_existing else []
        mined.append({**kept, "negatives": [corpus[i] for i in neg_ids] + existing,
                      "mined_negative_scores": [round(float(s), 6) for s in neg_scores]})
    return mined
