"""`python -m speedx.generate` end to end on the embedded default model: the default command,
a kill in the middle and a resume, and sharded runs merged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedx.generate import main as generate_main
from speedx.synth.dedup import normalize_text

TASKS = [
    {"task": "Sentences about city parks and gardens.", "family": "sts"},
    {"task": "Statements about cooking pasta at home.", "family": "sts"},
    {"task": "Sentences describing weather on a mountain hike.", "family": "sts"},
]
# STS with sentences keeps outputs short, so these runs take seconds per round on a CPU.
COMMON = ["--families", "sts", "--max-tokens", "160", "--max-attempts", "6", "--no-progress", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return path


def read(path: Path, written_so_far: bool = False) -> list[dict]:
    """The records of a JSONL file; ``written_so_far`` drops a partial last line (a run still writing,
    or killed mid-write), which a finished run must not have."""
    text = path.read_text() if path.exists() else ""
    if written_so_far:
        text = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in text.split("\n") if line]  # not splitlines(): U+2028 may be in a string


def check_run(out: Path, expected: int) -> list[dict]:
    examples, rejected = read(out / "examples.jsonl"), read(out / "rejected.jsonl")
    ids = [r["id"] for r in examples + rejected]
    assert len(ids) == len(set(ids)), "an attempt was done twice"
    assert len(examples) == expected
    assert len({r["slot"] for r in examples}) == expected
    texts = [normalize_text(r["query"] + "\n" + r["positive"]) for r in examples]
    assert len(set(texts)) == len(texts)
    for record in examples:
        assert set(record["raw"]) == {"S1", "S2", "S3"}
        assert record["instruction"] == "Retrieve semantically similar text."
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["examples"] == expected
    return examples


def start_run(tasks_file, out: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`python -m speedx.generate` of 6 examples in a process group of its own, returned once it has
    finished 2 requests (examples or rejections): stopping it then interrupts real work."""
    command = [sys.executable, "-m", "speedx.generate", "--tasks", str(tasks_file), "--num-examples", "6",
               "--out", str(out), *COMMON]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.time() + 300
    while len(read(out / "examples.jsonl", True)) + len(read(out / "rejected.jsonl", True)) < 2:
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run ended, or made no progress in 300 s, before it could be stopped")
        time.sleep(0.2)
    return proc


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, tasks_file):
    out = tmp_path / "run"
    proc = start_run(tasks_file, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["id"] for r in read(out / "examples.jsonl", True) + read(out / "rejected.jsonl", True)}
    killed_wall = json.loads((out / "manifest.json").read_text())["wall_seconds"]
    assert killed_wall > 1  # the killed process's generating time is on disk (every 2 s): the cost counts it
    assert generate_main(["--tasks", str(tasks_file), "--num-examples", "6", "--out", str(out), *COMMON]) == 0
    check_run(out, 6)
    kept = {r["id"] for r in read(out / "examples.jsonl") + read(out / "rejected.jsonl")}
    assert done_before <= kept  # nothing finished before the kill was lost
    assert json.loads((out / "manifest.json").read_text())["wall_seconds"] > killed_wall


def test_ctrl_c_stops_with_one_line_that_says_how_to_resume(tmp_path, tasks_file):
    out = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = start_run(tasks_file, out, stderr)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        stderr.seek(0)
        err = stderr.read()
    assert "Traceback" not in err and f"interrupted: re-run the same command to resume the run in {out}" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["examples"] == len(read(out / "examples.jsonl"))
    assert manifest["status"] == "interrupted"  # not "incomplete": merge must not take it as finished


def test_shards_merged_equal_one_run(tmp_path, tasks_file):
    """Each request follows from (seed, slot, attempt) alone. One sequence at a time makes every
    forward pass the same shape in both layouts, so the floating-point results are bit-identical
    too (with bigger batches a rare token can differ: GEMM sums depend on the batch shape)."""
    single = tmp_path / "single"
    args = ["--tasks", str(tasks_file), "--num-examples", "4", *COMMON, "--max-attempts", "10", "--max-num-seqs", "1"]
    assert generate_main([*args, "--out", str(single)]) == 0
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        assert generate_main([*args, "--out", str(shard), "--shard", f"{i}/2"]) == 0
        assert {r["slot"] % 2 for r in read(shard / "examples.jsonl")} == {i}
    merged = tmp_path / "merged"
    assert generate_main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    one, both = check_run(single, 4), check_run(merged, 4)
    assert {r["slot"]: r["raw"] for r in one} == {r["slot"]: r["raw"] for r in both}
    assert (merged / "sentence-transformers" / "triplets.parquet").is_file()
    assert output_tokens(merged) == sum(map(output_tokens, shards))


def output_tokens(run: Path) -> int:
    return json.loads((run / "manifest.json").read_text())["tokens"]["output_tokens"]


def test_merge_refuses_what_is_not_one_run_and_counts_dropped_duplicates(tmp_path, tasks_file, capsys):
    shard = tmp_path / "shard0"
    assert generate_main(["--tasks", str(tasks_file), "--num-examples", "2", *COMMON, "--shard", "0/2",
                          "--out", str(shard)]) == 0
    capsys.readouterr()  # the run's own log and summary
    copy = tmp_path / "copy"
    shutil.copytree(shard, copy)
    manifest = json.loads((copy / "manifest.json").read_text())

    def merge_with_copy(**changes) -> tuple[int, str]:
        (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        code = generate_main(["merge", str(shard), str(copy), "--out", str(tmp_path / "merged")])
        return code, capsys.readouterr().err

    as_shard_1 = {**manifest["config"], "shard": "1/2"}
    assert merge_with_copy() == (2, "error: two directories hold the same --shard (0/2, 0/2)\n")
    code, err = merge_with_copy(config={**as_shard_1, "seed": 5})
    assert code == 2 and "other settings than" in err and "(seed)" in err
    code, err = merge_with_copy(config=as_shard_1, status="running")
    assert code == 2 and "resume it" in err
    assert generate_main(["merge", str(shard), str(shard), "--out", str(tmp_path / "merged")]) == 2
    assert "named twice" in capsys.readouterr().err
    # The copy posing as the other shard: all its examples are duplicates, whose tokens still count.
    assert merge_with_copy(config=as_shard_1) == (0, "")
    assert output_tokens(tmp_path / "merged") == 2 * output_tokens(shard)


def test_resume_refuses_changed_arguments(tmp_path, tasks_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"config": {"seed": 1}}))
    assert generate_main(["--tasks", str(tasks_file), "--out", str(out), "--seed", "2", *COMMON]) == 2
    assert "holds a run made with other settings (--seed 1 in the run, 2 in this command)" in capsys.readouterr().err


def test_default_command_small(tmp_path, monkeypatch):
    """The no-argument command (brainstormed tasks, all default families), with a small count."""
    monkeypatch.chdir(tmp_path)
    assert generate_main(["--num-examples", "3", "--num-topics", "2", "--max-tokens", "200", "--no-progress"]) == 0
    out = tmp_path / "speedx-out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["source"] == "brainstorm"
    assert read(out / "tasks.jsonl")
    brainstorm = manifest["tasks"]["output_tokens"]
    assert brainstorm > 0 and manifest["cost"]["output_tokens"] == manifest["tokens"]["output_tokens"] + brainstorm
    for record in read(out / "examples.jsonl"):
        assert record["family"] in ("classification", "sts", "retrieval", "short_short", "long_long")
    assert (out / "sentence-transformers" / "triplets.jsonl").exists()
    # A re-run resumes the finished run: how its tasks were made (and what that cost) is kept.
    assert generate_main(["--num-examples", "3", "--num-topics", "2", "--max-tokens", "200", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["tasks"] == manifest["tasks"]


def test_a_run_that_failed_after_writing_its_tasks_resumes_only_with_its_settings(tmp_path, tasks_file, monkeypatch,
                                                                                   capsys):
    from speedx.synth import cli_run

    def failing_planner(*args):
        raise RuntimeError("the run failed after writing tasks.jsonl")

    out = tmp_path / "run"
    monkeypatch.setattr(cli_run, "Planner", failing_planner)
    with pytest.raises(RuntimeError):
        generate_main(["--tasks", str(tasks_file), "--num-examples", "2", "--out", str(out), *COMMON])
    assert read(out / "tasks.jsonl")
    monkeypatch.undo()
    other = tmp_path / "other-tasks.jsonl"
    other.write_text(json.dumps({"task": "Sentences about trains.", "family": "sts"}) + "\n")
    assert generate_main(["--tasks", str(other), "--num-examples", "2", "--out", str(out), *COMMON]) == 2
    assert f"holds a run made with other settings (--tasks {tasks_file} in the run, {other} in this command)" \
        in capsys.readouterr().err


def test_rejected_schema_exits_2_before_writing(tmp_path, tasks_file, monkeypatch, capsys):
    from speedx.synth.families import FAMILIES

    family = FAMILIES["sts"]
    monkeypatch.setattr(type(family), "json_schema", lambda self, capped=False: {"type": "no-such-type"})
    out = tmp_path / "run"
    assert generate_main(["--tasks", str(tasks_file), "--out", str(out), *COMMON]) == 2
    assert "grammar compiler rejected the sts schema" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".lock"]  # the run directory's lock, and nothing else


def test_revisor_pass(tmp_path, tasks_file):
    out = tmp_path / "run"
    assert generate_main(["--tasks", str(tasks_file), "--num-examples", "2", "--out", str(out), *COMMON,
                          "--revisor", "default"]) == 0
    examples = check_run(out, 2)
    assert all("revisor_output_tokens" in r for r in examples)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"]["revisor_output_tokens"] > 0
