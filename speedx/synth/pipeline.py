"""A synthesis run: plan example slots, generate on the engine, validate, revise, dedup, write.

Every example slot s gets attempts a = 0, 1, ... until one is valid and new (or attempts run
out); the request for (s, a) follows from (seed, s, a) alone. Each finished request appends
exactly one line (an example or a rejection) with a flush + fsync, so killing the process at any
moment and re-running with the same arguments loses and duplicates nothing: the files say
which attempts are done.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.families import Family
from speedx.synth.prompts import generation_messages, revision_messages
from speedx.synth.records import (
    PlannedRequest, check_example, dedup_text, example_record, family_of, rejection_record,
)
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


class SynthesisRun:
    def __init__(self, llm, planner: Planner, out: Path, slots: list[int], json_mode: str, params_factory,
                 max_attempts: int, model_name: str, revisor=None, progress=None):
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
        self.state = RunState.load(out)
        self.dedup = Deduplicator()
        for record in self.state.examples:  # resumed runs dedup against what is already written
            self.dedup.add(record["id"], dedup_text(record))

    def pending(self) -> list[PlannedRequest]:
        return [
            self.planner.request(slot, self.state.attempts[slot])
            for slot in self.slots
            if slot not in self.state.filled and self.state.attempts[slot] < self.max_attempts
        ]

    def run(self) -> None:
        examples = JsonlAppender(self.out / "examples.jsonl")
        rejected = JsonlAppender(self.out / "rejected.jsonl")
        try:
            while requests := self.pending():
                self._round(requests, examples, rejected)
        finally:
            examples.close()
            rejected.close()

    def _round(self, requests: list[PlannedRequest], examples: JsonlAppender, rejected: JsonlAppender) -> None:
        schema_of = lambda r: r.family.json_schema() if self.json_mode == "constrained" else None  # noqa: E731
        prompts = [self.llm.apply_chat_template(r.messages) for r in requests]
        params = [self.params_factory(seed=r.seed, json_schema=schema_of(r)) for r in requests]
        accepted = []  # (request, data, tokens) awaiting the revisor
        for index, out in self.llm.stream(prompts, params):
            request = requests[index]
            text = out.outputs[0].text if out.error is None else ""
            tokens = {"prompt_tokens": out.num_prompt_tokens, "cached_tokens": out.num_cached_tokens,
                      "output_tokens": out.num_output_tokens}
            data, reason = (None, f"engine_error") if out.error else check_example(request, text, self.json_mode)
            if data is None:
                self._reject(rejected, rejection_record(request, reason, text, tokens))
            elif self.revisor is None:
                self._accept(examples, rejected, request, data, tokens, revised=False)
            else:
                accepted.append((request, data, tokens))
        if accepted:
            self._revise_and_accept(accepted, examples, rejected)

    def _revise_and_accept(self, accepted, examples, rejected) -> None:
        revisor, revisor_params = self.revisor
        prompts = [
            revisor.apply_chat_template(revision_messages(r.family, r.task, r.messages[0]["content"], data))
            for r, data, _ in accepted
        ]
        params = [revisor_params(seed=r.seed, json_schema=r.family.json_schema() if self.json_mode == "constrained" else None)
                  for r, _, _ in accepted]
        for index, out in revisor.stream(prompts, params):
            request, data, tokens = accepted[index]
            tokens = dict(tokens, revisor_prompt_tokens=out.num_prompt_tokens, revisor_output_tokens=out.num_output_tokens)
            revised, reason = (None, "engine_error") if out.error else check_example(request, out.outputs[0].text, self.json_mode)
            # The revisor rewrites once; a revision that breaks the example keeps the original.
            self._accept(examples, rejected, request, revised or data, tokens, revised=revised is not None)

    def _accept(self, examples, rejected, request, data, tokens, revised: bool) -> None:
        record = example_record(request, data, self.model_name, revised, tokens)
        duplicate = self.dedup.check_and_add(record["id"], dedup_text(record))
        if duplicate:
            self._reject(rejected, rejection_record(request, f"duplicate_{duplicate}", str(data), tokens))
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
