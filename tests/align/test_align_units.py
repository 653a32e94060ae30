"""Alignment pipeline pieces without training: config and presets, the judge's verdicts and retries,
stage selection, and the report, with a scripted teacher standing in for the API."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from speedx.align.config import PRESETS, load_config
from speedx.align.pipeline import stage_range
from speedx.align.prompts import check_verdict, judge_messages, retry_messages
from speedx.align.stages import Context, judge, write_jsonl


def test_presets_and_file_overrides(tmp_path):
    tiny = load_config(preset="tiny")
    assert tiny.teacher.base_url == "local" and tiny.counts.seed_examples == PRESETS["tiny"]["counts"]["seed_examples"]
    assert tiny.dpo_beta == 0.1 and tiny.dpo.lr == 1e-5 and tiny.revisor.batch_size == 2  # SPEED's values survive
    path = tmp_path / "pipeline.toml"
    path.write_text('out = "runs/a"\n[counts]\nseed_examples = 7\n[teacher]\nmodel = "judge-9"\n')
    config = load_config(path, preset="tiny", out="elsewhere")
    assert (config.counts.seed_examples, config.teacher.model, config.out) == (7, "judge-9", "elsewhere")
    assert config.counts.root_prompts == tiny.counts.root_prompts  # untouched keys keep the preset's


@pytest.mark.parametrize("text,match", [
    ("[counts]\nseed_exampels = 3\n", "unknown setting 'seed_exampels'"),
    ("counts = 3\n", "must be a table"),
    ("[counts\n", "not valid TOML"),
    ("[counts]\ncandidates = 1\n", "candidates must be >= 2"),
    ('[counts]\ntopics = "4"\n', "counts.topics must be int, got '4'"),
    ("[counts]\nseed_examples = -5\n", "counts.seed_examples must be >= 1"),
    ("[counts]\ntopics = 100000\n", "counts.topics must be at most"),
    ("[seed]\nx = 1\n", "seed must be int"),
    ("[sft]\nlr = true\n", "sft.lr must be float"),
    ("[teacher]\nconcurrency = 0\n", "teacher.concurrency must be >= 1"),
    ('[student]\nfamilies = "classification,nosuch"\n', "unknown families"),
    ("[generation]\ntop_p = 0\n", "generation.top_p in"),
])
def test_bad_config_is_refused(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_stage_range():
    assert stage_range(None, None)[0] == "brainstorm" and stage_range(None, None)[-1] == "final"
    assert stage_range("judge", "revisions") == ["judge", "senior_dpo", "revisions"]
    with pytest.raises(ValueError, match="comes after"):
        stage_range("final", "seed")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_range("sft", None)


def test_verdicts():
    assert check_verdict({"best": 2, "worst": "1"}, 3) == (1, 0)
    for bad, match in [({"best": 1, "worst": 1}, "different"), ({"best": 4, "worst": 1}, "from 1 to 3"),
                       ({"worst": 2}, "best"), ({"best": True, "worst": 2}, "best")]:
        with pytest.raises(ValueError, match=match):
            check_verdict(bad, 3)
    first = judge_messages("write a thing", ["a", "b"])
    again = retry_messages(first, "oops", "bad")
    assert again[: len(first)] == first and again[-2]["content"] == "oops" and "bad" in again[-1]["content"]


class ScriptedTeacher:
    """chat_many answers from a function of the last user message; records every request."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def chat_many(self, requests, stage):
        self.requests += [(stage, r) for r in requests]
        replies = []
        for r in requests:
            text = self.answer(r["messages"])
            replies.append(SimpleNamespace(ok=True, text=text, json=lambda t=text: json.loads(t)))
        return replies


def test_judge_retries_invalid_verdicts_then_skips(tmp_path):
    config = load_config(preset="tiny", out=str(tmp_path))
    config.counts.judge_retries = 1
    ctx = Context(config, tmp_path)
    prompts = [{"messages": [{"role": "user", "content": f"prompt {i}"}], "candidates": [f"c{i}-{j}" for j in range(3)]}
               for i in range(3)]
    write_jsonl(ctx.dir("root") / "root.jsonl", prompts)

    def answer(messages):
        prompt = messages[0]["content"]
        if "prompt 0" in prompt:
            return '{"reason": "fine", "best": 3, "worst": 1}'
        if "prompt 1" in prompt:  # invalid first, valid once told what was wrong
            return '{"best": 2, "worst": 2}' if len(messages) == 1 else '{"reason": "", "best": 2, "worst": 3}'
        return "no verdict at all"  # never valid: skipped after its retry

    ctx.teacher = ScriptedTeacher(answer)
    stats = judge(ctx)
    assert (stats["examples_out"], stats["retried"], stats["skipped"]) == (2, 2, 1)
    assert len(ctx.teacher.requests) == 5 and all(r["temperature"] == 0.0 for _, r in ctx.teacher.requests)
    pairs = [json.loads(line) for line in (tmp_path / "judge" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c0-2", "c0-0"), ("c1-1", "c1-2")]


def failure(kind, status=None):
    return SimpleNamespace(ok=False, kind=kind, error=f"{kind} {status}", status=status)


@pytest.mark.parametrize("results, error, match", [
    ([failure("failed", 401), failure("not_run")], "TeacherUnusable", r"refused the requests .*\$SPEEDX_TEACHER_API_KEY"),
    ([SimpleNamespace(ok=True), failure("not_run")], "BudgetReached", "budget ran out"),
    ([failure("failed"), failure("failed")], "TeacherUnusable", "every teacher call of stage 'seed' failed"),
])
def test_teacher_failures_stop_the_stage_with_their_cause(tmp_path, results, error, match):
    from speedx.align import stages

    ctx = Context(load_config(preset="tiny", out=str(tmp_path)), tmp_path)
    ctx.teacher = SimpleNamespace(chat_many=lambda requests, stage: results)
    with pytest.raises(getattr(stages, error), match=match):
        ctx.ask("seed", [{}] * len(results))


def test_a_run_resumes_only_with_its_settings(tmp_path, capsys):
    from speedx.align.cli import main

    config = load_config(preset="tiny", out=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    changed = tmp_path / "changed.toml"
    changed.write_text("[counts]\nseed_examples = 9\n[teacher]\nmax_calls = 999\n")
    assert main(["run", str(changed), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "other settings (counts.seed_examples)" in err and "--from STAGE" in err  # a budget may change
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--preset", "tiny", "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2  # no run there: nothing printed or written
    assert "not an alignment run directory" in capsys.readouterr().err and not any((tmp_path / "empty").iterdir())


def test_from_redoes_the_stage_and_every_later_one(tmp_path, monkeypatch):
    from speedx.align import pipeline

    config = load_config(preset="tiny", out=str(tmp_path))
    ran = []
    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {name: (lambda ctx, name=name: ran.append(name) or {})
                                                      for name in pipeline.STAGES})
    for name in pipeline.STAGES:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"status": "complete"}')
    assert pipeline.run_pipeline(config, log=lambda *a: None) == 0 and ran == []
    assert pipeline.run_pipeline(config, from_stage="revisor_sft", log=lambda *a: None) == 0
    assert ran == ["revisor_sft", "final"]

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "final", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(config, from_stage="final", log=lambda *a: None)
    manifest = json.loads((tmp_path / "final" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["seconds"] >= 0  # its time counts on resume
