"""The SPEED stages, each a function of the run context that writes its own folder of artifacts.

brainstorm -> seed (teacher) -> junior_sft -> root (junior on the engine) -> judge (teacher)
-> senior_dpo -> revisions (teacher) -> revisor_sft -> final (senior writes, revisor revises, dedup).
Prompts, validation and dedup are the synthesis issue's (speedx.synth); every teacher call goes
through the cached, budgeted client, so re-running a killed stage repeats no paid call.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from speedx.align.config import AlignConfig
from speedx.align.prompts import VERDICT_SCHEMA, check_verdict, judge_messages, retry_messages
from speedx.synth.dedup import Deduplicator
from speedx.synth.families import DEFAULT_MIX, FAMILIES, parse_families, parse_mix
from speedx.synth.json_repair import JSONRepairError, parse_json_object
from speedx.synth.pipeline import Planner
from speedx.synth.prompts import brainstorm_messages, brainstorm_schema, revision_messages
from speedx.synth.records import check_example
from speedx.synth.run_files import read_jsonl
from speedx.synth.tasks import Task, hash_seed, load_topics, task_candidates
from speedx.synth.validate import validate_example

STAGES = ("brainstorm", "seed", "junior_sft", "root", "judge", "senior_dpo", "revisions", "revisor_sft", "final")
TEACHER_STAGES = ("brainstorm", "seed", "judge", "revisions")


class BudgetReached(RuntimeError):
    """The teacher call budget ran out inside a stage; what was done is cached and kept."""


class TeacherUnusable(RuntimeError):
    """The teacher refused the requests (key, model, URL) or every call of a stage failed."""


@dataclass
class Context:
    config: AlignConfig
    out: Path
    teacher: object = None  # a TeacherClient, set by the pipeline before a teacher stage runs
    families: list = field(init=False)  # from config.student.families, mixed like the paper (7:7:7:2)
    weights: dict = field(init=False)

    def __post_init__(self):
        families = parse_families(self.config.student.families)
        self.weights = parse_mix(DEFAULT_MIX, families)
        self.families = [f for f in families if self.weights[f.name] > 0]

    def dir(self, stage: str) -> Path:
        path = self.out / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rows(self, stage: str, name: str) -> list[dict]:
        path = self.out / stage / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run stage {stage!r} first")
        return list(read_jsonl(path))

    def ask(self, stage: str, requests: list[dict]) -> list:
        """Teacher replies in request order (failures included); BudgetReached when calls ran out.
        The client saves its usage file after every paid call, so a kill loses no call from the accounting."""
        from speedx.align.teacher import FATAL_STATUS

        results = self.teacher.chat_many(requests, stage=stage)
        failures = [r for r in results if not r.ok]
        fatal = next((r for r in failures if r.status in FATAL_STATUS), None)
        if fatal is not None:
            raise TeacherUnusable(f"the teacher refused the requests of stage {stage!r} ({fatal.error}); check "
                                  f"teacher.base_url, teacher.model and the API key in ${self.config.teacher.api_key_env}")
        if any(r.kind == "not_run" for r in failures):
            raise BudgetReached(f"the teacher call budget ran out during stage {stage!r}")
        if results and len(failures) == len(results):
            raise TeacherUnusable(f"every teacher call of stage {stage!r} failed, the first with: {failures[0].error}")
        return results

    def planner(self, salt: int) -> Planner:
        tasks = [Task(**row) for row in self.rows("brainstorm", "tasks.jsonl")]
        return Planner(self.families, self.weights, tasks, hash_seed(self.config.seed, salt))

    @property
    def base_checkpoint(self) -> Path:
        """The student as a Hugging Face directory (TRL and PEFT train it; the engine loads it):
        itself when it is one, else (a GGUF file such as the default) exported once into the run."""
        from speedx.align.training import hf_base

        return hf_base(self.config.student.model, self.out / "base")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(path)


def teacher_request(messages, config: AlignConfig, temperature: float, schema: dict, seed: int | None = None) -> dict:
    """A chat request whose answer must match `schema`: OpenAI's structured outputs, which speedx's
    server maps to constrained decoding (a small local teacher then always answers in shape)."""
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    return {"messages": messages, "temperature": temperature, "max_tokens": config.teacher.max_tokens, "seed": seed,
            "extra": {"response_format": response_format}}


# ---------------------------------------------------------------------------------------------- stages

def brainstorm(ctx: Context) -> dict:
    """One task definition kept per (topic, family), near-duplicates dropped; a family the teacher
    gave nothing usable for falls back to its built-in example tasks."""
    config = ctx.config
    topics = random.Random(config.seed).sample(load_topics(None), config.counts.topics)
    jobs = [(topic, family) for topic in topics for family in ctx.families]
    requests = [teacher_request(brainstorm_messages(family, topic), config, config.generation.temperature,
                                brainstorm_schema(), hash_seed(config.seed, i) % 2**31) for i, (topic, family) in enumerate(jobs)]
    seen, tasks = Deduplicator(threshold=0.8), []
    for i, ((topic, family), reply) in enumerate(zip(jobs, ctx.ask("brainstorm", requests))):
        for text in task_candidates(reply.text) if reply.ok else []:
            if seen.check_and_add(f"{family.name}:{text}", f"{family.name} {text}") is None:
                tasks.append(Task(f"b{i}", family.name, text, topic, "teacher"))
                break
    for family in ctx.families:
        if not any(t.family == family.name for t in tasks):
            tasks += [Task(f"x{len(tasks) + j}", family.name, text, None, "builtin")
                      for j, text in enumerate(FAMILIES[family.name].example_tasks)]
    write_jsonl(ctx.dir("brainstorm") / "tasks.jsonl", [t.to_json() for t in tasks])
    return {"examples_in": len(jobs), "examples_out": len(tasks)}


def seed(ctx: Context) -> dict:
    """The teacher writes one example per planned prompt; valid ones become SFT records."""
    config, planner = ctx.config, ctx.planner(salt=1)
    planned = [planner.request(slot, 0) for slot in range(config.counts.seed_examples)]
    requests = [teacher_request(p.messages, config, config.generation.temperature, p.family.json_schema(), p.seed % 2**31)
                for p in planned]
    records, reasons = [], {}
    for request, reply in zip(planned, ctx.ask("seed", requests)):
        data, reason = check_example(request, reply.text, "repair") if reply.ok else (None, "teacher_failed")
        if data is None:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        records.append({"messages": request.messages, "completion": json.dumps(data, ensure_ascii=False),
                        "family": request.family.name, "task": request.task})
    if not records:
        raise ValueError(f"none of the teacher's {len(planned)} seed examples was valid (rejected: {reasons})")
    write_jsonl(ctx.dir("seed") / "seed.jsonl", records)
    return {"examples_in": len(planned), "examples_out": len(records), "rejected": reasons}


def _sft(ctx: Context, stage: str, records: list[dict], hp, base: Path) -> dict:
    from speedx.align.training import train_sft

    if not records:
        raise ValueError(f"stage {stage}: no training records (every teacher example was rejected)")
    adapter = train_sft(base, records, ctx.dir(stage) / "adapter", lr=hp.lr, batch_size=hp.batch_size,
                        epochs=hp.epochs, max_steps=hp.max_steps, lora_r=hp.lora_r, lora_alpha=hp.lora_alpha,
                        max_length=hp.max_length, seed=ctx.config.seed)
    return {"examples_in": len(records), "adapter": str(adapter)}


def junior_sft(ctx: Context) -> dict:
    return _sft(ctx, "junior_sft", ctx.rows("seed", "seed.jsonl"), ctx.config.sft, ctx.base_checkpoint)


def root(ctx: Context) -> dict:
    """The junior generator (base + its LoRA on the engine) samples N candidates per prompt."""
    from speedx import LLM, SamplingParams

    config, planner = ctx.config, ctx.planner(salt=2)
    llm = LLM(str(ctx.base_checkpoint), dtype=config.student.dtype, seed=config.seed,
              lora=str(ctx.out / "junior_sft" / "adapter"))
    planned = [planner.request(slot, 0) for slot in range(config.counts.root_prompts)]
    params = [SamplingParams(n=config.counts.candidates, temperature=config.generation.temperature,
                             top_p=config.generation.top_p, max_tokens=config.generation.max_tokens,
                             seed=p.seed, json_schema=p.family.json_schema(capped=True)) for p in planned]
    outputs = llm.generate([llm.apply_chat_template(p.messages) for p in planned], params, use_tqdm=False)
    failed = [out.error for out in outputs if out.error]
    if len(failed) == len(outputs):
        raise ValueError(f"the junior generator could not serve any root prompt: {failed[0]}")
    rows = [{"slot": p.slot, "family": p.family.name, "task": p.task, "knobs": p.knobs, "messages": p.messages,
             "candidates": [c.text for c in out.outputs]} for p, out in zip(planned, outputs) if not out.error]
    write_jsonl(ctx.dir("root") / "root.jsonl", rows)
    return {"examples_in": len(planned), "examples_out": sum(len(r["candidates"]) for r in rows),
            "failed_prompts": len(failed), "generated_tokens": sum(out.num_output_tokens for out in outputs)}


def judge(ctx: Context) -> dict:
    """The teacher at temperature 0 picks the best and worst candidate of each root prompt. An
    invalid verdict is retried with what was wrong (a new request), then counted and skipped."""
    config = ctx.config
    prompts = ctx.rows("root", "root.jsonl")[: config.counts.judge_prompts]
    conversations = {i: judge_messages(p["messages"][-1]["content"], p["candidates"]) for i, p in enumerate(prompts)}
    pairs, stats = {}, {"examples_in": len(prompts), "retried": 0, "skipped": 0}
    for attempt in range(config.counts.judge_retries + 1):
        pending = sorted(conversations)
        if not pending:
            break
        replies = ctx.ask("judge", [teacher_request(conversations[i], config, 0.0, VERDICT_SCHEMA) for i in pending])
        for i, reply in zip(pending, replies):
            try:
                if not reply.ok:
                    raise ValueError(reply.error)
                verdict = reply.json()
                best, worst = check_verdict(verdict, len(prompts[i]["candidates"]))
            except (ValueError, JSONRepairError) as exc:
                if attempt == config.counts.judge_retries or not reply.ok:
                    stats["skipped"] += 1
                    del conversations[i]
                else:
                    stats["retried"] += 1
                    conversations[i] = retry_messages(conversations[i], reply.text, str(exc))
                continue
            candidates = prompts[i]["candidates"]
            pairs[i] = {"messages": prompts[i]["messages"], "chosen": candidates[best], "rejected": candidates[worst],
                        "reason": verdict.get("reason", "")}
            del conversations[i]
    rows = [pairs[i] for i in sorted(pairs)]
    write_jsonl(ctx.dir("judge") / "pairs.jsonl", rows)
    return stats | {"examples_out": len(rows)}


def senior_dpo(ctx: Context) -> dict:
    """DPO from the junior: the merged junior is the base, so the adapter-disabled model is the
    reference (SPEED: reference = junior, beta 0.1)."""
    from speedx.align.training import merge_adapter, train_dpo

    config, pairs = ctx.config, ctx.rows("judge", "pairs.jsonl")
    if not pairs:
        raise ValueError("stage senior_dpo: the judge produced no preference pairs")
    junior = merge_adapter(ctx.base_checkpoint, ctx.out / "junior_sft" / "adapter", ctx.out / "junior_merged")
    hp = config.dpo
    adapter = train_dpo(junior, pairs, ctx.dir("senior_dpo") / "adapter", lr=hp.lr, beta=config.dpo_beta,
                        batch_size=hp.batch_size, epochs=hp.epochs, max_steps=hp.max_steps, lora_r=hp.lora_r,
                        lora_alpha=hp.lora_alpha, max_length=hp.max_length, seed=config.seed)
    return {"examples_in": len(pairs), "adapter": str(adapter)}


def revisions(ctx: Context) -> dict:
    """The teacher revises one root example per prompt (the first with the family's fields: fixing
    the rest is the revision's job), with the prompt the revisor will see."""
    config = ctx.config
    jobs = []
    for row in ctx.rows("root", "root.jsonl"):
        family = FAMILIES[row["family"]]
        for text in row["candidates"]:
            try:
                example = parse_json_object(text)
            except JSONRepairError:
                continue
            if sorted(example) == sorted(family.keys):
                jobs.append((row, family, revision_messages(family, row["task"], row["messages"][-1]["content"], example)))
                break
        if len(jobs) == config.counts.revisions:
            break
    if not jobs:
        raise ValueError("no root candidate parses as its family's JSON (truncated? raise generation.max_tokens)")
    requests = [teacher_request(messages, config, 0.0, family.json_schema()) for _, family, messages in jobs]
    records, rejected = [], 0
    for (row, family, messages), reply in zip(jobs, ctx.ask("revisions", requests)):
        try:
            revised = reply.json() if reply.ok else None
        except JSONRepairError:
            revised = None
        if revised is None or validate_example(family, revised, row["knobs"]) is not None:
            rejected += 1
            continue
        records.append({"messages": messages, "completion": json.dumps(revised, ensure_ascii=False),
                        "family": family.name, "task": row["task"]})
    write_jsonl(ctx.dir("revisions") / "revisions.jsonl", records)
    return {"examples_in": len(jobs), "examples_out": len(records), "rejected": rejected}


def revisor_sft(ctx: Context) -> dict:
    return _sft(ctx, "revisor_sft", ctx.rows("revisions", "revisions.jsonl"), ctx.config.revisor, ctx.base_checkpoint)


def final(ctx: Context) -> dict:
    """`speedx.generate` with the senior (merged junior + DPO adapter) writing and the revisor
    (base + its adapter) revising each example once; its run directory resumes on its own."""
    from speedx.generate import main as generate

    config = ctx.config
    folder = ctx.dir("final")
    tasks = [{"task": row["task"], "family": row["family"]} for row in ctx.rows("brainstorm", "tasks.jsonl")]
    write_jsonl(folder / "tasks.jsonl", tasks)
    argv = [
        "--model", str(ctx.out / "junior_merged"), "--lora", str(ctx.out / "senior_dpo" / "adapter"),
        "--revisor", str(ctx.base_checkpoint), "--revisor-lora", str(ctx.out / "revisor_sft" / "adapter"),
        "--tasks", str(folder / "tasks.jsonl"), "--num-examples", str(config.counts.final_examples),
        "--families", ",".join(f.name for f in ctx.families), "--seed", str(config.seed),
        "--temperature", str(config.generation.temperature), "--top-p", str(config.generation.top_p),
        "--max-tokens", str(config.generation.max_tokens), "--dtype", config.student.dtype,
        "--out", str(folder / "run"), "--no-progress",
    ]
    if generate(argv) != 0:
        raise ValueError("the final synthesis run refused its arguments (see the error above)")
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    return {"examples_in": config.counts.final_examples, "examples_out": manifest.get("examples", 0),
            "data": str(folder / "run" / "examples.jsonl")}


STAGE_FUNCTIONS = {name: globals()[name] for name in STAGES}
