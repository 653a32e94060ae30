"""Synthesis building blocks that need no model: families, prompts, validation, tasks, run files, CLI errors."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import speedx
from speedx.generate import build_parser, check_arguments
from speedx.generate import main as generate_main
from speedx.synth.families import FAMILIES, parse_families, parse_mix
from speedx.synth.prompts import generation_messages, guideline_bullets
from speedx.synth.run_files import JsonlAppender, lock_run_dir, read_jsonl
from speedx.synth.tasks import Task, load_tasks_file, truncate_topic
from speedx.synth.validate import validate_example


@pytest.fixture
def no_model(monkeypatch):
    """The commands under test must stop before they load a model."""
    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the command went on to load a model")

        @classmethod
        def from_config(cls, config):
            return cls()

    monkeypatch.setattr(speedx, "LLM", Refuse)


class FakeLLM:
    """Enough of an LLM for run_generate with --json-mode repair and a tasks file, when the
    synthesis itself is patched out."""

    device = "cpu"

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def from_config(cls, config):
        return cls(**config.as_dict())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompt_names_every_key_and_fills_every_knob(name):
    family = FAMILIES[name]
    for seed in range(20):
        rng = random.Random(seed)
        knobs = family.sample_knobs(rng)
        content = generation_messages(family, "Some task.", knobs, rng)[0]["content"]
        assert all(f'"{key}"' in content for key in family.keys)
        assert "{" not in content.replace("{}", "")  # no unfilled placeholder
        assert "Task: Some task." in content and "Output only the JSON object" in content
        for value in knobs.values():
            if any(f"{{{k}}}" in g for g in family.guidelines for k in knobs if knobs[k] == value):
                assert value in content


def test_optional_knob_drops_its_guideline():
    family = FAMILIES["retrieval"]
    knobs = {"query_type": "common", "query_length": "5 to 15 words", "clarity": "clear", "num_words": "100"}
    bullets = guideline_bullets(family, knobs, random.Random(0))
    assert not any("level knowledge" in b for b in bullets)
    bullets = guideline_bullets(family, knobs | {"difficulty": "PhD"}, random.Random(0))
    assert any("PhD level knowledge" in b for b in bullets)


def test_knob_weights_are_respected():
    knob = next(k for k in FAMILIES["retrieval"].knobs if k.name == "query_type")
    rng = random.Random(1)
    draws = [knob.sample(rng) for _ in range(5000)]
    assert abs(draws.count("long-tail") / 5000 - 0.5) < 0.03
    assert abs(draws.count("common") / 5000 - 0.1) < 0.02


def test_schema_requires_exactly_the_keys():
    schema = FAMILIES["classification"].json_schema()
    assert schema["required"] == ["input_text", "label", "misleading_label"]
    assert schema["additionalProperties"] is False


def test_mix_and_families():
    fams = parse_families(None)
    assert [f.name for f in fams] == ["classification", "sts", "retrieval", "short_short", "long_long"]
    assert [f.name for f in parse_families(None, "default")] == ["classification", "sts", "retrieval", "short_short"]
    assert [f.name for f in parse_families("long_long", "default")] == ["long_long"]  # named: it runs
    weights = parse_mix("7:7:7:2", fams)
    assert weights == {"classification": 7, "sts": 7, "retrieval": 7, "short_short": 1, "long_long": 1}
    assert parse_mix("retrieval=3,sts=1", parse_families("retrieval,sts")) == {"retrieval": 3.0, "sts": 1.0}
    with pytest.raises(ValueError, match="unknown families"):
        parse_families("retrieval,poetry")
    with pytest.raises(ValueError, match="bad --mix"):
        parse_mix("1:2", fams)
    with pytest.raises(ValueError, match="not selected"):
        parse_mix("bitext=1", fams)


GOOD = {
    "retrieval": {"user_query": "best soil for tomatoes",
                  "positive_document": " ".join(["Tomatoes grow best in loose loamy soil rich in compost."] * 8),
                  "hard_negative_document": " ".join(["Potatoes prefer sandy acidic soil with good drainage."] * 8)},
    "classification": {"input_text": "The blender broke after two days and the company ignored my emails completely.",
                       "label": "negative", "misleading_label": "neutral"},
    "sts": {"S1": "The park opens at dawn.", "S2": "At sunrise the park gates open.", "S3": "The park has a small pond."},
}
KNOBS = {
    "retrieval": {"query_type": "common", "query_length": "fewer than 5 words", "clarity": "clear", "num_words": "100"},
    "classification": {"num_words": "at least 10", "clarity": "clear"},
    "sts": {"unit": "sentence", "high_score": "4", "low_score": "3"},
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_valid_examples_pass(name):
    assert validate_example(FAMILIES[name], GOOD[name], KNOBS[name]) is None


@pytest.mark.parametrize(
    "name, change, reason",
    [
        ("retrieval", {"extra": "x"}, "wrong_keys"),
        ("retrieval", {"user_query": "  "}, "empty_field"),
        ("retrieval", {"user_query": 3}, "non_string_field"),
        ("retrieval", {"positive_document": "Best soil for tomatoes!"}, "document_copies_query"),
        ("retrieval", {"user_query": "which kind of soil do tomatoes like best in a small home garden when the "
                       "summer is dry and hot and the beds get sun all day"}, "too_long:user_query"),
        ("retrieval", {"positive_document": "Loamy soil."}, "too_short:positive_document"),
        ("classification", {"misleading_label": "Negative"}, "label_equals_misleading_label"),
        ("sts", {"S3": "the park opens at dawn"}, "fields_not_distinct"),
    ],
)
def test_rejections_name_their_reason(name, change, reason):
    data = {**GOOD[name], **change}
    assert validate_example(FAMILIES[name], data, KNOBS[name]) == reason


def test_lengths_are_checked_against_a_passage_and_a_sentence_not_the_exact_count():
    """A 500-word request answered with 25 words is a passage (kept); with 8, not one (rejected). A
    "fewer than 5 words" query of 12 words is still a query; one of 25 is not."""
    knobs = dict(KNOBS["retrieval"], num_words="500")
    doc = " ".join(["Tomatoes grow best in loose loamy soil."] * 4)  # 28 words
    data = dict(GOOD["retrieval"], positive_document=doc, hard_negative_document=doc.replace("Tomatoes", "Beans"))
    assert validate_example(FAMILIES["retrieval"], data, knobs) is None
    short = dict(data, positive_document="Tomatoes like loose loamy soil with compost.")
    assert validate_example(FAMILIES["retrieval"], short, knobs) == "too_short:positive_document"
    query = "which soil is best for growing tomatoes in pots on a balcony"
    assert validate_example(FAMILIES["retrieval"], dict(data, user_query=query), knobs) is None
    knobs = {"num_words": "at least 200", "clarity": "clear"}
    text = GOOD["classification"]["input_text"]  # 13 words
    assert validate_example(FAMILIES["classification"], GOOD["classification"], knobs) == "too_short:input_text"
    longer = dict(GOOD["classification"], input_text=f"{text} {text}")
    assert validate_example(FAMILIES["classification"], longer, knobs) is None


def test_topic_paths_keep_first_two_and_last_two():
    assert truncate_topic("A > B > C > D > E > F") == "A > B > E > F"
    assert truncate_topic("A>B>C") == "A > B > C"


def test_tasks_file_formats(tmp_path):
    fams = parse_families("retrieval,sts")
    path = tmp_path / "tasks.txt"
    path.write_text("Find recipes for a dish.\n\n" + json.dumps({"task": "Similar park sentences.", "family": "sts"}) + "\n")
    tasks = load_tasks_file(str(path), fams)
    assert [(t.family, t.task) for t in tasks] == [
        ("retrieval", "Find recipes for a dish."), ("sts", "Find recipes for a dish."), ("sts", "Similar park sentences.")]


@pytest.mark.parametrize("content, message", [
    ('{"task": "ok", "family": "sts"}\n{"task": broken}\n', r"tasks.txt:2: not valid JSON"),
    ('{"task": "ok", "family": "poetry"}\n', r"tasks.txt:1: unknown family 'poetry'"),
    ('{"task": "only sts", "family": "sts"}\n', r"no task for families \['retrieval'\]"),
    ('{"task": "ok", "family": "sts"}\n{"task": "ok", "family": ["sts"]}\n', r'tasks.txt:2: "family" must be one family name'),
    ('{"task": "ok", "topic": {"a": 1}}\n', r'tasks.txt:1: "topic" must be a string'),
])
def test_tasks_file_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "tasks.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tasks_file(str(path), parse_families("retrieval,sts"))


def test_line_separators_inside_json_strings_stay_in_the_record(tmp_path):
    """json.dumps(ensure_ascii=False) writes these raw; only "\n" ends a JSONL record."""
    text = "a\u2028b\u2029c\x85d\x1ce\x1df\x1eg\vh\fi\rj"
    path = tmp_path / "x.jsonl"
    writer = JsonlAppender(path)
    writer.write({"id": 1, "text": text})
    writer.write({"id": 2, "text": "plain"})
    writer.close()
    assert list(read_jsonl(path, repair=True)) == [{"id": 1, "text": text}, {"id": 2, "text": "plain"}]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(json.dumps({"task": f"Find {text}.", "family": "sts"}, ensure_ascii=False).encode() + b"\r\n"
                      + b"A plain task.\r\n")
    assert [t.task for t in load_tasks_file(str(tasks), parse_families("sts"))] == [f"Find {text}.", "A plain task."]


def test_torn_last_line_is_cut_on_resume(tmp_path):
    path = tmp_path / "x.jsonl"
    writer = JsonlAppender(path)
    writer.write({"id": 1})
    writer.write({"id": 2})
    writer.close()
    with open(path, "a") as f:
        f.write('{"id": 3, "tex')  # a write killed half way
    assert [r["id"] for r in read_jsonl(path, repair=True)] == [1, 2]
    assert path.read_text().endswith("}\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--families", "retrieval,poetry"], "unknown families"),
        (["--mix", "1:2:3"], "bad --mix"),
        (["--mix", "retrieval=1,,sts=1"], "write name=weight pairs"),
        (["--mix", "retrieval=inf"], "weights must be finite numbers >= 0"),
        (["--mix", "nan:1:1:1"], "weights must be finite numbers >= 0"),
        (["--families", "sts,retrieval", "--mix", "sts=1,retrieval=nan"], "weights must be finite numbers >= 0"),
        (["--topics", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--shard", "3/2"], "argument --shard: got '3/2'; give i/n with 0 <= i < n"),
        (["--shard", "1"], "argument --shard: got '1'; give i/n"),
        (["--num-examples", "0"], "argument --num-examples: got '0'; give an integer >= 1"),
        (["--num-topics", "-2"], "argument --num-topics: got '-2'; give an integer >= 1"),
        (["--max-attempts", "0"], "argument --max-attempts: got '0'; give an integer >= 1"),
        (["--max-num-seqs", "0"], "argument --max-num-seqs: got '0'; give an integer >= 1"),
        (["--max-tokens", "15"], "argument --max-tokens: got '15'; give an integer >= 16"),
        (["--seed", "-1"], "argument --seed: got '-1'; give an integer >= 0"),
        (["--temperature", "-1"], "argument --temperature: got '-1'; give a finite number >= 0"),
        (["--temperature", "nan"], "argument --temperature: got 'nan'; give a finite number >= 0"),
        (["--top-p", "2"], "argument --top-p: got '2'; give a finite number > 0 and <= 1"),
        (["--gpu-hour-price", "-1"], "argument --gpu-hour-price: got '-1'; give a finite number >= 0"),
        (["--api-price-in", "inf"], "argument --api-price-in: got 'inf'; give a finite number >= 0"),
        (["--api-price-out", "ten"], "argument --api-price-out: got 'ten'; give a finite number >= 0"),
        (["--kv-cache-memory", "4 gigs"], "argument --kv-cache-memory: got '4 gigs'; give a size such as '4GiB'"),
        (["--kv-cache-memory", "0GiB"], "argument --kv-cache-memory: got '0GiB'"),
        (["--dtype", "bf17"], "argument --dtype: got 'bf17'; give one of auto, bfloat16, float16, float32"),
        (["--families", ""], "argument --families: got ''; give a comma list of families"),
        (["--model", ""], "argument --model: got ''"),
        (["--tasks", " "], "argument --tasks: got ' '; give a path"),
        (["--model", "/no/such/model"], "--model: "),
        (["--revisor", "/no/such/revisor"], "--revisor: "),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, no_model, args, message):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9s > Espresso\n".encode("latin-1"))
    out = tmp_path / "run"
    assert generate_main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_empty_out_is_refused_not_the_current_directory(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    assert generate_main(["--out", ""]) == 2
    assert "argument --out: got ''; give a directory path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_exit_codes(capsys):
    assert generate_main(["--help"]) == 0
    assert "exit codes:\n  0    complete" in capsys.readouterr().out
    assert generate_main(["merge", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--allow-partial" in help_text and "3    incomplete" in help_text


def test_cli_malformed_tasks_file_reports_the_line(tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"task": "a", "family": "sts"}\n{oops\n')
    assert generate_main(["--tasks", str(tasks), "--families", "sts", "--out", str(tmp_path / "r")]) == 2
    assert "tasks.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_cli_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert generate_main(["--out", str(blocker / "run")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


def sts_tasks(tmp_path):
    path = tmp_path / "my-tasks.jsonl"
    path.write_text(json.dumps({"task": "Sentences about city parks.", "family": "sts"}) + "\n")
    return path


def check(argv: list[str]) -> dict:
    """check_arguments of a command line, its lock on --out let go."""
    checked = check_arguments(build_parser().parse_args(argv))
    checked["lock"].close()
    return checked


def test_tasks_file_is_written_at_once(tmp_path, monkeypatch):
    """A kill while tasks.jsonl is written must leave no tasks.jsonl, not a short one."""
    from speedx.synth import cli_run

    written = []

    def to_json_then_die(task):
        if written:
            raise KeyboardInterrupt
        written.append(task)
        return {"id": task.id, "family": task.family, "task": task.task, "topic": None, "source": "file"}

    monkeypatch.setattr(Task, "to_json", to_json_then_die)
    tasks = [Task("t0", "sts", "Parks."), Task("t1", "sts", "Trains.")]
    checked = {"out": tmp_path, "saved_tasks": [], "tasks": tasks, "families": parse_families("sts")}
    with pytest.raises(KeyboardInterrupt):
        cli_run.load_or_make_tasks(SimpleNamespace(tasks="my-tasks.jsonl"), checked, llm=None)
    assert not (tmp_path / "tasks.jsonl").exists()


@pytest.mark.parametrize("saved, message", [
    ('{"id": "t0", "family": "sts", "task": "Parks.", "topic": null, "source": "file"}\n{"id": "t1", "fam',
     "tasks.jsonl is cut off in its last line"),
    ('{"id": "t0", "family": "sts", "task": "Parks.", "topic": null, "source": "file"}\n',
     r"tasks.jsonl has no task for families \['retrieval'\]"),
    ('{"id": "t0", "family": ["sts"], "task": "Parks."}\n', "tasks.jsonl:1: not a task record"),
    ('{"id": "t0"\n', "tasks.jsonl:1: not valid JSON"),
])
def test_resume_refuses_a_damaged_tasks_file(tmp_path, capsys, no_model, saved, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tasks.jsonl").write_text(saved)
    assert generate_main(["--families", "sts,retrieval", "--json-mode", "repair", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "delete it to make the tasks again" in err


def test_a_stopped_run_is_not_finished_and_merge_refuses_it(tmp_path, monkeypatch, capsys):
    from speedx.synth.pipeline import SynthesisRun

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(speedx, "LLM", FakeLLM)
    monkeypatch.setattr(SynthesisRun, "run", stop)
    command = ["--tasks", str(sts_tasks(tmp_path)), "--families", "sts", "--json-mode", "repair", "--no-progress",
               "--num-examples", "2"]
    shard0, shard1 = tmp_path / "s0", tmp_path / "s1"
    assert generate_main([*command, "--shard", "0/2", "--out", str(shard0)]) == 130
    assert json.loads((shard0 / "manifest.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(SynthesisRun, "run", lambda self: None)  # shard 1 finishes (with no example)
    assert generate_main([*command, "--shard", "1/2", "--out", str(shard1)]) == 3
    assert json.loads((shard1 / "manifest.json").read_text())["status"] == "incomplete"
    capsys.readouterr()
    assert generate_main(["merge", str(shard0), str(shard1), "--out", str(tmp_path / "merged")]) == 2
    assert f"{shard0} is not finished (status interrupted in its manifest.json): resume it" in capsys.readouterr().err

    def crash(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(SynthesisRun, "run", crash)
    with pytest.raises(RuntimeError):
        generate_main([*command, "--shard", "0/2", "--out", str(shard0)])
    assert json.loads((shard0 / "manifest.json").read_text())["status"] == "failed"


def fake_shard(path, index: int, status: str = "complete", count: int = 2, **config) -> None:
    """A finished shard i/count with one example of 5 output tokens, made in 1 s, as a run writes it."""
    path.mkdir()
    record = {"id": f"s{index}-a0", "slot": index, "family": "sts", "task_id": "t0", "task": "Parks.",
              "query": f"shard {index} query about {['parks', 'trains', 'boats'][index]}", "positive": f"answer {index}",
              "negatives": ["other"], "instruction": "Retrieve semantically similar text.", "raw": {}, "output_tokens": 5}
    (path / "examples.jsonl").write_text(json.dumps(record) + "\n")
    (path / "tasks.jsonl").write_text(json.dumps({"id": "t0", "family": "sts", "task": "Parks."}) + "\n")
    hours, price = 1 / 3600, 2.0 + index  # shards may run at different prices
    cost = {"device": "cpu", "device_hours": hours, "device_hour_price": price, "dollars": hours * price,
            "input_tokens": 100, "output_tokens": 5 + 20, "api_price_in": 2.5, "api_price_out": 10.0,
            "api_dollars_same_tokens": 0.0005}  # 20 of the output tokens were the brainstorm's
    manifest = {"config": {"seed": 0, "shard": f"{index}/{count}", "num_examples": count, **config},
                "status": status, "wall_seconds": 1.0, "tasks": {"requests": 4, "output_tokens": 20}, "cost": cost}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_merge_refuses_unfinished_shards_and_accepts_older_manifests(tmp_path, capsys):
    fake_shard(tmp_path / "s0", 0, dtype="auto", kv_cache_dtype="auto")
    fake_shard(tmp_path / "s1", 1, status="running")
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "manifest.json").write_text('{"config": {"seed": 0')

    def merge_with(other: str) -> int:
        return generate_main(["merge", str(tmp_path / "s0"), str(tmp_path / other), "--out", str(tmp_path / "merged")])

    assert merge_with("s1") == 2
    assert "s1 is not finished (status running in its manifest.json): resume it" in capsys.readouterr().err
    assert merge_with("s2") == 2
    assert "s2/manifest.json is damaged (not valid JSON" in capsys.readouterr().err
    # A shard from a version that did not record the dtypes still merges.
    fake_shard(tmp_path / "old", 1)
    assert merge_with("old") == 0
    assert len(list(read_jsonl(tmp_path / "merged" / "examples.jsonl"))) == 2


def test_merge_refuses_missing_shards_unless_allowed_and_sums_their_costs(tmp_path, capsys):
    for index in (0, 2):
        fake_shard(tmp_path / f"s{index}", index, count=3)
    shards = [str(tmp_path / "s0"), str(tmp_path / "s2")]
    assert generate_main(["merge", *shards, "--out", str(tmp_path / "merged")]) == 2
    assert "shards 1/3 of the run are missing: name their directories too, or pass --allow-partial" \
        in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    assert generate_main(["merge", *shards, "--out", str(tmp_path / "merged"), "--allow-partial"]) == 3
    assert "2/3 examples" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["missing_shards"] == ["1/3"]
    cost = manifest["cost"]
    assert cost["device_hours"] == pytest.approx(2 / 3600) and cost["dollars"] == pytest.approx((2.0 + 4.0) / 3600)
    assert cost["device_hour_price"] == [2.0, 4.0]
    assert cost["output_tokens"] == 50 and cost["input_tokens"] == 200
    assert cost["api_dollars_same_tokens"] == pytest.approx(0.001)
    assert cost["dollars_per_thousand_examples"] == pytest.approx(cost["dollars"] / 2 * 1000)
    assert manifest["tokens"]["output_tokens"] == 10 and manifest["tasks"]["output_tokens"] == 40
    fake_shard(tmp_path / "s1", 1, count=3)
    assert generate_main(["merge", *shards, str(tmp_path / "s1"), "--out", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["missing_shards"] == []


def test_a_second_process_cannot_write_to_a_locked_run(tmp_path, capsys, no_model):
    out = tmp_path / "run"
    out.mkdir()
    holder = lock_run_dir(out)  # flock locks are per open file: the command's own open conflicts
    try:
        assert generate_main(["--out", str(out)]) == 2
        assert f"another speedx.generate is writing to {out} (pid {os.getpid()})" in capsys.readouterr().err
        fake_shard(tmp_path / "s0", 0)
        fake_shard(tmp_path / "s1", 1)
        assert generate_main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 2
        assert f"another speedx.generate is writing to {out} (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        holder.close()
    check(["--out", str(out)])  # free again


def test_the_lock_dies_with_its_process(tmp_path):
    code = ("import sys, time; from pathlib import Path; from speedx.synth.run_files import lock_run_dir; "
            "lock = lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=f"another speedx.generate is writing to .* \\(pid {proc.pid}\\)"):
            lock_run_dir(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock_run_dir(tmp_path).close()


def resumable_run(tmp_path, config: dict | None = None) -> tuple[Path, list[str]]:
    """A run directory whose manifest holds `config` (else nothing), and the command that resumes it."""
    out = tmp_path / "run"
    out.mkdir()
    if config is not None:
        (out / "manifest.json").write_text(json.dumps({"config": config}))
    return out, ["--tasks", str(sts_tasks(tmp_path)), "--families", "sts", "--out", str(out)]


def test_damaged_manifest_is_named(tmp_path, capsys, no_model):
    out, command = resumable_run(tmp_path)
    (out / "manifest.json").write_text('{"config": {"seed": 0, "tasks": "my-tas')
    assert generate_main(command) == 2
    assert f"{out / 'manifest.json'} is damaged (not valid JSON" in capsys.readouterr().err


def test_tasks_file_named_relative_or_absolute_is_one_setting(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    out, command = resumable_run(tmp_path, {"seed": 0, "tasks": "my-tasks.jsonl"})
    check(command)  # command names it by its absolute path
    other = tmp_path / "other.jsonl"
    other.write_text((tmp_path / "my-tasks.jsonl").read_text())
    assert generate_main([command[0], str(other), *command[2:]]) == 2  # the same text in another file is not
    assert f"--tasks my-tasks.jsonl in the run, {other} in this command" in capsys.readouterr().err


def test_resume_refuses_changed_dtypes_unless_not_recorded(tmp_path, capsys, no_model):
    out, command = resumable_run(tmp_path, {"seed": 0, "dtype": "float32", "kv_cache_dtype": "auto"})
    check([*command, "--dtype", "float32"])
    assert generate_main([*command, "--dtype", "bfloat16", "--kv-cache-dtype", "fp8"]) == 2
    assert ("holds a run made with other settings (--dtype float32 in the run, bfloat16 in this command; "
            "--kv-cache-dtype auto in the run, fp8 in this command)") in capsys.readouterr().err
    (out / "manifest.json").write_text(json.dumps({"config": {"seed": 0}}))  # from before the dtypes were recorded
    check([*command, "--dtype", "bfloat16", "--kv-cache-dtype", "fp8"])


def test_resume_may_grow_num_examples_but_not_shrink_it(tmp_path, capsys, no_model):
    """A smaller --num-examples would count the run's examples beyond it as this run's (8 of 4)."""
    out, command = resumable_run(tmp_path, {"seed": 0, "num_examples": 8})
    check([*command, "--num-examples", "8"])
    check([*command, "--num-examples", "12"])
    assert generate_main([*command, "--num-examples", "4"]) == 2
    assert "holds a run of --num-examples 8: resume it with at least that many" in capsys.readouterr().err


def test_the_brainstorm_shows_its_progress(capsys):
    from speedx.engine.outputs import CompletionOutput, RequestOutput
    from speedx.synth.tasks import brainstorm_tasks

    answers = ['{"tasks": ["Find recipes that use seasonal vegetables."]}', "no JSON here"]

    class StreamingLLM:
        def apply_chat_template(self, messages):
            return messages[-1]["content"]

        def stream(self, prompts, params):
            for index in reversed(range(len(prompts))):  # finishing out of order
                text = answers[index % 2]
                yield index, RequestOutput(str(index), None, [1, 2], [CompletionOutput(0, text, [7] * 10, "stop")])

    tasks, stats = brainstorm_tasks(StreamingLLM(), [FAMILIES["sts"]], ["Food > Cooking", "Sports"], 2, 0, "repair",
                                    lambda **kw: kw, show_progress=True)
    assert [t.task for t in tasks] == ["Find recipes that use seasonal vegetables."] and stats["output_tokens"] == 20
    bar = capsys.readouterr().err
    assert "brainstorm: 100%" in bar and "2/2" in bar and "1 with tasks" in bar


def test_rerunning_an_ended_run_is_a_no_op_that_loads_no_model(tmp_path, capsys, no_model):
    out, command = resumable_run(tmp_path)
    command += ["--num-examples", "2", "--max-attempts", "1"]
    rows = [{"id": f"s{slot}-a{attempt}", "slot": slot, "family": "sts", "task_id": "t0", "reason": "too_short:S1"}
            for slot in (0, 1) for attempt in (0, 1)]  # the budget: 2 slots x 1 attempt, at least 4 in all
    (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {"config": {"seed": 0, "num_examples": 2}, "status": "incomplete", "examples": 0, "export": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert generate_main(command) == 3
    assert capsys.readouterr().out == (f"{out} holds this run, incomplete (0 examples): nothing left to do: the run's "
                                       "4 attempts were spent (2 slots empty); re-run the same command with a larger "
                                       "--max-attempts (now 1) to give them more\n")
    with pytest.raises(AssertionError, match="went on to load a model"):  # slots with attempts left: not a no-op
        generate_main([*command, "--max-attempts", "2"])
    (out / "rejected.jsonl").unlink()
    (out / "examples.jsonl").write_text("".join(json.dumps(dict(r, reason=None)) + "\n" for r in rows))
    (out / "manifest.json").write_text(json.dumps(manifest | {"status": "complete", "examples": 2}))
    assert generate_main(command) == 0
    assert capsys.readouterr().out == f"{out} holds this run, complete (2 examples): nothing left to do\n"


def test_wall_time_counts_the_model_load(tmp_path, monkeypatch):
    """The device is held from the model load on: a cost report that starts after it under-counts."""
    from speedx.synth.pipeline import SynthesisRun

    class SlowLoadingLLM(FakeLLM):
        def __init__(self, *args, **kwargs):
            time.sleep(0.5)

    monkeypatch.setattr(speedx, "LLM", SlowLoadingLLM)
    monkeypatch.setattr(SynthesisRun, "run", lambda self: None)
    out = tmp_path / "run"
    assert generate_main(["--tasks", str(sts_tasks(tmp_path)), "--families", "sts", "--json-mode", "repair",
                          "--no-progress", "--num-examples", "2", "--out", str(out)]) == 3  # no example: incomplete
    assert json.loads((out / "manifest.json").read_text())["wall_seconds"] >= 0.5
