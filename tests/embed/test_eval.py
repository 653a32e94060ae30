"""`speedx.eval` / `speedx.embed.evaluation`: MTEB on local data, checked against hand computations."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from speedx.embed import evaluation
from speedx.embed.evaluation import EvalInputError, evaluate_model, resolve_task
from speedx.eval import main

DOCS = {
    "d1": ("Photosynthesis", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    "d2": ("", "The stock market fell sharply after the central bank raised interest rates."),
    "d3": ("Volcanoes", "Magma rises through the crust and erupts as lava and ash."),
    "d4": ("", "A good sourdough needs a lively starter and a long, slow fermentation."),
    "d5": ("Football", "The striker scored twice in the final minutes to win the cup."),
    "d6": ("", "Vaccines train the immune system to recognise a virus before infection."),
    "d7": ("Black holes", "Nothing, not even light, escapes from inside the event horizon."),
    "d8": ("", "Tides are caused mainly by the gravitational pull of the moon."),
    "d9": ("Coffee", "Espresso is brewed by forcing hot water through finely ground coffee."),
    "d10": ("", "Honeybees communicate the location of flowers with a waggle dance."),
    "d11": ("Inflation", "Rising prices reduce the purchasing power of money over time."),
    "d12": ("", "The Great Wall of China was built over many centuries."),
}
QUERIES = {
    "q1": "how do plants make food from light",
    "q2": "why do interest rates affect stocks and prices",
    "q3": "what comes out of an erupting volcano",
    "q4": "how to bake bread",
    "q5": "how do vaccines protect people",
    "q6": "what causes ocean tides",
}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d11": 1}, "q3": {"d3": 1}, "q4": {"d4": 1}, "q5": {"d6": 1}, "q6": {"d8": 1}}
PAIRS = [
    ("A man is playing a guitar.", "A person plays the guitar.", 4.6),
    ("A woman is slicing onions.", "Someone is cutting an onion.", 4.2),
    ("A dog runs across the field.", "A puppy is running on grass.", 3.8),
    ("Two kids are playing soccer.", "Children kick a ball in the park.", 3.5),
    ("The cat sleeps on the sofa.", "A cat is eating its dinner.", 2.2),
    ("A man rides a horse.", "A man is riding a bicycle.", 1.9),
    ("The chef is cooking pasta.", "A cook prepares noodles.", 3.9),
    ("A plane takes off from the runway.", "A woman reads a newspaper.", 0.2),
    ("Stocks fell sharply today.", "The market dropped a lot today.", 4.4),
    ("A girl is singing on stage.", "A boy is swimming in a pool.", 0.4),
    ("He said, \"I'm tired\".", "He said he was tired.", 4.0),
    ("The tab\tseparated text", "Text with a tab in it", 1.0),
]


def write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def model():
    from sentence_transformers import SentenceTransformer

    from speedx.embed.default_embedder import default_embedder_path

    return SentenceTransformer(str(default_embedder_path()), device="cpu")


@pytest.fixture(scope="module")
def random_bert_dir(tmp_path_factory):
    return build_random_bert(tmp_path_factory.mktemp("random-bert"))


@pytest.fixture(scope="module", params=["default", "random"])
def any_model(request, model, random_bert_dir):
    """The default embedder (perfect on the tiny fixtures) and a random model (imperfect rankings)."""
    from sentence_transformers import SentenceTransformer

    return model if request.param == "default" else SentenceTransformer(str(random_bert_dir), device="cpu")


@pytest.fixture
def beir_dir(tmp_path):
    folder = tmp_path / "tinybeir"
    (folder / "qrels").mkdir(parents=True)
    corpus = [{"_id": doc_id, "title": title, "text": text} for doc_id, (title, text) in DOCS.items()]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    queries = [{"_id": qid, "text": text} for qid, text in QUERIES.items()]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    rows = [(qid, doc_id, rel) for qid, docs in QRELS.items() for doc_id, rel in docs.items()]
    write_tsv(folder / "qrels" / "test.tsv", ("query-id", "corpus-id", "score"), rows)
    return folder


@pytest.fixture
def sts_tsv(tmp_path):
    return write_tsv(tmp_path / "tiny_sts.tsv", ("sentence1", "sentence2", "score"), PAIRS)


def hand_ndcg_at_10(q_emb, d_emb, doc_ids, query_ids):
    sims = q_emb @ d_emb.T  # embeddings are normalised below, so this is cosine
    total = 0.0
    for i, qid in enumerate(query_ids):
        ranking = [doc_ids[j] for j in np.argsort(-sims[i])[:10]]
        dcg = sum(1 / math.log2(rank + 2) for rank, d in enumerate(ranking) if d in QRELS[qid])
        idcg = sum(1 / math.log2(rank + 2) for rank in range(min(10, len(QRELS[qid]))))
        total += dcg / idcg
    return total / len(query_ids)


@pytest.mark.parametrize("instruction", [None, "Represent this question for retrieving answers: "])
def test_retrieval_ndcg_matches_hand_computation(any_model, beir_dir, instruction):
    model = any_model
    result = evaluate_model(model, [str(beir_dir)], query_instruction=instruction)[str(beir_dir)]
    assert result["metric"] == "ndcg_at_10" and result["task_type"] == "Retrieval"
    doc_ids = list(DOCS)
    # MTEB reads a document as title + " " + text (just text when the title is empty).
    doc_texts = [f"{t} {x}".strip() for t, x in DOCS.values()]
    queries = [(instruction or "") + q for q in QUERIES.values()]
    d_emb = model.encode(doc_texts, normalize_embeddings=True)
    q_emb = model.encode(queries, normalize_embeddings=True)
    expected = hand_ndcg_at_10(q_emb, d_emb, doc_ids, list(QUERIES))
    assert result["main_score"] == pytest.approx(expected, abs=1e-4)
    assert result["scores"]["ndcg_at_10"] == result["main_score"]
    assert model.prompts.get("query", "") == ""  # the caller's model is left as it was


def test_sts_spearman_matches_scipy(any_model, sts_tsv):
    model = any_model
    result = evaluate_model(model, [str(sts_tsv)])[str(sts_tsv)]
    assert result["metric"] == "cosine_spearman" and result["task_type"] == "STS"
    e1 = model.encode([p[0] for p in PAIRS], normalize_embeddings=True)
    e2 = model.encode([p[1] for p in PAIRS], normalize_embeddings=True)
    expected = spearmanr([p[2] for p in PAIRS], (e1 * e2).sum(axis=1)).statistic
    assert result["main_score"] == pytest.approx(expected, abs=1e-6)


def build_random_bert(path):
    """A randomly initialised tiny BERT with the default embedder's tokenizer: a deliberately bad model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from speedx.embed.default_embedder import default_embedder_path

    tokenizer = AutoTokenizer.from_pretrained(str(default_embedder_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_default_embedder_beats_a_random_model(random_bert_dir, beir_dir, sts_tsv):
    tasks = [str(beir_dir), str(sts_tsv)]
    good_scores = evaluate_model("default", tasks)
    bad_scores = evaluate_model(str(random_bert_dir), tasks)  # a plain transformers directory: mean pooling is added
    for task in tasks:
        assert good_scores[task]["main_score"] > bad_scores[task]["main_score"] + 0.2, task


def test_classification_cross_validation(model, tmp_path):
    rows = [(f"please {verb} my {thing} now", verb) for verb in ("cancel", "refund", "upgrade")
            for thing in ("order", "purchase", "plan", "subscription", "account", "item", "booking", "ticket", "card", "payment")]
    path = write_tsv(tmp_path / "intents.tsv", ("text", "label"), rows)
    task = evaluation.make_task("classification", "intents", path)  # a task object is accepted as well as a spec
    result = evaluate_model(model, [task])["intents"]
    assert result["metric"] == "accuracy" and result["task_type"] == "Classification"
    assert len(result["scores"]["scores_per_experiment"]) == 5  # MTEB's 5 folds
    assert result["main_score"] > 0.9


# ------------------------------------------------------------------------------------- task specs

def test_resolve_paths_and_names(beir_dir, sts_tsv, monkeypatch, tmp_path):
    assert resolve_task(str(beir_dir)).metadata.type == "Retrieval"
    task = resolve_task(str(sts_tsv))
    assert task.metadata.type == "STS" and (task.min_score, task.max_score) == (0.2, 4.6)
    task.load_data()
    assert task.dataset["default"]["test"]["sentence1"][11] == "The tab\tseparated text"  # csv quoting, not split
    monkeypatch.setenv("SPEEDX_EVALDATA", str(tmp_path))
    with pytest.raises(EvalInputError, match="missing from the evaldata folder"):
        resolve_task("stsb")
    monkeypatch.setenv("SPEEDX_EVALDATA", str(tmp_path / "nowhere"))
    with pytest.raises(EvalInputError, match="SPEEDX_EVALDATA=.* is not a directory"):
        resolve_task("stsb")


@pytest.mark.parametrize("spec, message", [
    ("no-such-task", "unknown task 'no-such-task'"),
    ("missing/folder", "task path not found"),
    ("missing.tsv", "STS file not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(EvalInputError, match=message):
        resolve_task(spec)


def test_bad_files(tmp_path, beir_dir):
    bad_header = write_tsv(tmp_path / "bad.tsv", ("a", "b", "score"), [("x", "y", 1), ("z", "w", 2)])
    with pytest.raises(EvalInputError, match="header must name .*sentence1, sentence2, score"):
        resolve_task(str(bad_header))
    bad_score = write_tsv(tmp_path / "bad_score.tsv", ("sentence1", "sentence2", "score"), [("x", "y", "high"), ("a", "b", 1)])
    with pytest.raises(EvalInputError, match="row 2 score 'high' is not a number"):
        resolve_task(str(bad_score))
    constant = write_tsv(tmp_path / "flat.tsv", ("sentence1", "sentence2", "score"), [("x", "y", 3), ("a", "b", 3)])
    with pytest.raises(EvalInputError, match="needs varying scores"):
        resolve_task(str(constant))
    (beir_dir / "qrels" / "test.tsv").unlink()
    with pytest.raises(EvalInputError, match="not a BEIR folder, missing qrels/test.tsv"):
        resolve_task(str(beir_dir)).load_data()


def test_bad_model_path(tmp_path, sts_tsv):
    with pytest.raises(EvalInputError, match="model not found"):
        evaluate_model(str(tmp_path / "no-model"), [str(sts_tsv)])


@pytest.mark.parametrize("name, message", [
    ("STSBenchmark", "not available offline.*local copy is task 'stsb'"),
    ("Banking77Classification.v2", "not available offline"),  # a dotted name is a task name, not a path
])
def test_standard_mteb_name_without_local_data(model, name, message):
    # No Hugging Face dataset cache here, and the hub is never contacted: a clear error (naming the local copy).
    with pytest.raises(EvalInputError, match=message):
        evaluate_model(model, [name])


def test_cuda_without_a_gpu(sts_tsv):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EvalInputError, match="no CUDA device here"):
        evaluate_model("default", [str(sts_tsv)], device="cuda")


# ----------------------------------------------------------------------------------- real evaldata

@pytest.fixture(scope="module")
def evaldata():
    try:
        return evaluation.evaldata_dir()
    except EvalInputError as exc:
        pytest.skip(f"evaldata folder not found ({exc})")


def test_real_sets_load_with_published_sizes(evaldata):
    sizes = {"stsb": 1379, "sick-r": 4927, "sick-r-all": 9927, "sts12": 3108, "sts13": 1500, "sts14": 3750,
             "sts15": 3000, "sts16": 1186, "banking77": 3080}
    for name, n in sizes.items():
        task = resolve_task(name)
        task.load_data()
        assert len(task.dataset["default"]["test"]) == n, name
    for name, (docs, queries, qrels) in {"scifact": (5183, 300, 339), "cisi": (1460, 76, 3114)}.items():
        task = resolve_task(name)
        task.load_data()
        split = task.dataset["default"]["test"]
        assert (len(split["corpus"]), len(split["queries"]), sum(map(len, split["relevant_docs"].values()))) == (docs, queries, qrels)
    assert set(evaluation.list_local_tasks()) == set(evaluation.LOCAL_TASKS)


def test_default_beats_random_on_real_stsb_subset(evaldata, tmp_path, random_bert_dir):
    # The first 200 STS-B test pairs (a named subset file, not the official 'stsb' number).
    with open(evaldata / "stsb" / "test.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    subset = write_tsv(tmp_path / "stsb_first200.tsv", rows[0], rows[1:201])
    good = evaluate_model("default", [str(subset)])[str(subset)]["main_score"]
    worse = evaluate_model(str(random_bert_dir), [str(subset)])[str(subset)]["main_score"]
    assert good > 0.75 and good > worse + 0.2


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_writes_json_and_table(sts_tsv, beir_dir, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    assert main(["--tasks", f"{sts_tsv},{beir_dir}", "--out", str(out), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "cosine_spearman" in printed and "ndcg_at_10" in printed and str(out) in printed
    doc = json.loads(out.read_text())
    assert doc["model"] == "default" and doc["tasks"] == [str(sts_tsv), str(beir_dir)]
    assert doc["mteb_version"].startswith("2.") and doc["time"] and doc["settings"]["batch_size"] == 8
    assert doc["scores"][str(sts_tsv)] == doc["results"][str(sts_tsv)]["main_score"]
    assert doc["results"][str(beir_dir)]["data"] == str(beir_dir)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no-such-task"], "unknown task"),
    (["--tasks", "nowhere/beir"], "task path not found"),
    (["--tasks", ""], "--tasks is empty"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "/no/such/model", "--tasks", "stsb"], "model not found"),
])
def test_cli_bad_input_exits_2(args, message, capsys, tmp_path):
    assert main([*args, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_cli_unwritable_out_and_unloadable_model_fail_first(tmp_path, capsys, sts_tsv):
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "bert"}')
    for args, message in ((["--out", str(tmp_path)], "is a directory"),
                          (["--model", str(tmp_path / "config-only")], "could not load an embedding model")):
        assert main(["--tasks", str(sts_tsv), "--out", str(tmp_path / "x.json"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_malformed_tsv_subprocess(tmp_path):
    bad = write_tsv(tmp_path / "bad.tsv", ("text", "score"), [("a", 1)])
    proc = subprocess.run([sys.executable, "-m", "speedx.eval", "--tasks", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "header must name" in proc.stderr


def test_cli_help_and_list(capsys, evaldata):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--tasks", "--out", "--batch-size", "--device", "--query-instruction", "--list"):
        assert flag in text
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert str(evaldata) in listing and "scifact" in listing and "sick-r" in listing
