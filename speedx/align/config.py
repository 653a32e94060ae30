"""The alignment pipeline's settings: one TOML file, a named preset, or both (the file wins).

    out = "speedx-align"
    seed = 0
    [student]            # the small model SPEED aligns
    model = "default"
    [teacher]            # any OpenAI-compatible chat API; base_url = "local" serves teacher.local_model here
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o"
    max_calls = 50000
    [counts]             # examples per stage
    seed_examples = 25000
    [sft]                # junior generator (SPEED: lr 1e-4, batch 16)
    lr = 1e-4
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin, get_type_hints


@dataclass
class Student:
    model: str = "default"
    dtype: str = "auto"
    families: str | None = None  # None: all but bitext, mixed 7:7:7:2 like the paper


@dataclass
class Teacher:
    base_url: str = "local"
    model: str = "gpt-4o"
    local_model: str = "default"  # served in-process when base_url = "local"
    api_key_env: str = "SPEEDX_TEACHER_API_KEY"
    max_calls: int | None = None
    concurrency: int = 8
    max_tokens: int = 1024


@dataclass
class Counts:
    topics: int = 2000  # brainstorm: one task kept per (topic, family)
    seed_examples: int = 25000
    root_prompts: int = 10000
    candidates: int = 5  # junior samples per root prompt
    judge_prompts: int = 10000
    revisions: int = 10000
    final_examples: int = 100000
    judge_retries: int = 2


@dataclass
class Training:
    lr: float = 1e-4
    batch_size: int = 16
    epochs: int = 1
    max_steps: int = -1
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 2048


@dataclass
class Generation:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024


@dataclass
class AlignConfig:
    out: str = "speedx-align"
    seed: int = 0
    student: Student = field(default_factory=Student)
    teacher: Teacher = field(default_factory=Teacher)
    counts: Counts = field(default_factory=Counts)
    sft: Training = field(default_factory=Training)  # junior generator
    dpo: Training = field(default_factory=lambda: Training(lr=1e-5))
    dpo_beta: float = 0.1
    # SPEED: lr 5e-6, batch 24, most likely for full fine-tuning; a LoRA barely moves at that rate.
    revisor: Training = field(default_factory=lambda: Training(lr=1e-4, batch_size=24))
    generation: Generation = field(default_factory=Generation)

    def to_dict(self) -> dict:
        return asdict(self)


# Presets are partial configs in the TOML layout.
PRESETS: dict[str, dict] = {
    # The paper's budget with a real teacher (set SPEEDX_TEACHER_API_KEY and, if not OpenAI, base_url).
    "paper": {"teacher": {"base_url": "https://api.openai.com/v1", "model": "gpt-4o", "max_calls": 50000,
                          "concurrency": 32}},
    # Runs anywhere in minutes: the embedded model is student and (served locally) teacher. Its data is
    # poor; it proves the machinery, not quality.
    "tiny": {
        "out": "speedx-align-tiny",
        "student": {"families": "classification,sts,retrieval"},
        "teacher": {"base_url": "local", "model": "speedx-local", "max_calls": 200, "concurrency": 8, "max_tokens": 256},
        "counts": {"topics": 4, "seed_examples": 12, "root_prompts": 6, "candidates": 3, "judge_prompts": 6,
                   "revisions": 6, "final_examples": 8},
        "sft": {"max_steps": 3, "batch_size": 4, "max_length": 768},
        "dpo": {"max_steps": 2, "batch_size": 2, "max_length": 768},
        "revisor": {"max_steps": 2, "batch_size": 2, "max_length": 1024},
        "generation": {"max_tokens": 256},
    },
}


def _apply(target, updates: dict, where: str) -> None:
    names = {f.name: f for f in fields(target)}
    for key, value in updates.items():
        if key not in names:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        current = getattr(target, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{key}] must be a table")
            _apply(current, value, f"{where} [{key}]")
        else:
            setattr(target, key, value)


def load_config(path: str | Path | None = None, preset: str | None = None, out: str | None = None) -> AlignConfig:
    """Defaults, then the preset, then the file, then --out. Unknown keys are errors (typos must not
    silently fall back to a default that spends teacher calls)."""
    config = AlignConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        _apply(config, PRESETS[preset], f"preset {preset}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        _apply(config, data, str(path))
    if out is not None:
        config.out = out
    check_config(config)
    return config


def _check_types(target, where: str) -> None:
    """Every setting has its declared type (an int is also a float; a bool is no number)."""
    hints = get_type_hints(type(target))
    for f in fields(target):
        value, kind = getattr(target, f.name), hints[f.name]
        if is_dataclass(value):
            _check_types(value, f"{where}{f.name}.")
            continue
        declared = get_args(kind) if get_origin(kind) in (Union, UnionType) else (kind,)
        allowed = declared + ((int,) if float in declared else ())
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("none" if t is type(None) else t.__name__ for t in declared)
            raise ValueError(f"{where}{f.name} must be {names}, got {value!r}")


def check_config(config: AlignConfig) -> None:
    """Types and ranges, before anything runs (a bad value must not surface mid-stage, after paid calls)."""
    from speedx.synth.families import parse_families
    from speedx.synth.tasks import load_topics

    _check_types(config, "")
    counts = config.counts
    for name in ("topics", "seed_examples", "root_prompts", "judge_prompts", "revisions", "final_examples"):
        if getattr(counts, name) < 1:
            raise ValueError(f"counts.{name} must be >= 1, got {getattr(counts, name)}")
    if counts.candidates < 2:
        raise ValueError("counts.candidates must be >= 2: the judge picks a best and a worst candidate")
    if counts.judge_retries < 0:
        raise ValueError("counts.judge_retries must be >= 0")
    available = len(load_topics(None))
    if counts.topics > available:
        raise ValueError(f"counts.topics must be at most {available}, the topics of the built-in taxonomy")
    teacher = config.teacher
    if teacher.concurrency < 1 or teacher.max_tokens < 16 or (teacher.max_calls is not None and teacher.max_calls < 0):
        raise ValueError("teacher.concurrency must be >= 1, teacher.max_tokens >= 16 and teacher.max_calls >= 0")
    for name in ("sft", "dpo", "revisor"):
        hp = getattr(config, name)
        if not hp.lr > 0 or hp.batch_size < 1 or hp.epochs < 1 or hp.lora_r < 1 or hp.lora_alpha < 1 \
                or hp.max_length < 16 or not (hp.max_steps == -1 or hp.max_steps >= 1):
            raise ValueError(f"[{name}]: lr must be > 0, batch_size, epochs, lora_r and lora_alpha >= 1, "
                             "max_length >= 16, max_steps -1 (epochs decide) or >= 1")
    gen = config.generation
    if gen.temperature < 0 or not 0 < gen.top_p <= 1 or gen.max_tokens < 16:
        raise ValueError("generation.temperature must be >= 0, generation.top_p in (0, 1], generation.max_tokens >= 16")
    if not config.dpo_beta > 0:
        raise ValueError("dpo_beta must be > 0")
    parse_families(config.student.families)


# Settings a resumed run may change: the budget and pace of teacher calls, and where the run lives.
RESUMABLE_CHANGES = {"out", "teacher.max_calls", "teacher.concurrency"}


def changed_settings(saved: dict, config: AlignConfig) -> list[str]:
    """Dotted names of the settings that differ from a run's saved config.json (those a resume may
    change left out)."""
    def flat(d: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in d.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    old, new = flat(saved), flat(config.to_dict())
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
