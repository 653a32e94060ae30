"""Where task definitions come from: a user's tasks file, or topics brainstormed by the model."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from speedx.hashing import splitmix64
from speedx.synth.dedup import Deduplicator
from speedx.synth.families import FAMILIES, Family
from speedx.synth.json_repair import JSONRepairError, parse_json_object
from speedx.synth.prompts import brainstorm_messages, brainstorm_schema
from speedx.synth.report import BrainstormProgress
from speedx.synth.run_files import numbered_json_lines

MAX_TOPIC_DEPTH = 4
TASK_WORDS = (3, 40)  # a task definition is a sentence, not a word and not an essay


@dataclass(frozen=True)
class Task:
    id: str
    family: str
    task: str
    topic: str | None = None
    source: str = "file"  # "file" or "brainstorm"

    def to_json(self) -> dict:
        return asdict(self)


def truncate_topic(path: str) -> str:
    """Paths deeper than 4 levels keep their first two and last two parts."""
    parts = [p.strip() for p in path.split(">") if p.strip()]
    if len(parts) > MAX_TOPIC_DEPTH:
        parts = parts[:2] + parts[-2:]
    return " > ".join(parts)


def load_topics(path: str | None) -> list[str]:
    if path is None:
        text = (resources.files("speedx.synth") / "data" / "topics.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --topics file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ValueError(f"--topics file {path} is not UTF-8 text") from None
    topics = list(dict.fromkeys(truncate_topic(line) for line in text.splitlines() if line.strip()))
    if not topics:
        raise ValueError(f"--topics file {path} holds no topics (one per line, levels joined by ' > ')")
    return topics


def load_tasks_file(path: str, families: list[Family]) -> list[Task]:
    """JSONL ({"task": ..., "family": optional}) or plain lines; a line without a family serves every
    selected family. Errors name the file and line."""
    selected = {f.name for f in families}
    try:
        # "\n" only: splitlines() would also split at U+2028 and the like inside a JSON string
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --tasks file {path}: {exc}") from exc
    tasks: list[Task] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        topic = None
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}); write one JSON object or one plain task per line")
            text, family, topic = record.get("task"), record.get("family"), record.get("topic")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f'{where}: needs a non-empty "task" string')
            if family is not None and not isinstance(family, str):
                raise ValueError(f'{where}: "family" must be one family name as a string, e.g. "sts"')
            if family is not None and family not in FAMILIES:
                raise ValueError(f"{where}: unknown family {family!r}; choose from {', '.join(FAMILIES)}")
            if topic is not None and not isinstance(topic, str):
                raise ValueError(f'{where}: "topic" must be a string')
            names = [family] if family else sorted(selected)
        else:
            text, names = line, sorted(selected)
        for name in names:
            if name in selected:
                tasks.append(Task(f"t{len(tasks)}", name, text.strip(), topic))
    missing = selected - {t.family for t in tasks}
    if missing:
        raise ValueError(f"--tasks file {path} has no task for families {sorted(missing)}")
    return tasks


def load_saved_tasks(path: Path, families: list[Family]) -> list[Task]:
    """tasks.jsonl of a run being resumed ([] when it has none yet). Every request is planned from
    it, so a file cut short (older versions wrote it line by line) or edited must stop the run."""
    if not path.exists():
        return []
    fix = "delete it to make the tasks again, or use a new --out"
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ValueError(f"{path} is cut off in its last line (a run killed while writing it): {fix}")
    tasks = []
    try:
        for number, record in numbered_json_lines(path, data.decode("utf-8")):
            try:
                task = Task(**record)
            except TypeError:  # not an object, or other keys
                task = None
            if task is None or not all(isinstance(v, str) for v in (task.id, task.family, task.task)):
                raise ValueError(f"{path}:{number}: not a task record")
            tasks.append(task)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: {fix}") from None
    except ValueError as exc:
        raise ValueError(f"{exc}: {fix}") from None
    missing = {f.name for f in families} - {t.family for t in tasks}
    if tasks and missing:
        raise ValueError(f"{path} has no task for families {sorted(missing)} (cut short?): {fix}")
    return tasks


def brainstorm_tasks(llm, families: list[Family], topics: list[str], num_topics: int, seed: int,
                     json_mode: str, params_factory, show_progress: bool = False) -> tuple[list[Task], dict]:
    """Ask the model for task definitions per (topic, family); keep one per topic, drop near-duplicates."""
    rng = random.Random(seed)
    chosen = rng.sample(topics, min(num_topics, len(topics)))
    jobs = [(topic, family) for topic in chosen for family in families]
    prompts = [llm.apply_chat_template(brainstorm_messages(family, topic)) for topic, family in jobs]
    schema = brainstorm_schema() if json_mode == "constrained" else None
    params = [params_factory(seed=hash_seed(seed, i), json_schema=schema) for i in range(len(jobs))]
    seen = Deduplicator(threshold=0.8)
    tasks, stats = [], {"requests": len(jobs), "kept": 0, "unusable": 0, "duplicates": 0, "output_tokens": 0,
                        "prompt_tokens": 0}
    progress = BrainstormProgress(len(jobs)) if show_progress else None
    finished = []
    for index, out in llm.stream(prompts, params):
        finished.append((index, out))
        if progress:
            progress.update(out.num_output_tokens, bool(task_candidates(answer_text(out))))
    if progress:
        progress.close()
    # Which tasks are kept (the first of near-duplicates) is decided in request order: runs repeat.
    for index, out in sorted(finished, key=lambda pair: pair[0]):
        topic, family = jobs[index]
        stats["output_tokens"] += out.num_output_tokens
        stats["prompt_tokens"] += out.num_prompt_tokens
        candidates = task_candidates(answer_text(out))
        kept = None
        for text in candidates:
            if seen.check_and_add(f"{family.name}:{text}", f"{family.name} {text}") is None:
                kept = text
                break
        if kept is None:
            stats["duplicates" if candidates else "unusable"] += 1
            continue
        tasks.append(Task(f"b{index}", family.name, kept, topic, "brainstorm"))
    stats["kept"] = len(tasks)
    return tasks, stats


def answer_text(out) -> str:
    return out.outputs[0].text if out.error is None else ""


def task_candidates(text: str) -> list[str]:
    try:
        items = parse_json_object(text).get("tasks", [])
    except JSONRepairError:
        return []
    low, high = TASK_WORDS
    return [t.strip() for t in items if isinstance(t, str) and low <= len(t.split()) <= high]


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for strings)."""
    value = 0
    for part in parts:
        value = splitmix64(value ^ (part & (2**64 - 1)))
    return value >> 1
