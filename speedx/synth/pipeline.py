"""A synthesis run: plan example slots, generate on the engine, validate, revise, dedup, write.

Every example slot s gets attempts a = 0, 1, ... until one is valid and new (or attempts run
out); the request for (s, a) follows from (seed, s, a) alone. Each finished request appends
exactly one line (an example or a rejection) with a flush + fsync, so killing the process at any
moment and re-running with the same arguments loses and duplicates nothing: the files say
which attempts are done.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.families import Family
from speedx.synth.prompts import generation_messages, revision_messages
from speedx.synth.records import PlannedRequest, check_example, dedup_text, example_record, rejection_record
from speedx.synth.run_files import JsonlAppender, read_jsonl
from speedx.synth.tasks import Task, hash_seed


@dataclass
class RunState:
    """What the run directory says is done."""

    attempts: Counter = field(default_factory=Counter)  # slot -> finished attempts
    filled: set = field(default_factory=set)  # slots holding a valid example
    examples: list = field(default_factory=list)
    rejections: list = field(default_factory=list)

    @classmethod
    def load(cls, out: Path) -> "RunState":
        state = cls()
        state.examples = list(read_jsonl(out / "examples.jsonl", repair=True))
        state.rejections = list(read_jsonl(out / "rejected.jsonl", repair=True))
        for record in state.examples + state.rejections:
            state.attempts[record["slot"]] += 1
        state.filled = {record["slot"] for record in state.examples}
        return state

    def has_attempts_left(self, slot: int, max_attempts: int) -> bool:
        return slot not in self.filled and self.attempts[slot] < max_attempts

    def open_slots(self, slots: list[int], max_attempts: int) -> list[int]:
        return [slot for slot in slots if self.has_attempts_left(slot, max_attempts)]


def shard_slots(num_examples: int, shard: tuple[int, int]) -> list[int]:
    index, count = shard
    return [s for s in range(num_examples) if s % count == index]


class Planner:
    def __init__(self, families: list[Family], weights: dict[str, float], tasks: list[Task], seed: int):
        self.families = families
        self.weights = [weights[f.name] for f in families]
        self.tasks = defaultdict(list)
        for task in tasks:
            self.tasks[task.family].append(task)
        self.seed = seed

    def family_of_slot(self, slot: int) -> Family:
        rng = random.Random(hash_seed(self.seed, slot))
        return rng.choices(self.families, weights=self.weights)[0]

    def request(self, slot: int, attempt: int) -> PlannedRequest:
        family = self.family_of_slot(slot)
        rng = random.Random(hash_seed(self.seed, slot, attempt))
        task = rng.choice(self.tasks[family.name])
        knobs = family.sample_knobs(rng)
        messages = generation_messages(family, task.task, knobs, rng)
        return PlannedRequest(slot, attempt, family, task.id, task.task, knobs, hash_seed(self.seed, slot, attempt, 1), messages)


class _EngineQueue:
    """Feeds one LLM's engine request by request and hands back (tag, output) as each finishes."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the engine is busy with another generate call")
        self.capacity = 2 * self.engine.scheduler.max_num_seqs  # a queue deep enough to keep batches full
        self.tags: dict[str, object] = {}
        self.errors: list = []
        self.submitted = 0

    @property
    def busy(self) -> bool:
        return bool(self.tags or self.errors)

    @property
    def has_room(self) -> bool:
        return len(self.tags) < self.capacity

    def submit(self, messages: list, params, tag) -> None:
        request_id = f"q{self.submitted}"
        self.submitted += 1
        try:
            self.engine.add_request(request_id, self.llm.apply_chat_template(messages), params)
        except ValueError as exc:  # e.g. a prompt longer than the model: this attempt fails alone
            self.errors.append((tag, _error_output(request_id, str(exc))))
            return
        self.tags[request_id] = tag

    def step(self):
        finished, self.errors = self.errors, []
        if self.tags:
            outputs, _ = self.engine.step()
            finished += [(self.tags.pop(out.request_id), out) for out in outputs]
        return finished

    def abort(self) -> None:
        self.engine.abort_all()
        self.tags.clear()


def _error_output(request_id: str, message: str):
    from speedx.engine.outputs import CompletionOutput, RequestOutput

    return RequestOutput(request_id, None, [], [CompletionOutput(0, "", [], "error")], error=message)


class SynthesisRun:
    def __init__(self, llm, planner: Planner, out: Path, slots: list[int], json_mode: str, params_factory,
                 max_attempts: int, model_name: str, revisor=None, progress=None, on_step=None):
        self.llm = llm
        self.planner = planner
        self.out = out
        self.slots = slots
        self.json_mode = json_mode
        self.params_factory = params_factory
        self.max_attempts = max_attempts
        self.model_name = model_name
        self.revisor = revisor
        self.progress = progress
        self.on_step = on_step  # called after every engine step (the CLI records its wall time there)
        self.state = RunState.load(out)
        self._in_revision: set[int] = set()  # slots whose valid example is with the revisor
        self.dedup = Deduplicator()
        for record in self.state.examples:  # resumed runs dedup against what is already written
            self.dedup.add(record["id"], dedup_text(record))

    def next_request(self, slot: int) -> PlannedRequest | None:
        if not self.state.has_attempts_left(slot, self.max_attempts):
            return None
        return self.planner.request(slot, self.state.attempts[slot])

    def run(self) -> None:
        """Keep the engine full: a rejected attempt is replaced by the slot's next one at once,
        so there are no rounds and no tail of half-empty batches waiting on the slowest request.
        With a revisor, each valid example goes to it once before it is written."""
        examples = JsonlAppender(self.out / "examples.jsonl")
        rejected = JsonlAppender(self.out / "rejected.jsonl")
        generator = _EngineQueue(self.llm)
        reviser = None
        if self.revisor:
            reviser = generator if self.revisor[0] is self.llm else _EngineQueue(self.revisor[0])
        queues = [generator] if reviser in (None, generator) else [generator, reviser]
        todo = deque(r for r in map(self.next_request, self.slots) if r is not None)
        try:
            while todo or any(q.busy for q in queues):
                while todo and generator.has_room:
                    request = todo.popleft()
                    generator.submit(request.messages, self._params(self.params_factory, request), ("generate", request))
                for queue in queues:
                    for (kind, item), out in queue.step():
                        if kind == "generate":
                            self._on_generated(item, out, examples, rejected, reviser)
                        else:
                            self._on_revised(*item, out, examples, rejected)
                        slot = item.slot if kind == "generate" else item[0].slot
                        waiting_for_revision = kind == "generate" and reviser and slot in self._in_revision
                        if not waiting_for_revision and (retry := self.next_request(slot)):
                            todo.append(retry)  # rejected or duplicate: the slot's next attempt
                if self.on_step:
                    self.on_step()
        finally:
            for queue in queues:
                queue.abort()
            examples.close()
            rejected.close()

    def _on_generated(self, request: PlannedRequest, out, examples, rejected, reviser) -> None:
        accepted = self._check(rejected, request, out)
        if accepted is None:
            return
        if reviser is None:
            self._accept(examples, rejected, request, *accepted, revised=False)
            return
        data, tokens = accepted
        self._in_revision.add(request.slot)
        messages = revision_messages(request.family, request.task, request.messages[0]["content"], data)
        reviser.submit(messages, self._params(self.revisor[1], request), ("revise", (request, data, tokens)))

    def _on_revised(self, request: PlannedRequest, data: dict, tokens: dict, out, examples, rejected) -> None:
        self._in_revision.discard(request.slot)
        tokens = dict(tokens, revisor_prompt_tokens=out.num_prompt_tokens, revisor_output_tokens=out.num_output_tokens)
        revised = None
        if out.error is None:
            revised, _ = check_example(request, out.outputs[0].text, self.json_mode)
        # The revisor rewrites once; a revision that breaks the example keeps the original.
        self._accept(examples, rejected, request, revised or data, tokens, revised=revised is not None)

    def _params(self, factory, request: PlannedRequest):
        schema = request.family.json_schema() if self.json_mode == "constrained" else None
        return factory(seed=request.seed, json_schema=schema)

    def _check(self, rejected, request: PlannedRequest, out) -> tuple[dict, dict] | None:
        """(example, token counts) when usable; otherwise the rejection is written and None returned."""
        text = out.outputs[0].text if out.error is None else ""
        tokens = {"prompt_tokens": out.num_prompt_tokens, "cached_tokens": out.num_cached_tokens,
                  "output_tokens": out.num_output_tokens}
        data, reason = (None, "engine_error") if out.error else check_example(request, text, self.json_mode)
        if data is None:
            self._reject(rejected, rejection_record(request, reason, text, tokens))
            return None
        return data, tokens

    def _accept(self, examples, rejected, request, data, tokens, revised: bool) -> None:
        record = example_record(request, data, self.model_name, revised, tokens)
        duplicate = self.dedup.check_and_add(record["id"], dedup_text(record))
        if duplicate:
            text = json.dumps(data, ensure_ascii=False)
            self._reject(rejected, rejection_record(request, f"duplicate_{duplicate}", text, tokens))
            return
        examples.write(record)
        self.state.examples.append(record)
        self.state.filled.add(request.slot)
        self.state.attempts[request.slot] += 1
        if self.progress:
            self.progress.update(record, valid=True)

    def _reject(self, rejected, record) -> None:
        rejected.write(record)
        self.state.rejections.append(record)
        self.state.attempts[record["slot"]] += 1
        if self.progress:
            self.progress.update(record, valid=False)


def summarize(state: RunState) -> dict:
    """Per-family counts and token totals, computed from the files (so they survive resumes)."""
    families: dict[str, dict] = defaultdict(lambda: {"requested": 0, "valid": 0, "rejected": Counter(), "duplicates": 0})
    totals = Counter()
    for record in state.examples:
        families[record["family"]]["valid"] += 1
    for record in state.rejections:
        row = families[record["family"]]
        if record["reason"].startswith("duplicate_"):
            row["duplicates"] += 1
        else:
            row["rejected"][record["reason"]] += 1
    for record in state.examples + state.rejections:
        families[record["family"]]["requested"] += 1
        for key in ("prompt_tokens", "cached_tokens", "output_tokens", "revisor_prompt_tokens", "revisor_output_tokens"):
            totals[key] += record.get(key, 0)
    return {"families": {k: {**v, "rejected": dict(v["rejected"])} for k, v in sorted(families.items())},
            "tokens": dict(totals), "examples": len(state.examples)}
