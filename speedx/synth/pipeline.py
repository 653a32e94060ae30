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

import torch
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from speedx.synth.dedup import Deduplicator
from speedx.synth.engine_queue import EngineQueue
from speedx.synth.families import Family
from speedx.synth.prompts import generation_messages, revision_messages
from speedx.synth.records import PlannedRequest, check_example, dedup_text, example_record, rejection_record
from speedx.synth.run_files import JsonlAppender, read_jsonl
from speedx.synth.tasks import Task, hash_seed


# A slot may take up to this many times --max-attempts when others need fewer; the run as a whole
# makes at most --max-attempts per slot on average, and never fewer than one slot's limit in all
# (a run of 2 slots may spend 16 attempts on one of them).
PER_SLOT_FACTOR = 4


@dataclass(frozen=True)
class AttemptBudget:
    """How many attempts the run may make: `total` in all, `per_slot` for any one slot."""

    total: int
    per_slot: int

    @classmethod
    def for_run(cls, num_slots: int, max_attempts: int) -> "AttemptBudget":
        per_slot = PER_SLOT_FACTOR * max_attempts
        return cls(total=max(max_attempts * num_slots, per_slot), per_slot=per_slot)


@dataclass
class RunState:
    """What the run directory says is done."""

    done: defaultdict = field(default_factory=lambda: defaultdict(set))  # slot -> finished attempt numbers
    filled: set = field(default_factory=set)  # slots holding a valid example
    examples: list = field(default_factory=list)
    rejections: list = field(default_factory=list)

    @classmethod
    def load(cls, out: Path) -> "RunState":
        state = cls()
        state.examples = list(read_jsonl(out / "examples.jsonl", repair=True))
        state.rejections = list(read_jsonl(out / "rejected.jsonl", repair=True))
        for record in state.examples + state.rejections:
            state.done[record["slot"]].add(attempt_of(record))
        state.filled = {record["slot"] for record in state.examples}
        return state

    @property
    def num_attempts(self) -> int:
        return len(self.examples) + len(self.rejections)

    def open_slots(self, slots: list[int], budget: AttemptBudget) -> list[int]:
        """Empty slots the budget still allows an attempt for."""
        if self.num_attempts >= budget.total:
            return []
        return [s for s in slots if s not in self.filled and len(self.done[s]) < budget.per_slot]

    def empty_slots_reason(self, slots: list[int], budget: AttemptBudget) -> str | None:
        """What kept the empty slots empty, or None when every slot is filled."""
        empty = [s for s in slots if s not in self.filled]
        if not empty:
            return None
        if self.num_attempts >= budget.total:
            return f"the run's {budget.total} attempts were spent ({len(empty)} slots empty)"
        return f"{len(empty)} slots each failed all of their {budget.per_slot} attempts"


def attempt_of(record: dict) -> int:
    """A record's attempt number (records made before the field existed have it in their id)."""
    return record["attempt"] if "attempt" in record else int(record["id"].rsplit("-a", 1)[1])


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


class SynthesisRun:
    """Fill each slot with its lowest-numbered valid, new attempt.

    Attempts of a slot are started in order (0, 1, ...). With `surplus` (default: on a GPU), when the
    engine has room and no slot waits for a first try, further attempts of the empty slots start
    early, so the batch stays as full as it began until the last slot is filled. A valid attempt
    waits for the slot's lower attempts still running; the lowest valid one wins, so the result does not depend on how
    many ran at once. Once a slot is decided its other running attempts are aborted (never written)
    and finished ones are written as rejected with reason "surplus", so their tokens are counted.
    """

    def __init__(self, llm, planner: Planner, out: Path, slots: list[int], json_mode: str, params_factory,
                 max_attempts: int, model_name: str, revisor=None, progress=None, on_step=None,
                 surplus: bool | None = None):
        self.llm = llm
        self.planner = planner
        self.out = out
        self.slots = slots
        self.json_mode = json_mode
        self.params_factory = params_factory
        self.budget = AttemptBudget.for_run(len(slots), max_attempts)
        self.model_name = model_name
        self.revisor = revisor
        self.progress = progress
        self.on_step = on_step  # called after every engine step (the CLI records its wall time there)
        # Surplus attempts pay where a bigger batch costs little more per step (a GPU). On a CPU the
        # step cost grows with the batch: bench/synthesis.py on 2 Zen 4 cores filled 32/32 slots in
        # 70 s without them, 30/32 in 79 s with them (the budget went to surplus), at equal tok/s.
        self.surplus = surplus if surplus is not None else torch.device(llm.device).type == "cuda"
        self.state = RunState.load(out)
        self.running: dict[int, dict[int, str | None]] = {}  # slot -> {attempt: request id}
        self.waiting: dict[int, dict[int, tuple]] = {}  # slot -> {attempt: (request, example, tokens)}
        self.unwritten = 0  # attempts started and not yet written or aborted
        self.in_revision: set[int] = set()  # slots whose winning example is with the revisor
        self.occupancy = None
        self.family_tries, self.family_valid = Counter(), Counter()  # attempts, and valid ones, per family
        for record in self.state.examples + self.state.rejections:
            self._count(record, valid=record.get("reason", "surplus") == "surplus")
        self.dedup = Deduplicator()
        for record in self.state.examples:  # resumed runs dedup against what is already written
            self.dedup.add(record["id"], dedup_text(record))

    # ------------------------------------------------------------------ which attempt next

    def _taken(self, slot: int) -> set[int]:
        return self.state.done[slot] | self.running.get(slot, {}).keys() | self.waiting.get(slot, {}).keys()

    def _can_start(self, slot: int) -> bool:
        if slot in self.state.filled or slot in self.in_revision:
            return False
        return (self.state.num_attempts + self.unwritten < self.budget.total
                and len(self._taken(slot)) < self.budget.per_slot)

    def _needs_first_try(self, slot: int) -> bool:
        return self._can_start(slot) and slot not in self.running and not self.waiting.get(slot)

    def _start(self, queue, slot: int) -> None:
        taken = self._taken(slot)
        attempt = next(a for a in range(len(taken) + 1) if a not in taken)  # a resume may have left gaps
        request = self.planner.request(slot, attempt)
        request_id = queue.submit(request.messages, self._params(self.params_factory, request), ("generate", request))
        self.running.setdefault(slot, {})[attempt] = request_id  # None: failed at once, its error is on its way
        self.unwritten += 1

    def _fill(self, queue, todo: deque, target_batch: int) -> None:
        """First tries from `todo` while the queue has room; then surplus attempts, up to the target
        batch, each for the running slot most likely to need one: the one whose running attempts
        all fail with the highest chance, at its family's valid rate so far."""
        while todo and queue.has_room:
            slot = todo.popleft()
            if self._needs_first_try(slot):
                self._start(queue, slot)
        if todo or not self.surplus:
            return
        while queue.in_flight < target_batch:
            candidates = [s for s in self.running if self._can_start(s)]
            if not candidates:
                return
            self._start(queue, max(candidates, key=lambda s: (self._chance_all_fail(s), -s)))

    def _chance_all_fail(self, slot: int) -> float:
        family = self.planner.family_of_slot(slot).name
        valid_rate = (self.family_valid[family] + 1) / (self.family_tries[family] + 2)  # Laplace: no data -> 1/2
        return (1 - valid_rate) ** len(self.running[slot])

    def _count(self, record: dict, valid: bool) -> None:
        self.family_tries[record["family"]] += 1
        self.family_valid[record["family"]] += valid

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Keep the engine full until every slot is decided or the budget is spent. With a revisor,
        each slot's winning example goes to it once before it is written."""
        files = (JsonlAppender(self.out / "examples.jsonl"), JsonlAppender(self.out / "rejected.jsonl"))
        generator = EngineQueue(self.llm)
        self.occupancy = generator.occupancy
        reviser = None
        if self.revisor:
            reviser = generator if self.revisor[0] is self.llm else EngineQueue(self.revisor[0])
        queues = [generator] if reviser in (None, generator) else [generator, reviser]
        todo = deque(self.state.open_slots(self.slots, self.budget))
        target_batch = min(len(todo), generator.max_batch)  # the batch the run starts with
        try:
            while True:
                self._fill(generator, todo, target_batch)
                if not any(q.busy for q in queues):
                    break
                for queue in queues:
                    for (kind, item), out in queue.step(target_batch):
                        slot = item.slot if kind == "generate" else item[0].slot
                        if kind == "generate":
                            self._on_generated(item, out, files, generator, reviser)
                        else:
                            self._on_revised(*item, out, files)
                        if self._needs_first_try(slot):
                            todo.append(slot)  # every attempt so far failed: the slot's next one
                if self.on_step:
                    self.on_step()
        finally:
            for queue in queues:
                queue.abort_all()
            for file in files:
                file.close()

    def _on_generated(self, request: PlannedRequest, out, files, generator, reviser) -> None:
        running = self.running.get(request.slot, {})
        if running.pop(request.attempt, False) is False:
            return  # aborted when its slot was decided: not written, not counted
        if not running:
            del self.running[request.slot]
        accepted = self._check(files[1], request, out)
        if accepted is not None:
            self.waiting.setdefault(request.slot, {})[request.attempt] = (request, *accepted)
        if request.slot in self.waiting:  # a lower attempt's failure may let a waiting one win
            self._decide(request.slot, files, generator, reviser)

    def _decide(self, slot: int, files, generator, reviser) -> None:
        """Take the slot's lowest valid attempt once no lower attempt is still running."""
        waiting = self.waiting[slot]
        while waiting and slot not in self.in_revision and slot not in self.state.filled:
            attempt = min(waiting)
            if any(a < attempt for a in self.running.get(slot, {})):
                return
            request, data, tokens = waiting.pop(attempt)
            if reviser is None:
                self._accept(files, request, data, tokens, revised=False)
            else:
                self.in_revision.add(slot)
                messages = revision_messages(request.family, request.task, request.messages[0]["content"], data)
                reviser.submit(messages, self._params(self.revisor[1], request), ("revise", (request, data, tokens)))
        if slot in self.state.filled or slot in self.in_revision:
            for request, data, tokens in waiting.values():
                text = json.dumps(data, ensure_ascii=False)
                self._reject(files[1], rejection_record(request, "surplus", text, tokens))
            waiting.clear()
            for request_id in self.running.pop(slot, {}).values():
                if request_id is not None:  # None: it failed at submit; its error output is dropped above
                    generator.abort(request_id)
                self.unwritten -= 1
        if not waiting:
            del self.waiting[slot]

    def _on_revised(self, request: PlannedRequest, data: dict, tokens: dict, out, files) -> None:
        self.in_revision.discard(request.slot)
        tokens = dict(tokens, revisor_prompt_tokens=out.num_prompt_tokens, revisor_output_tokens=out.num_output_tokens)
        revised = None
        if out.error is None:
            revised, _ = check_example(request, out.outputs[0].text, self.json_mode)
        # The revisor rewrites once; a revision that breaks the example keeps the original.
        self._accept(files, request, revised or data, tokens, revised=revised is not None)

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

    def _accept(self, files, request, data, tokens, revised: bool) -> None:
        examples, rejected = files
        record = example_record(request, data, self.model_name, revised, tokens)
        duplicate = self.dedup.check_and_add(record["id"], dedup_text(record))
        if duplicate:
            text = json.dumps(data, ensure_ascii=False)
            self._reject(rejected, rejection_record(request, f"duplicate_{duplicate}", text, tokens))
            return
        examples.write(record)
        self.state.examples.append(record)
        self.state.filled.add(request.slot)
        self.state.done[request.slot].add(request.attempt)
        self.unwritten -= 1
        self._count(record, valid=True)
        if self.progress:
            self.progress.update(record, valid=True, occupancy=self.occupancy.mean)

    def _reject(self, rejected, record) -> None:
        rejected.write(record)
        self.state.rejections.append(record)
        self.state.done[record["slot"]].add(attempt_of(record))
        self.unwritten -= 1
        self._count(record, valid=record["reason"] == "surplus")
        if self.progress:
            self.progress.update(record, valid=False, occupancy=self.occupancy.mean)


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
