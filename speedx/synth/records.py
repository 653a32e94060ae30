"""Turn an engine output into an example record or a rejection, and export training layouts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from speedx.synth.families import Family
from speedx.synth.json_repair import JSONRepairError, parse_json_object
from speedx.synth.validate import validate_example


@dataclass(frozen=True)
class PlannedRequest:
    """One generation attempt for one example slot; everything about it follows from (seed, slot, attempt)."""

    slot: int
    attempt: int
    family: Family
    task_id: str
    task: str
    knobs: dict
    seed: int
    messages: list

    @property
    def id(self) -> str:
        return f"s{self.slot}-a{self.attempt}"


def parse_output(text: str, json_mode: str) -> dict:
    """Constrained output must be exact JSON; repair mode accepts fenced, chatty or truncated JSON."""
    if json_mode == "constrained":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JSONRepairError(f"invalid JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise JSONRepairError("top level is not an object")
        return data
    return parse_json_object(text)


def example_record(request: PlannedRequest, data: dict, model: str, revised: bool, tokens: dict) -> dict:
    record = request.family.to_record(data, request.task)
    return {
        "id": request.id,
        "slot": request.slot,
        "attempt": request.attempt,
        "family": request.family.name,
        "task_id": request.task_id,
        "task": request.task,
        "query": record.query,
        "positive": record.positive,
        "negatives": record.negatives,
        "instruction": record.instruction,
        "raw": data,
        "knobs": request.knobs,
        "generator": model,
        "revised": revised,
        **tokens,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def rejection_record(request: PlannedRequest, reason: str, text: str, tokens: dict) -> dict:
    return {
        "id": request.id,
        "slot": request.slot,
        "attempt": request.attempt,
        "family": request.family.name,
        "task_id": request.task_id,
        "reason": reason,
        "text": text,
        "knobs": request.knobs,
        **tokens,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_example(request: PlannedRequest, text: str, json_mode: str) -> tuple[dict | None, str | None]:
    """(parsed example, None) when usable, else (None, rejection reason)."""
    try:
        data = parse_output(text, json_mode)
    except JSONRepairError:
        return None, "unparseable_json"
    reason = validate_example(request.family, data, request.knobs)
    return (None, reason) if reason else (data, None)


def dedup_text(record: dict) -> str:
    return f"{record['query']}\n{record['positive']}"


def export_sentence_transformers(examples: list[dict], out_dir: Path) -> dict[str, int]:
    """anchor/positive/negative columns (JSONL and Parquet); the query carries its instruction.
    Examples with negatives go to triplets, the matching families (no negative) to pairs. A split
    without rows gets no files (a reader cannot tell the columns of an empty JSONL file); its
    count of 0 in the returned dict, which goes into the manifest, says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"triplets": ("anchor", "positive", "negative"), "pairs": ("anchor", "positive")}
    rows = {name: [] for name in splits}
    for ex in examples:
        anchor = f"Instruct: {ex['instruction']}\nQuery: {ex['query']}"
        if ex["negatives"]:
            rows["triplets"].append({"anchor": anchor, "positive": ex["positive"], "negative": ex["negatives"][0]})
        else:
            rows["pairs"].append({"anchor": anchor, "positive": ex["positive"]})
    for name, columns in splits.items():
        jsonl, parquet = out_dir / f"{name}.jsonl", out_dir / f"{name}.parquet"
        if not rows[name]:  # and none left from an earlier export
            jsonl.unlink(missing_ok=True)
            parquet.unlink(missing_ok=True)
            continue
        with open(jsonl, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name])
        schema = pa.schema([(c, pa.string()) for c in columns])
        pq.write_table(pa.table({c: [r[c] for r in rows[name]] for c in columns}, schema=schema), parquet)
    return {name: len(split_rows) for name, split_rows in rows.items()}
