"""The embedding trainer (python -m speedx.train): data loading, GradCache, training, save/load, scaling, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from speedx.embed.data import DataError, format_query, load_training_rows, to_dataset
from speedx.embed.scaling import fit_log_linear, nested_subsets, parse_sizes
from speedx.train import main

INSTRUCTION = "Given a person's name, retrieve what they do for a living"
NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zara",
         "Anton", "Bea", "Cyrus", "Dilnoza", "Eero", "Fleur"]
JOBS = ["bakes sourdough bread before sunrise", "repairs diesel engines on fishing boats", "teaches violin to children",
        "designs suspension bridges", "writes tax software in Rust", "grows orchids in a greenhouse",
        "drives a night bus across the city", "studies volcanic rocks in Iceland", "translates poetry from Persian",
        "trains guide dogs for the blind", "restores medieval manuscripts", "sells spices at a market stall",
        "flies cargo planes to remote islands", "brews beer in a small garage", "paints murals on school walls",
        "builds wooden canoes by hand", "cuts hair in a barbershop", "codes video game physics",
        "audits hospital budgets", "keeps bees on a rooftop", "coaches a youth football team",
        "operates cranes at the harbor", "edits documentary films", "tests the purity of drinking water",
        "sews wedding dresses", "maps caves with lasers", "tunes pianos for concert halls",
        "rescues swimmers as a lifeguard", "forecasts the weather on radio", "welds steel for ship hulls",
        "delivers mail by bicycle", "cooks ramen in a tiny shop"]


def toy_examples() -> list[dict]:
    """A held-in toy task the base model cannot solve (names carry no hint of the job): synthesis rows."""
    return [{"query": f"What does {name} do for work?", "positive": job, "negatives": [], "instruction": INSTRUCTION,
             "task": INSTRUCTION, "family": "retrieval"} for name, job in zip(NAMES, JOBS)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_mrr(model) -> float:
    """Mean reciprocal rank of each query's own job among all jobs (cosine similarity)."""
    queries = [format_query(r["query"], INSTRUCTION) for r in toy_examples()]
    q = model.encode(queries, convert_to_tensor=True, normalize_embeddings=True)
    d = model.encode(JOBS, convert_to_tensor=True, normalize_embeddings=True)
    scores = q @ d.T
    ranks = (scores > scores.diag()[:, None]).sum(1) + 1
    return float((1.0 / ranks.float()).mean())


# ------------------------------------------------------------------------------------------------ data

def test_rows_prefix_only_the_query_side(tmp_path):
    rows = [
        {"query": "q1", "positive": "p1", "negatives": ["n1a", "n1b"], "instruction": "Find it", "family": "retrieval"},
        {"anchor": "Instruct: X\nQuery: q2", "positive": "p2", "negative": "n2"},  # the export's triplets
        {"anchor": "q3", "positive": "p3", "negative_2": "n3b", "negative_1": "n3a"},
        {"query": "q4", "positive": "p4", "negatives": []},  # no instruction: bare query
    ]
    loaded = load_training_rows(write_jsonl(tmp_path / "ex.jsonl", rows), max_negatives=2)
    assert [r["anchor"] for r in loaded] == ["Instruct: Find it\nQuery: q1", "Instruct: X\nQuery: q2", "q3", "q4"]
    assert [r["positive"] for r in loaded] == ["p1", "p2", "p3", "p4"]
    assert [r["negatives"] for r in loaded] == [["n1a", "n1b"], ["n2"], ["n3a", "n3b"], []]
    assert load_training_rows(tmp_path / "ex.jsonl")[0]["negatives"] == ["n1a"]  # default: one hard negative

    data = to_dataset(loaded)  # grouped by negative count; columns in the order the loss reads them
    assert sorted(data) == ["neg0", "neg1", "neg2"]
    assert data["neg2"].column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert data["neg2"]["negative_1"] == ["n1a", "n3a"]
    assert data["neg0"].column_names == ["anchor", "positive"]
    single = to_dataset(loaded[:1])
    assert single.column_names == ["anchor", "positive", "negative_1", "negative_2"]


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not valid JSON"),
    ('{"positive": "p"}', ":2: missing field 'query'"),
    ('{"query": "q"}', ":2: missing field 'positive'"),
    ('{"query": "q", "positive": ""}', ":2: field 'positive' must be a non-empty string"),
    ('{"query": "q", "positive": "p", "negatives": "n"}', ":2: field 'negatives' must be a list"),
    ('[1, 2]', ":2: expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n' + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")) as info:
        load_training_rows(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------- GradCache

def test_gradcache_gradient_equals_full_batch():
    from sentence_transformers import SentenceTransformer

    from speedx.embed.default_embedder import resolve_embedder
    from speedx.embed.losses import InfoNCELoss
    from speedx.embed.trainer import CachedInfoNCELoss

    model = SentenceTransformer(resolve_embedder("default"), device="cpu").eval()  # no dropout: exact comparison
    anchors = [format_query(f"What does {n} do for work?", INSTRUCTION) for n in NAMES[:6]]
    columns = [anchors, JOBS[:6], JOBS[6:12]]

    def grads(loss_fn):
        model.zero_grad()
        loss = loss_fn([model.preprocess(texts) for texts in columns])
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full_loss, full = grads(InfoNCELoss(model, scale=20.0))
    cached_loss, cached = grads(CachedInfoNCELoss(model, mini_batch_size=4, scale=20.0))  # chunks 4 + 2
    assert torch.allclose(full_loss, cached_loss, atol=1e-5)
    assert full.shape == cached.shape and full.norm() > 0
    # Relative to the whole gradient: some entries (key biases) are exactly zero in theory, pure rounding here.
    assert float((full - cached).norm() / full.norm()) < 1e-5


# ---------------------------------------------------------------------------------- train, save, load

def test_cli_train_improves_toy_retrieval_and_saves_a_loadable_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    from speedx.embed.default_embedder import resolve_embedder

    data = write_jsonl(tmp_path / "examples.jsonl", toy_examples())
    out = tmp_path / "model"
    before = toy_mrr(SentenceTransformer(resolve_embedder("default"), device="cpu"))
    rc = main(["--data", data, "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "2e-4", "--scale", "20",
               "--warmup-ratio", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    loaded = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    after = toy_mrr(loaded)
    assert after > before + 0.1, (before, after)
    assert json.loads((out / "speedx_train.json").read_text())["steps"] == 12


def test_save_load_round_trip_gives_identical_embeddings(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from speedx.embed.data import load_training_rows
    from speedx.embed.trainer import TrainConfig, train_embedder

    examples = toy_examples()[:8]
    for example in examples[:4]:  # rows with and without a hard negative train side by side
        example["negatives"] = [JOBS[-1]]
    rows = load_training_rows(write_jsonl(tmp_path / "ex.jsonl", examples))
    cfg = TrainConfig(batch_size=4, max_steps=2, device="cpu", progress=False)
    model, stats = train_embedder(rows, cfg, tmp_path / "m")
    assert stats["steps"] == 2 and not stats["lora"]
    texts = JOBS[:5]
    loaded = SentenceTransformer(str(tmp_path / "m"), device="cpu", local_files_only=True)
    assert torch.allclose(model.encode(texts, convert_to_tensor=True), loaded.encode(texts, convert_to_tensor=True),
                          atol=1e-6)

    monkeypatch.setenv("WORLD_SIZE", "2")  # cross-device negatives need one column layout on every process
    with pytest.raises(ValueError, match="different numbers of negatives"):
        train_embedder(rows, cfg)


def mined_like_rows(n: int) -> list[dict]:
    """Rows whose hard negative is the next row's positive, as mining often gives: a batch cannot
    hold both rows (the negative would be a false in-batch negative), so the sampler defers one."""
    return [{"anchor": f"query: what does {NAMES[i]} do?", "positive": JOBS[i], "negatives": [JOBS[(i + 1) % n]]}
            for i in range(n)]


def test_no_duplicates_sampler_length_is_the_batches_a_pass_yields():
    from speedx.embed.trainer import ExactNoDuplicatesBatchSampler

    rows = mined_like_rows(22)
    sampler = ExactNoDuplicatesBatchSampler(to_dataset(rows), batch_size=16, drop_last=False,
                                            generator=torch.Generator(), seed=0)
    batches = list(sampler)
    assert len(batches) > math.ceil(22 / 16)  # deferred rows make extra batches ...
    assert len(sampler) == len(batches)  # ... which len(), the Trainer's step count, includes
    assert sorted(i for batch in batches for i in batch) == list(range(22))
    for batch in batches:
        texts = [t for i in batch for t in (rows[i]["anchor"], rows[i]["positive"], *rows[i]["negatives"])]
        assert len(texts) == len(set(texts))
    sampler.set_epoch(1)
    assert sorted(i for batch in sampler for i in batch) == list(range(22))


def test_training_sees_every_row_and_a_one_step_run_trains(monkeypatch):
    """Deferred rows are not cut off the epoch; the single step of a 1-step run has a learning rate
    above 0 (warmup steps round down)."""
    from sentence_transformers import SentenceTransformer

    from speedx.embed.default_embedder import resolve_embedder
    from speedx.embed.losses import InfoNCELoss
    from speedx.embed.trainer import TrainConfig, train_embedder

    anchors = []
    real_forward = InfoNCELoss.forward
    monkeypatch.setattr(InfoNCELoss, "forward",
                        lambda self, features, labels=None: anchors.append(len(features[0]["input_ids"]))
                        or real_forward(self, features, labels))
    rows = mined_like_rows(22)
    model, stats = train_embedder(rows, TrainConfig(batch_size=64, device="cpu", progress=False))
    assert sum(anchors) == 22 and stats["steps"] == len(anchors) > 1

    base = SentenceTransformer(resolve_embedder("default"), device="cpu")
    model, stats = train_embedder(rows, TrainConfig(batch_size=4, max_steps=1, device="cpu", progress=False))
    assert stats["steps"] == 1
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values())]
    assert any(changed)


def test_an_encoder_stays_without_lora_under_any_pooling():
    from speedx.embed.trainer import TrainConfig, load_model

    model, use_lora = load_model(TrainConfig(pooling="lasttoken", device="cpu"))
    assert model[1].pooling_mode == "lasttoken" and not use_lora


def input_ids(model, text: str) -> list[int]:
    """The token ids the model's first module feeds the network for one text."""
    return model.preprocess([text])["input_ids"][0].tolist()


def test_decoder_reads_plain_text_plus_eos_despite_a_chat_template(tmp_path, tiny_llama):
    """The tiny tokenizer has a chat template; sentence-transformers would render inputs through it
    (`<s>user: text\n`, no EOS), so last-token pooling would read the template's newline."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from speedx.embed.trainer import TrainConfig, load_model

    path, _, tokenizer = tiny_llama
    assert tokenizer.chat_template
    text = "the quick brown fox"
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    model, _ = load_model(TrainConfig(model=str(path), device="cpu"))  # a causal-LM directory
    assert input_ids(model, text) == expected
    assert tokenizer.decode(expected) == text + tokenizer.eos_token  # no chat markers

    # A sentence-transformers directory with last-token pooling saved with the chat-template input
    # (what an earlier speedx saved) is fed plain text too.
    transformer = Transformer(str(path))
    assert "message" in transformer.modality_config
    st_dir = tmp_path / "st"
    SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "lasttoken"),
                                 Normalize()], device="cpu").save(str(st_dir))
    model, _ = load_model(TrainConfig(model=str(st_dir), device="cpu"))
    assert input_ids(model, text) == expected


def test_decoder_last_token_pooling_with_lora_trains_merges_and_loads(tmp_path, tiny_llama):
    from peft import PeftModel
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from speedx.embed.data import load_training_rows
    from speedx.embed.trainer import TrainConfig, train_embedder

    path, hf_model, tokenizer = tiny_llama
    rows = load_training_rows(write_jsonl(tmp_path / "ex.jsonl", [
        {"query": "the quick brown fox", "positive": "jumps over the lazy dog", "negatives": ["a small robot paints"],
         "instruction": "find"},
        {"query": "embedding models learn", "positive": "queries and documents", "negatives": ["hard negatives look"],
         "instruction": "find"},
        {"query": "bright colors", "positive": "the sky in bright colors", "negatives": ["they teach the model"],
         "instruction": "find"},
        {"query": "neighbours share meaning", "positive": "one space where", "negatives": ["relevant but do not"],
         "instruction": "find"}]))
    cfg = TrainConfig(model=str(path), batch_size=4, max_steps=1, lr=1e-2, lora_r=4, warmup_ratio=0, device="cpu",
                      progress=False)
    model, stats = train_embedder(rows, cfg, tmp_path / "m")
    assert stats["lora"] and stats["steps"] == 1
    assert model[1].pooling_mode == "lasttoken" and not isinstance(model[0].model, PeftModel)  # merged
    assert model[0].tokenizer("the fox")["input_ids"][-1] == tokenizer.eos_token_id  # EOS appended

    saved = tmp_path / "m"
    assert not (saved / "adapter_config.json").exists()
    weights = load_file(str(saved / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    q_proj = next(v for k, v in weights.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(q_proj, hf_model.model.layers[0].self_attn.q_proj.weight)  # the adapter was merged in

    loaded = SentenceTransformer(str(saved), device="cpu", local_files_only=True)
    assert loaded[1].pooling_mode == "lasttoken"
    assert loaded[0].tokenizer("the fox")["input_ids"][-1] == tokenizer.eos_token_id
    # The reloaded model is fed plain text + EOS as in training, not the tokenizer's chat template.
    assert input_ids(loaded, "the fox") == input_ids(model, "the fox") == tokenizer("the fox")["input_ids"] + [
        tokenizer.eos_token_id]
    texts = ["the quick brown fox", "a small robot"]
    assert torch.allclose(model.encode(texts, convert_to_tensor=True), loaded.encode(texts, convert_to_tensor=True),
                          atol=1e-5)


# -------------------------------------------------------------------------------------------- scaling

def test_fit_log_linear_recovers_the_curve():
    sizes = [1000, 2000, 4000, 8000]
    fit = fit_log_linear(sizes, [0.1 + 0.05 * math.log(n) for n in sizes])
    assert fit["a"] == pytest.approx(0.1) and fit["b"] == pytest.approx(0.05) and fit["r2"] == pytest.approx(1.0)
    assert fit["per_doubling"] == pytest.approx(0.05 * math.log(2))
    with pytest.raises(ValueError):
        fit_log_linear([1000], [0.5])


def test_nested_subsets_and_sizes():
    rows = list(range(10))
    subsets = nested_subsets(rows, [3, 6, 10], seed=1)
    assert subsets[6][:3] == subsets[3] and sorted(subsets[10]) == rows
    assert nested_subsets(rows, [3], seed=1) == {3: subsets[3]}
    with pytest.raises(ValueError, match="exceeds the 10 training examples"):
        nested_subsets(rows, [3, 11])
    assert parse_sizes("4000, 1000,2000,1000") == [1000, 2000, 4000]
    for bad in ("", "1k", "0,5"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_cli_scaling_study_with_a_stub_evaluator(tmp_path, monkeypatch, capsys):
    from speedx.embed import evaluation, scaling

    scores = iter([0.2] + [0.3 + 0.02 * math.log(n) for n in (8, 16, 32)])  # base model, then each size
    seen = []

    def fake_evaluate(model, tasks, query_instruction=None):
        seen.append((tasks, query_instruction))
        return {t: {"main_score": s} for t, s in zip(tasks, [next(scores)] * len(tasks))}

    monkeypatch.setattr(scaling, "default_evaluator", fake_evaluate)
    monkeypatch.setattr(evaluation, "resolve_task", lambda spec: spec)  # the stub's task "toy" is known
    data = write_jsonl(tmp_path / "examples.jsonl", toy_examples())
    out = tmp_path / "scaling"
    rc = main(["--data", data, "--out", str(out), "--scaling", "32,8,16", "--max-steps", "1", "--batch-size", "4",
               "--eval-tasks", "toy", "--eval-instruction", "Find the passage", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert seen == [(["toy"], "Instruct: Find the passage\nQuery: ")] * 4  # queries prefixed as in training
    report = json.loads((out / "scaling.json").read_text())
    assert [r["n"] for r in report["table"]] == [8, 16, 32] and all(r["steps"] == 1 for r in report["table"])
    assert report["base"]["score"] == pytest.approx(0.2)
    assert report["fit"]["a"] == pytest.approx(0.3) and report["fit"]["b"] == pytest.approx(0.02)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/missing.jsonl"], "no training data at"),
    (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:1: missing field 'positive'"),
    (["--data", "{tmp}/ok.jsonl", "--scaling", "2,64"], "--scaling size 64 exceeds the 2 training examples"),
    (["--data", "{tmp}/ok.jsonl", "--scaling", "a,b"], "bad --scaling"),
    (["--data", "{tmp}/ok.jsonl", "--batch-size", "0"], "batch-size must be >= 1"),
    (["--data", "{tmp}/ok.jsonl", "--eval-instruction", "Find it"], "--eval-instruction applies to the evaluation"),
    (["--data", "{tmp}/ok.jsonl", "--model", "{tmp}/no-such-model", "--out", "{tmp}/o"], "is not a directory"),
    (["--data", "{tmp}/ok.jsonl", "--model", "{tmp}/config-only", "--out", "{tmp}/o"], "could not load an embedding model from"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"query": "q"}\n')
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "bert"}')
    write_jsonl(tmp_path / "ok.jsonl", toy_examples()[:2])
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_cli_out_refuses_a_foreign_directory_and_replaces_its_own_output(tmp_path, capsys, monkeypatch):
    from speedx.embed import trainer

    def fake_train(rows, cfg, out):  # what matters here is the directory, not the model
        (out / "speedx_train.json").write_text("{}")
        return None, {"examples": len(rows), "steps": 1, "train_loss": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(trainer, "train_embedder", fake_train)
    data = write_jsonl(tmp_path / "ok.jsonl", toy_examples()[:2])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    argv = ["--data", data, "--out", str(out)]
    assert main(argv) == 2  # a directory of the user's: left alone
    assert capsys.readouterr().err.strip() == (f"error: --out {out} is not empty: pass --overwrite to replace it, "
                                                "or choose another directory")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]

    assert main(argv + ["--overwrite"]) == 0  # replaced: nothing of the old contents stays
    assert sorted(p.name for p in out.iterdir()) == ["speedx_train.json"]

    (out / "stale").mkdir()  # an earlier output of speedx.train (another model's files) is replaced as a whole
    (out / "stale" / "tokenizer.json").write_text("{}")
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["speedx_train.json"]

    inside = write_jsonl(out / "data.jsonl", toy_examples()[:2])  # never deletes what the run reads
    assert main(["--data", inside, "--out", str(out), "--overwrite"]) == 2
    assert f"would delete {inside}, which this run reads" in capsys.readouterr().err
    assert (out / "data.jsonl").is_file()


def test_cli_unknown_eval_task_fails_before_training(tmp_path, capsys, monkeypatch):
    from speedx.embed import trainer

    monkeypatch.setattr(trainer, "train_embedder", lambda *a, **k: pytest.fail("trained before checking the tasks"))
    data = write_jsonl(tmp_path / "ok.jsonl", toy_examples()[:2])
    assert main(["--data", data, "--eval-tasks", "nosuchtask", "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'nosuchtask'" in capsys.readouterr().err


def test_cli_module_help_and_default_data_hint(tmp_path):
    run = [sys.executable, "-m", "speedx.train"]
    help_text = subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--data", "--model", "--out", "--epochs", "--batch-size", "--lr", "--max-steps", "--lora",
                 "--no-lora", "--pooling", "--mini-batch-size", "--scale", "--seed", "--scaling", "--eval-tasks"):
        assert flag in help_text
    missing = subprocess.run(run, check=False, capture_output=True, text=True, cwd=tmp_path)  # no speedx-out here
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error: no training data at speedx-out/examples.jsonl: "
                                      "run `python -m speedx.generate` first or pass --data FILE")


DDP_SCRIPT = """
import json, os, sys
import speedx.embed.losses as losses
shapes, twin = [], losses.infonce_torch
def spy(q, d, *args, **kwargs):
    shapes.append([q.shape[0], d.shape[0]])
    return twin(q, d, *args, **kwargs)
losses.infonce_torch = spy
from speedx.train import main
rc = main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
open(os.path.join(out, f"shapes{os.environ['RANK']}.json"), "w").write(json.dumps(shapes))
sys.exit(rc)
"""


def test_torchrun_two_cpu_processes_share_negatives(tmp_path):
    """DDP on CPU (gloo): each process scores its 4 queries against the 8 documents of both processes."""
    rows = toy_examples()
    for i, row in enumerate(rows):
        row["negatives"] = [JOBS[(i + 5) % len(JOBS)]]
    data = write_jsonl(tmp_path / "examples.jsonl", rows)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "ddp.py"), "--data", data, "--out", str(out), "--batch-size", "2", "--max-steps", "2",
           "--device", "cpu", "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU processes (gloo) even on a GPU machine
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((out / f"shapes{rank}.json").read_text()) == [[2, 8], [2, 8]]  # 2 ranks x 2 x (pos + neg)
    assert done.stdout.count("trained on 32 examples") == 1  # one report, from rank 0
    assert json.loads((out / "speedx_train.json").read_text())["world_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_decoder_lora_gradcache_and_fused_loss(tmp_path, tiny_llama):
    pytest.importorskip("datasets", reason="the GPU image lacks datasets (a core dependency everywhere else)")
    from sentence_transformers import SentenceTransformer

    from speedx.embed.data import load_training_rows
    from speedx.embed.trainer import TrainConfig, train_embedder

    path, _, tokenizer = tiny_llama
    rows = load_training_rows(write_jsonl(tmp_path / "ex.jsonl", toy_examples()[:16]))
    cfg = TrainConfig(model=str(path), batch_size=8, mini_batch_size=3, max_steps=2, lr=1e-2, lora_r=4,
                      warmup_ratio=0, progress=False)
    model, stats = train_embedder(rows, cfg, tmp_path / "m")
    assert stats["bf16"] and stats["lora"] and stats["steps"] == 2 and model.device.type == "cuda"
    assert model[0].model.dtype == torch.bfloat16  # frozen base in bf16, adapters merged in
    loaded = SentenceTransformer(str(tmp_path / "m"), device="cuda", local_files_only=True)
    assert loaded[0].tokenizer("the fox")["input_ids"][-1] == tokenizer.eos_token_id
    texts = JOBS[:4]
    a, b = (m.encode(texts, convert_to_tensor=True).float() for m in (model, loaded))
    assert torch.allclose(a, b, atol=2e-2)
