"""The whole alignment pipeline on a tiny random student with a scripted teacher: killed in the
middle of the seed stage, resumed, and no teacher request is ever answered twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fake_teacher import FakeTeacher

from speedx.align.stages import STAGES

pytest.importorskip("trl")


def write_config(path, out, student, teacher_url):
    path.write_text(f"""
out = "{out}"
seed = 3
[student]
model = "{student}"
families = "sts,short_short"
[teacher]
base_url = "{teacher_url}"
model = "fake-teacher"
max_calls = 100
concurrency = 1
max_tokens = 200
[counts]
topics = 2
seed_examples = 6
root_prompts = 3
candidates = 2
judge_prompts = 3
revisions = 3
final_examples = 2
[sft]
max_steps = 1
batch_size = 2
max_length = 4096
[dpo]
max_steps = 1
batch_size = 2
max_length = 4096
[revisor]
max_steps = 1
batch_size = 2
max_length = 4096
[generation]
max_tokens = 1536
""")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny random Llama whose context fits the generation prompts (its tokenizer is near byte-level)."""
    from conftest import build_tiny_model

    path = tmp_path_factory.mktemp("student")
    build_tiny_model(path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    return path


def align(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "speedx.align", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_pipeline_killed_mid_stage_resumes_without_repeating_teacher_calls(tmp_path, student):
    teacher = FakeTeacher(block_kind="example", block_at=4)  # the 4th seed request never returns
    try:
        config = tmp_path / "pipeline.toml"
        write_config(config, tmp_path / "run", student, teacher.url)
        first = align("run", str(config))
        assert teacher.blocked.wait(timeout=300), first.communicate()[0] if first.poll() is not None else "no block"
        first.kill()  # mid-stage: 3 seed examples answered and cached, the 4th in flight
        first.wait()
        assert teacher.kinds["example"] == 3 and not (tmp_path / "run" / "seed" / "manifest.json").exists()

        second = align("run", str(config))
        log = second.communicate(timeout=900)[0]
        assert second.returncode == 0, log
    finally:
        teacher.close()

    assert max(teacher.counts.values()) == 1  # no request answered twice, across the kill
    run = tmp_path / "run"
    for stage in STAGES:
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    assert "[brainstorm] complete, skipped" in log  # finished stages are not redone
    assert (run / "senior_dpo" / "adapter" / "adapter_config.json").is_file()
    assert (run / "final" / "run" / "manifest.json").is_file()
    assert teacher.kinds["brainstorm"] == 2 * 2 and teacher.kinds["verdict"] == 3
    assert teacher.kinds["example"] == 6 + 3  # seed examples + revisions

    report = subprocess.run([sys.executable, "-m", "speedx.align", "report", str(run)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    data = json.loads((run / "report.json").read_text())
    assert data["teacher_calls"] == sum(teacher.counts.values())  # accounting survived the kill
    seed = next(r for r in data["stages"] if r["stage"] == "seed")
    assert (seed["teacher_calls"], seed["cached_calls"]) == (6, 3)  # the resumed stage replayed 3 from the cache


def test_budget_stops_cleanly_and_resumes(tmp_path, student):
    teacher = FakeTeacher()
    try:
        config = tmp_path / "pipeline.toml"
        write_config(config, tmp_path / "run", student, teacher.url)
        out = subprocess.run([sys.executable, "-m", "speedx.align", "run", str(config), "--until", "seed",
                              "--max-teacher-calls", "6"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 3, out.stdout + out.stderr
        assert "budget" in out.stdout and sum(teacher.counts.values()) == 6
        manifest = json.loads((tmp_path / "run" / "seed" / "manifest.json").read_text())
        assert manifest["status"] == "incomplete"
        out = subprocess.run([sys.executable, "-m", "speedx.align", "run", str(config), "--until", "seed",
                              "--max-teacher-calls", "10"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert sum(teacher.counts.values()) == 10 and max(teacher.counts.values()) == 1
    finally:
        teacher.close()
