"""Training data for the embedding trainer: JSONL rows -> (anchor, positive, negatives) -> datasets.

Three row layouts are read, one per line (mixing them in one file is fine):
  synthesis / mined output  {"query", "positive", "negatives": [...], "instruction"}  (speedx.synth, speedx.embed.mine)
  sentence-transformers     {"anchor", "positive", "negative"} or negative_1..negative_k  (the export's triplets/pairs)
Only the query side carries the instruction: `Instruct: {instruction}\nQuery: {query}` (E5 recipe); an anchor
is taken as written (the export already prefixed it). Documents never get a prefix.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from speedx.synth.run_files import numbered_json_lines

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"
DEFAULT_MAX_NEGATIVES = 1  # E5 / SPEED train on one hard negative per query
NEGATIVE_COLUMN = re.compile(r"negative(_\d+)?")  # sentence-transformers' negative, negative_1, ...


class DataError(ValueError):
    """A training file that cannot be read; the message names the file and line."""


def format_query(query: str, instruction: str | None) -> str:
    """The query side of a pair: the instruction prefix when there is one, else the bare query."""
    return QUERY_TEMPLATE.format(instruction=instruction, query=query) if instruction else query


def training_file(path: str | Path) -> Path:
    """The JSONL file that a path names: the file itself, or a run directory's examples.jsonl."""
    path = Path(path)
    return path / "examples.jsonl" if path.is_dir() else path


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file (or a run directory holding examples.jsonl) as written, each checked
    as training reads it (parse_row). Raises DataError naming file:line for a bad row."""
    return [record for record, _ in _read(path)]


def load_training_rows(path: str | Path, max_negatives: int = DEFAULT_MAX_NEGATIVES) -> list[dict]:
    """Rows {"anchor", "positive", "negatives": [str, ...]} from a JSONL file (or a run directory holding
    examples.jsonl), at most max_negatives negatives each (the first ones: mined negatives come first).
    Raises DataError naming file:line for a bad row."""
    if max_negatives < 0:
        raise DataError(f"max_negatives must be >= 0, got {max_negatives}")
    return [{**row, "negatives": row["negatives"][:max_negatives]} for _, row in _read(path)]


def _read(path: str | Path) -> list[tuple[dict, dict]]:
    """(record, parse_row(record)) for every line of the file."""
    path = training_file(path)
    if not path.is_file():
        raise DataError(f"no training data at {path}")
    pairs = []
    for number, record in numbered_json_lines(path, error=DataError):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        pairs.append((record, parse_row(record, f"{path}:{number}")))
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def parse_row(record: dict, where: str) -> dict:
    """{"anchor", "positive", "negatives"} from one record of any layout; DataError naming `where`."""
    if "anchor" in record:
        anchor = _text(record, "anchor", where)
    elif "query" in record:
        instruction = record.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise DataError(f"{where}: field 'instruction' must be a string")
        anchor = format_query(_text(record, "query", where), instruction)
    else:
        raise DataError(f"{where}: missing field 'query' (or 'anchor')")
    if "negatives" in record:
        negatives = record["negatives"]
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise DataError(f"{where}: field 'negatives' must be a list of non-empty strings")
    else:  # sentence-transformers columns: negative, or negative_1 .. negative_k in order
        keys = sorted((k for k in record if NEGATIVE_COLUMN.fullmatch(k)),
                      key=lambda k: int(k.rpartition("_")[2]) if "_" in k else 0)
        negatives = [_text(record, k, where) for k in keys]
    return {"anchor": anchor, "positive": _text(record, "positive", where), "negatives": list(negatives)}


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return value


def to_dataset(rows: list[dict]):
    """A datasets.Dataset with columns anchor, positive, negative_1..negative_k, the order the
    sentence-transformers trainer hands columns to the loss (InfoNCELoss: anchors vs all the rest).

    A column count is fixed per dataset, so rows with different numbers of negatives (e.g. the matching
    families have none) go to separate datasets of a DatasetDict keyed "neg{k}"; the trainer then draws
    each batch from one of them, in proportion to their sizes.
    """
    from datasets import Dataset, DatasetDict

    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        groups[len(row["negatives"])].append(row)
    datasets = {}
    for k, group in sorted(groups.items()):
        columns = {"anchor": [r["anchor"] for r in group], "positive": [r["positive"] for r in group]}
        for i in range(k):
            columns[f"negative_{i + 1}"] = [r["negatives"][i] for r in group]
        datasets[f"neg{k}"] = Dataset.from_dict(columns)
    if len(datasets) == 1:
        return next(iter(datasets.values()))
    return DatasetDict(datasets)
