"""Synthesis building blocks that need no model: families, prompts, validation, tasks, run files, CLI errors."""

from __future__ import annotations

import json
import random

import pytest

from speedx.generate import main as generate_main
from speedx.synth.families import FAMILIES, parse_families, parse_mix
from speedx.synth.prompts import generation_messages, guideline_bullets
from speedx.synth.run_files import JsonlAppender, read_jsonl
from speedx.synth.tasks import load_tasks_file, truncate_topic
from speedx.synth.validate import validate_example


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
        ("retrieval", {"user_query": "which kind of soil do tomatoes like best in a small home garden"}, "too_long:user_query"),
        ("retrieval", {"positive_document": "Loamy soil."}, "too_short:positive_document"),
        ("classification", {"misleading_label": "Negative"}, "label_equals_misleading_label"),
        ("sts", {"S3": "the park opens at dawn"}, "fields_not_distinct"),
    ],
)
def test_rejections_name_their_reason(name, change, reason):
    data = {**GOOD[name], **change}
    assert validate_example(FAMILIES[name], data, KNOBS[name]) == reason


def test_topic_paths_keep_first_two_and_last_two():
    assert truncate_topic("A > B > C > D > E > F") == "A > B > E > F"
    assert truncate_topic("A>B>C") == "A > B > C"


def test_tasks_file_formats_and_errors(tmp_path):
    fams = parse_families("retrieval,sts")
    path = tmp_path / "tasks.txt"
    path.write_text("Find recipes for a dish.\n\n" + json.dumps({"task": "Similar park sentences.", "family": "sts"}) + "\n")
    tasks = load_tasks_file(str(path), fams)
    assert [(t.family, t.task) for t in tasks] == [
        ("retrieval", "Find recipes for a dish."), ("sts", "Find recipes for a dish."), ("sts", "Similar park sentences.")]
    path.write_text('{"task": "ok", "family": "sts"}\n{"task": broken}\n')
    with pytest.raises(ValueError, match=r"tasks.txt:2: not valid JSON"):
        load_tasks_file(str(path), fams)
    path.write_text('{"task": "ok", "family": "poetry"}\n')
    with pytest.raises(ValueError, match=r"tasks.txt:1: unknown family 'poetry'"):
        load_tasks_file(str(path), fams)
    path.write_text('{"task": "only sts", "family": "sts"}\n')
    with pytest.raises(ValueError, match=r"no task for families \['retrieval'\]"):
        load_tasks_file(str(path), fams)


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
        (["--topics", "{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text"),
        (["--shard", "3/2"], "bad --shard"),
        (["--num-examples", "0"], "--num-examples must be >= 1"),
        (["--num-topics", "-2"], "--num-topics must be >= 1"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["--top-p", "2"], "top_p must be a number in (0, 1]"),
        (["--model", "/no/such/model"], "--model: "),
        (["--revisor", "/no/such/revisor"], "--revisor: "),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9s > Espresso\n".encode("latin-1"))
    out = tmp_path / "run"
    assert generate_main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


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
