"""Evaluating embedding models with MTEB on local data, fully offline.

Local MTEB tasks are built from plain files (the real sets in ../shared/evaldata, a BEIR folder, or an
STS TSV) and run through `mteb.evaluate`, so the scores are MTEB's own metrics: nDCG@10 for retrieval,
cosine Spearman for STS (MTEB's main score for its STS tasks), accuracy for classification.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

EVALDATA_ENV = "SPEEDX_EVALDATA"
REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (kind, file or folder inside evaldata, min score, max score, what it is)
LOCAL_TASKS: dict[str, tuple[str, str, float, float, str]] = {
    "scifact": ("retrieval", "scifact", 0, 0, "SciFact (BEIR test split: 300 claims, 5,183 abstracts)"),
    "cisi": ("retrieval", "cisi", 0, 0, "CISI (76 judged queries, 1,460 documents)"),
    "stsb": ("sts", "stsb/test.tsv", 0, 5, "STS Benchmark test (1,379 pairs)"),
    "sick-r": ("sts", "sick-r/test.tsv", 1, 5, "SICK-R SemEval-2014 test split (sick-r/test.tsv, 4,927 pairs)"),
    "sick-r-all": ("sts", "sick-r/all_9927.tsv", 1, 5, "SICK-R all 9,927 pairs (what MTEB's SICK-R scores)"),
    **{f"sts{y}": ("sts", f"sts{y}/test.tsv", 0, 5, f"SemEval STS 20{y} (SentEval copy)") for y in range(12, 17)},
    "banking77": ("classification", "banking77/test.tsv", 0, 0,
                  "Banking77 test rows, 5-fold cross-validation, 8 examples per intent (not MTEB's train/test protocol)"),
}
# Standard MTEB names whose data exists here under a local name (suggested when the hub copy is missing).
MTEB_NAME_TO_LOCAL = {"SciFact": "scifact", "STSBenchmark": "stsb", "SICK-R": "sick-r-all", "Banking77Classification": "banking77",
                      **{f"STS{y}": f"sts{y}" for y in range(12, 17)}}


class EvalInputError(ValueError):
    """Bad user input (task spec, data file, model path): the message says what to fix."""


# ---------------------------------------------------------------------------------------------- data

def evaldata_dir() -> Path:
    """$SPEEDX_EVALDATA, else ../shared/evaldata beside the repository, else /work/shared/evaldata."""
    env = os.environ.get(EVALDATA_ENV)
    if env:
        if not Path(env).is_dir():
            raise EvalInputError(f"{EVALDATA_ENV}={env} is not a directory; point it at the evaldata folder")
        return Path(env)
    for candidate in (REPO_ROOT.parent / "shared" / "evaldata", Path("/work/shared/evaldata")):
        if candidate.is_dir():
            return candidate
    raise EvalInputError(f"evaldata folder not found; set {EVALDATA_ENV}=/path/to/evaldata "
                         f"or put it at {REPO_ROOT.parent / 'shared' / 'evaldata'}")


def list_local_tasks() -> list[str]:
    """Local task names whose data is present."""
    try:
        root = evaldata_dir()
    except EvalInputError:
        return []
    return [name for name, spec in LOCAL_TASKS.items() if (root / spec[1]).exists()]


def _read_tsv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        return _read_tsv_rows(path, columns)
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_tsv_rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    # csv module, never line.split: fields may be quoted and hold tabs, quotes or newlines.
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalInputError(f"{path}: header must name the tab-separated columns {', '.join(columns)} "
                                 f"(found {reader.fieldnames}); missing {missing}")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if any(row.get(c) is None for c in columns):
                raise EvalInputError(f"{path}: row {line_no} has fewer than {len(columns)} fields")
            rows.append({c: row[c] for c in columns})
    if not rows:
        raise EvalInputError(f"{path}: no data rows")
    return rows


def read_sts_tsv(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """sentence1, sentence2, score columns of an STS TSV."""
    path = Path(path)
    rows = _read_tsv(path, ("sentence1", "sentence2", "score"))
    scores = []
    for i, row in enumerate(rows, start=2):
        try:
            scores.append(float(row["score"]))
        except ValueError:
            raise EvalInputError(f"{path}: row {i} score {row['score']!r} is not a number") from None
        if not math.isfinite(scores[-1]):
            raise EvalInputError(f"{path}: row {i} score {row['score']!r} is not finite")
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], scores


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a string
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}: line {line_no} is not JSON ({e.msg})") from None
    return rows


def read_beir(folder: str | Path, split: str = "test") -> tuple[Dataset, Dataset, dict[str, dict[str, int]]]:
    """corpus.jsonl, queries.jsonl and qrels/<split>.tsv of a BEIR folder -> (corpus, queries, qrels)."""
    folder = Path(folder)
    paths = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
    missing = [str(p.relative_to(folder)) for p in paths if not p.is_file()]
    if missing:
        raise EvalInputError(f"{folder}: not a BEIR folder, missing {', '.join(missing)}")
    try:
        corpus = [{"id": str(d["_id"]), "title": d.get("title") or "", "text": d["text"]} for d in _read_jsonl(paths[0])]
        queries = [{"id": str(q["_id"]), "text": q["text"]} for q in _read_jsonl(paths[1])]
    except (KeyError, TypeError) as e:
        raise EvalInputError(f"{folder}: every corpus/queries line needs '_id' and 'text' (missing {e})") from None
    qrels: dict[str, dict[str, int]] = {}
    for i, row in enumerate(_read_tsv(paths[2], ("query-id", "corpus-id", "score")), start=2):
        try:
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(float(row["score"]))
        except ValueError:
            raise EvalInputError(f"{paths[2]}: row {i} score {row['score']!r} is not a number") from None
    query_ids = {q["id"] for q in queries}
    if not any(qid in query_ids for qid in qrels):
        raise EvalInputError(f"{paths[2]}: no qrels query-id matches a query in queries.jsonl")
    return Dataset.from_list(corpus), Dataset.from_list(queries), qrels


# --------------------------------------------------------------------------------------------- tasks
# Each task reads its own files in load_data, so MTEB never reaches for the Hugging Face hub.

class LocalSTSTask(AbsTaskSTS):
    """An STS TSV (sentence1, sentence2, score) as an MTEB STS task."""

    path: Path

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        s1, s2, scores = read_sts_tsv(self.path)
        self.dataset = {"default": DatasetDict({"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": scores})})}
        self.data_loaded = True


class LocalRetrievalTask(AbsTaskRetrieval):
    """A BEIR folder as an MTEB retrieval task (documents are read as title + " " + text, as MTEB does)."""

    path: Path

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        corpus, queries, qrels = read_beir(self.path)
        self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}}}
        self.data_loaded = True


class LocalClassificationTask(AbsTaskClassification):
    """A (text, label) TSV with a single split, scored with MTEB's k-fold cross-validation on that split."""

    path: Path
    is_cross_validation = True
    train_split = "test"  # cross-validation draws its training folds from the one split there is

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        rows = _read_tsv(self.path, ("text", "label"))
        names = sorted({r["label"] for r in rows})
        data = {"text": [r["text"] for r in rows], "label": [names.index(r["label"]) for r in rows]}
        self.dataset = {"default": DatasetDict({"test": Dataset.from_dict(data)})}
        self.data_loaded = True


_BASES = {"sts": (LocalSTSTask, "STS", "cosine_spearman"), "retrieval": (LocalRetrievalTask, "Retrieval", "ndcg_at_10"),
          "classification": (LocalClassificationTask, "Classification", "accuracy")}


def make_task(kind: str, name: str, path: str | Path, description: str = "", min_score: float = 0, max_score: float = 5):
    """A local MTEB task of `kind` ("sts" | "retrieval" | "classification") reading `path`.

    Each task gets its own subclass because MTEB keeps metadata on the class (unload_data drops
    instance-level metadata)."""
    base, task_type, main_score = _BASES[kind]
    metadata = TaskMetadata(
        name=name, description=description or f"local {kind} data at {path}", type=task_type,
        dataset={"path": str(path), "revision": "local"}, reference=None, category="t2c" if kind == "classification" else "t2t",
        modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score=main_score, date=None, domains=None,
        task_subtypes=None, license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="",
    )
    attrs: dict[str, Any] = {"metadata": metadata, "path": Path(path)}
    if kind == "sts":
        attrs |= {"min_score": min_score, "max_score": max_score}
    return type(f"Local_{name}", (base,), attrs)()


def _sts_range(path: Path) -> tuple[float, float]:
    # An arbitrary TSV is normalised by its own observed range (a linear map: correlations are unchanged).
    scores = read_sts_tsv(path)[2]
    lo, hi = min(scores), max(scores)
    if lo == hi:
        raise EvalInputError(f"{path}: every score is {lo}; an STS set needs varying scores")
    return lo, hi


def resolve_task(spec: Any):
    """A task spec -> an MTEB task: a local evaldata name, a BEIR folder, an STS .tsv, or a standard
    MTEB task name (its data must already be in the local Hugging Face cache). A task object is returned as is."""
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    if spec in LOCAL_TASKS:
        kind, rel, lo, hi, description = LOCAL_TASKS[spec]
        path = evaldata_dir() / rel
        if not path.exists():
            raise EvalInputError(f"task {spec!r}: {path} is missing from the evaldata folder")
        return make_task(kind, spec, path, description, lo, hi)
    path = Path(spec).expanduser()
    if path.is_dir():
        return make_task("retrieval", path.resolve().name, path)
    if path.suffix.lower() == ".tsv":
        if not path.is_file():
            raise EvalInputError(f"STS file not found: {spec}")
        name = path.stem if path.stem not in ("test", "dev", "train") else f"{path.parent.name}-{path.stem}"
        return make_task("sts", name, path, f"local STS data at {path}", *_sts_range(path))
    if "/" in spec or os.sep in spec:  # (MTEB names may hold dots, e.g. Banking77Classification.v2)
        raise EvalInputError(f"task path not found: {spec} (a BEIR folder or an STS .tsv file)")
    import mteb

    try:
        return mteb.get_task(spec)
    except KeyError:
        raise EvalInputError(f"unknown task {spec!r}; use one of {', '.join(LOCAL_TASKS)}, a BEIR folder, "
                             "an STS .tsv, or a standard MTEB task name") from None


# ---------------------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face hub offline for the duration: nothing may download, whatever the environment says."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def load_model(model: Any, device: str | None = None):
    """'default' or a local directory -> a SentenceTransformer; a loaded model is returned as is."""
    from speedx.embed.default_embedder import load_sentence_transformer, resolve_embedder

    if not isinstance(model, (str, Path)):
        return model
    try:
        path = resolve_embedder(model)
    except FileNotFoundError as e:
        raise EvalInputError(str(e)) from None
    if not Path(path).is_dir():
        raise EvalInputError(f"model not found: {model} (pass 'default' or a local sentence-transformers/transformers directory)")
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvalInputError(f"--device {device}: no CUDA device here; use --device cpu")
    with _offline():
        try:
            return load_sentence_transformer(path, device=device)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from None


def _preload(task, spec: str) -> None:
    # Load before mteb.evaluate so a missing hub copy of a standard MTEB task becomes a clear error.
    if task.data_loaded or isinstance(task, (LocalSTSTask, LocalRetrievalTask, LocalClassificationTask)):
        task.load_data()  # our own readers raise EvalInputError for bad files
        return
    try:
        task.load_data()
    except Exception as e:  # noqa: BLE001 -- datasets/hub raise many kinds of errors when offline
        hint = f"; the local copy is task {MTEB_NAME_TO_LOCAL[spec]!r}" if spec in MTEB_NAME_TO_LOCAL else ""
        raise EvalInputError(f"task {spec!r}: its data is not available offline ({type(e).__name__}){hint}") from None


def evaluate_model(model: Any, tasks: list[Any], batch_size: int = 64, device: str | None = None, out: str | Path | None = None,
                   query_instruction: str | None = None) -> dict[str, dict]:
    """Evaluate `model` ('default', a local directory, or a loaded SentenceTransformer) on each task spec.

    A task is a spec string (see `resolve_task`) or an MTEB task object (keyed by its metadata name).
    Returns {spec: {"main_score", "metric", "task_type", "task", "description", "data", "seconds", "scores"}}, where
    "scores" holds all of MTEB's raw scores for the test split. `query_instruction` is prepended to retrieval
    queries (as an MTEB "query" prompt). With `out`, a JSON document (model, tasks, scores, versions, time)
    is written there."""
    import mteb
    from mteb.models.sentence_transformer_wrapper import (
        SentenceTransformerEncoderWrapper,
    )

    if isinstance(tasks, (str, Path)):
        tasks = [tasks]
    started = time.time()
    if out is not None:
        check_writable_file(out)  # before the tasks run, not after
    # Every spec is checked before any model work; a task object is keyed by its name.
    resolved = {(str(s) if isinstance(s, (str, Path)) else s.metadata.name): resolve_task(s) for s in tasks}
    st_model = load_model(model, device)
    saved_prompts = dict(getattr(st_model, "prompts", None) or {})
    prompts = None
    if query_instruction:
        # MTEB's SentenceTransformer wrapper passes the "query" prompt to encode_query; keep the model's own prompts.
        prompts = {"document": "", **saved_prompts, "query": query_instruction}
    encode_kwargs: dict[str, Any] = {"batch_size": batch_size, "show_progress_bar": False}
    if device is not None and not isinstance(model, (str, Path)):
        encode_kwargs["device"] = device
    results: dict[str, dict] = {}
    try:
        with _offline(), warnings.catch_warnings():
            # Expected notices: sentence-transformers renames seen by mteb, and our merged query prompt.
            warnings.filterwarnings("ignore", message=".*get_sentence_embedding_dimension", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Model prompts specified")
            wrapper = SentenceTransformerEncoderWrapper(st_model, model_prompts=prompts)
            for spec, task in resolved.items():
                start = time.perf_counter()
                was_loaded = task.data_loaded
                _preload(task, spec)
                # cache=None: results are never read from or written to ~/.cache/mteb (a stale hit would be silent).
                result = mteb.evaluate(wrapper, [task], cache=None, encode_kwargs=dict(encode_kwargs), show_progress_bar=False)
                if not was_loaded:
                    task.unload_data()  # mteb leaves preloaded data in memory
                scores = result.task_results[0].scores["test"][0]
                results[spec] = {
                    "main_score": float(scores["main_score"]), "metric": task.metadata.main_score,
                    "task_type": task.metadata.type, "task": task.metadata.name, "description": task.metadata.description,
                    "data": task.metadata.dataset["path"],
                    "seconds": round(time.perf_counter() - start, 2), "scores": scores,
                }
    finally:
        if hasattr(st_model, "prompts"):
            st_model.prompts = saved_prompts  # MTEB's wrapper may overwrite them
    if out is not None:
        write_results(out, model, results, started=started, batch_size=batch_size, device=str(st_model.device),
                      query_instruction=query_instruction)
    return results


def check_writable_file(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        raise EvalInputError(f"--out {path} is a directory: give a .json file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalInputError(f"cannot create the folder of --out {path}: {exc.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EvalInputError(f"--out {path} is not writable")


def write_results(path: str | Path, model: Any, results: dict[str, dict], started: float, **settings: Any) -> None:
    """The JSON results document: model, tasks, scores, package versions, time."""
    import datetime

    import mteb
    import sentence_transformers

    from speedx.embed.default_embedder import resolve_embedder

    if isinstance(model, (str, Path)):
        name, model_path = str(model), resolve_embedder(model)
    else:  # a loaded model: the directory its weights came from, where it says
        name = type(model).__name__
        try:
            model_path = model[0].auto_model.config.name_or_path
        except (TypeError, AttributeError, IndexError, KeyError):
            model_path = None
    document = {
        "model": name, "model_path": model_path,
        "tasks": list(results), "scores": {spec: r["main_score"] for spec, r in results.items()}, "results": results,
        "settings": settings, "mteb_version": mteb.__version__, "sentence_transformers_version": sentence_transformers.__version__,
        "time": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 2),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
