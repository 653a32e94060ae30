"""How a synthesis run schedules attempts, on a scripted engine: each attempt's text and length
follow from its seed, so which attempt fills a slot is known in advance."""

from __future__ import annotations

import json
import random
from functools import partial
from types import SimpleNamespace

import pytest

from speedx import SamplingParams
from speedx.engine.llm_engine import StepStats
from speedx.engine.outputs import CompletionOutput, RequestOutput
from speedx.synth.families import FAMILIES
from speedx.synth.pipeline import AttemptBudget, Planner, RunState, SynthesisRun
from speedx.synth.tasks import Task

STS = FAMILIES["sts"]
WORDS = "river stone lamp orchard violin harbor copper meadow lantern canyon falcon velvet".split()


def scripted_text(seed: int, valid_every: int) -> tuple[str, int]:
    """(output text, steps it takes): valid JSON for one seed in `valid_every`, else a broken one."""
    rng = random.Random(seed)
    if seed % valid_every:
        return "not json", 1 + seed % 5
    fields = {key: " ".join(rng.choices(WORDS, k=6)) + f" {key}" for key in STS.keys}
    return json.dumps(fields), 1 + seed % 5


class ScriptedEngine:
    """The part of LLMEngine a synthesis run uses; runs up to max_num_seqs requests per step."""

    def __init__(self, max_num_seqs: int, valid_every: int):
        self.max_num_seqs = max_num_seqs
        self.valid_every = valid_every
        self.requests: dict[str, list] = {}  # id -> [steps left, text]
        self.batches: list[int] = []
        self.aborted: list[str] = []
        self.submitted = 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self):
        return SimpleNamespace(max_num_seqs=self.max_num_seqs)

    def add_request(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        text, steps = scripted_text(params.seed, self.valid_every)
        self.submitted += 1
        self.requests[request_id] = [steps, text]

    def step(self):
        batch = list(self.requests)[: self.max_num_seqs]
        self.batches.append(len(batch))
        finished = []
        for request_id in batch:
            entry = self.requests[request_id]
            entry[0] -= 1
            if entry[0] == 0:
                del self.requests[request_id]
                finished.append(RequestOutput(request_id, None, [0] * 10, [CompletionOutput(0, entry[1], [1] * 7, "stop")]))
        return finished, StepStats(num_sequences=len(batch))

    def abort_request(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.requests.pop(request_id, None) is not None

    def abort_all(self) -> None:
        self.requests.clear()


class ScriptedLLM:
    device = "cpu"

    def __init__(self, max_num_seqs: int, valid_every: int = 3):
        self.engine = ScriptedEngine(max_num_seqs, valid_every)

    def apply_chat_template(self, messages: list) -> str:
        return messages[0]["content"]


def make_run(out, llm, num_slots: int = 12, max_attempts: int = 4, surplus: bool = True, on_step=None):
    out.mkdir(parents=True, exist_ok=True)
    planner = Planner([STS], {"sts": 1.0}, [Task("t0", "sts", "Sentences about parks.")], seed=7)
    return SynthesisRun(llm, planner, out, list(range(num_slots)), "repair", partial(SamplingParams, max_tokens=64),
                        max_attempts, "scripted", on_step=on_step, surplus=surplus)


def lowest_valid_attempt(planner: Planner, slot: int, valid_every: int) -> int:
    return next(a for a in range(1000) if scripted_text(planner.request(slot, a).seed, valid_every)[0] != "not json")


def winners(out) -> dict[int, int]:
    return {r["slot"]: r["attempt"] for r in RunState.load(out).examples}


def test_each_slot_gets_its_lowest_valid_attempt_however_many_run_at_once(tmp_path):
    runs = {}
    for name, max_num_seqs, surplus in (("one at a time", 1, False), ("no surplus", 64, False), ("surplus", 64, True)):
        run = make_run(tmp_path / name, ScriptedLLM(max_num_seqs))
        run.run()
        runs[name] = winners(tmp_path / name)
    expected = {s: lowest_valid_attempt(run.planner, s, 3) for s in range(12)}
    assert runs["one at a time"] == runs["no surplus"] == runs["surplus"] == expected


def test_surplus_keeps_the_batch_full_until_the_last_slot(tmp_path):
    plain, spare = ScriptedLLM(12), ScriptedLLM(12)
    plain_run = make_run(tmp_path / "plain", plain, surplus=False)
    plain_run.run()
    run = make_run(tmp_path / "spare", spare)
    run.run()
    assert min(spare.engine.batches[:-5]) == 12  # full until the last few steps of the last attempts
    assert run.occupancy.mean > 0.9 > plain_run.occupancy.mean
    assert len(spare.engine.batches) < len(plain.engine.batches)  # and the run takes fewer steps


def test_a_decided_slot_aborts_its_other_attempts_and_writes_finished_ones_as_surplus(tmp_path):
    llm = ScriptedLLM(12)
    run = make_run(tmp_path, llm)
    run.run()
    state = RunState.load(tmp_path)
    written = [r["id"] for r in state.examples + state.rejections]
    assert len(written) == len(set(written))  # no attempt twice
    assert llm.engine.aborted  # running attempts of decided slots were dropped, not written:
    assert len(written) + len(llm.engine.aborted) == llm.engine.submitted
    surplus = [r for r in state.rejections if r["reason"] == "surplus"]
    assert all(r["attempt"] > winners(tmp_path)[r["slot"]] for r in surplus)  # valid, but above the winner


def test_the_budget_ends_a_run_whose_slots_cannot_be_filled(tmp_path):
    llm = ScriptedLLM(8, valid_every=10**9)  # nothing is ever valid (except seed 0)
    run = make_run(tmp_path, llm, num_slots=5, max_attempts=2)
    run.run()
    state = RunState.load(tmp_path)
    budget = AttemptBudget.for_run(5, 2)
    assert state.num_attempts == budget.total == 10
    assert all(len(state.done[s]) <= budget.per_slot for s in range(5))
    assert "the run's 10 attempts were spent" in state.empty_slots_reason(list(range(5)), budget)
    assert not state.open_slots(list(range(5)), budget)


def test_one_slot_may_take_more_than_the_average_but_not_more_than_its_limit(tmp_path):
    llm = ScriptedLLM(4, valid_every=10**9)
    run = make_run(tmp_path, llm, num_slots=1, max_attempts=3)
    run.run()
    assert RunState.load(tmp_path).num_attempts == 12  # a run of one slot may spend that slot's limit
    llm = ScriptedLLM(4, valid_every=3)
    run = make_run(tmp_path / "many", llm, num_slots=30, max_attempts=2)
    run.run()
    done = RunState.load(tmp_path / "many").done
    assert 2 < max(len(d) for d in done.values()) <= 8  # slots that failed took what others did not use


@pytest.mark.parametrize("stop_after", [3, 7])
def test_a_run_stopped_midway_resumes_to_the_same_examples(tmp_path, stop_after):
    whole = make_run(tmp_path / "whole", ScriptedLLM(12))
    whole.run()
    steps = 0

    def stop():
        nonlocal steps
        steps += 1
        if steps == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_run(tmp_path / "cut", ScriptedLLM(12), on_step=stop).run()
    before = {r["id"] for r in (lambda s: s.examples + s.rejections)(RunState.load(tmp_path / "cut"))}
    make_run(tmp_path / "cut", ScriptedLLM(12)).run()
    state = RunState.load(tmp_path / "cut")
    ids = [r["id"] for r in state.examples + state.rejections]
    assert len(ids) == len(set(ids)) and before <= set(ids)
    assert winners(tmp_path / "cut") == winners(tmp_path / "whole")


def test_surplus_attempts_run_by_default_on_a_gpu_only(tmp_path):
    gpu = ScriptedLLM(4)
    gpu.device = "cuda:0"
    assert make_run(tmp_path / "g", gpu, surplus=None).surplus
    assert not make_run(tmp_path / "c", ScriptedLLM(4), surplus=None).surplus


def test_surplus_goes_to_the_slot_most_likely_to_need_it(tmp_path):
    """A slot whose family rarely succeeds gets the spare attempt before one that usually does,
    even when it already has more attempts running."""
    planner = Planner([STS, FAMILIES["retrieval"]], {"sts": 1.0, "retrieval": 1.0},
                      [Task("t0", "sts", "Parks."), Task("t1", "retrieval", "Find parks.")], seed=7)
    sts_slot = next(s for s in range(50) if planner.family_of_slot(s).name == "sts")
    hard_slot = next(s for s in range(50) if planner.family_of_slot(s).name == "retrieval")
    run = SynthesisRun(ScriptedLLM(4), planner, tmp_path, [sts_slot, hard_slot], "repair",
                       partial(SamplingParams, max_tokens=64), 4, "scripted")
    run.family_tries.update({"sts": 20, "retrieval": 20})
    run.family_valid.update({"sts": 18, "retrieval": 2})
    run.running = {sts_slot: {0: "q0"}, hard_slot: {0: "q1", 1: "q2"}}
    assert run._chance_all_fail(hard_slot) > run._chance_all_fail(sts_slot)
    run.family_valid["retrieval"] = 19
    assert run._chance_all_fail(hard_slot) < run._chance_all_fail(sts_slot)
