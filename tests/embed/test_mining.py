"""Hard-negative mining: rank-window selection on hand-built scores, the pipeline with a stand-in
embedder, the real default embedder on topic-separated texts, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

from speedx.embed import mine as mine_cli
from speedx.embed import mining
from speedx.embed.mining import (
    build_corpus,
    check_settings,
    margin_threshold,
    mine_hard_negatives,
    query_text,
    select_negatives,
)

# --- rank-window selection on hand-built score matrices -----------------------------------------

# Two queries, ten results each, best first. Row 0's positive is doc 10 (rank 0), row 1's is doc 23.
SCORES = np.array([np.linspace(0.9, 0.45, 10), np.linspace(0.8, 0.35, 10)], dtype=np.float32)
IDS = np.array([np.arange(10, 20), np.arange(20, 30)])
POSITIVE_SCORES = np.array([0.9, 0.65], dtype=np.float32)


def pick(exclude=({10}, {23}), **settings):
    settings = {"num_negatives": 3, "range_min": 0, "range_max": 10, "margin": None, **settings}
    return [list(ids) for ids, _ in select_negatives(SCORES, IDS, POSITIVE_SCORES, list(exclude), **settings)]


def test_top_sampling_takes_best_ranked_allowed_candidates_and_skips_excluded_ids():
    assert pick() == [[11, 12, 13], [20, 21, 22]]
    # the query's own text (doc 12 for row 0) and a second positive (21 for row 1) are skipped too
    assert pick(exclude=({10, 12}, {23, 21})) == [[11, 13, 14], [20, 22, 24]]


def test_window_bounds_and_count():
    assert pick(range_min=2, range_max=6) == [[12, 13, 14], [22, 24, 25]]  # ranks 2..5 only; 23 is the positive
    assert pick(range_min=7, range_max=9, num_negatives=5) == [[17, 18], [27, 28]]  # the window runs out
    assert pick(num_negatives=1) == [[11], [20]]
    assert all(len(row) == 9 for row in pick(num_negatives=20))  # everything but the positive


def test_margin_drops_candidates_scoring_above_margin_times_positive():
    # row 0: threshold 0.9 * 0.9 = 0.81 drops scores 0.9, 0.85 (ranks 0, 1); row 1: 0.9 * 0.65 = 0.585
    got = select_negatives(SCORES, IDS, POSITIVE_SCORES, [{10}, {23}], num_negatives=3, range_min=0,
                           range_max=10, margin=0.9)
    assert list(got[0][0]) == [12, 13, 14] and list(got[1][0]) == [25, 26, 27]
    for (_, scores), threshold in zip(got, [0.81, 0.585]):
        assert np.all(scores <= threshold + 1e-6)
    assert margin_threshold(np.array([0.8]), 0.95) == pytest.approx(0.76)
    assert margin_threshold(np.array([-0.2]), 0.95) == pytest.approx(-0.21)  # stays below a negative positive score


def test_padding_ids_are_never_picked():
    ids = IDS.copy()
    ids[0, 5:] = -1  # FAISS pads with -1 when the corpus is smaller than k
    got = select_negatives(SCORES, ids, POSITIVE_SCORES, [{10}, {23}], num_negatives=9, range_min=0,
                           range_max=10, margin=None)
    assert list(got[0][0]) == [11, 12, 13, 14]


def test_random_sampling_is_seeded_in_window_and_in_rank_order():
    def sample(seed):
        got = select_negatives(SCORES, IDS, POSITIVE_SCORES, [{10}, {23}], num_negatives=3, range_min=1,
                               range_max=10, margin=None, sampling="random", rng=np.random.default_rng(seed))
        return [list(ids) for ids, _ in got]

    first = sample(0)
    assert first == sample(0)
    assert any(sample(seed) != first for seed in range(1, 6))
    for row, allowed in zip(first, [set(range(11, 20)), set(range(21, 30)) - {23}]):
        assert len(row) == 3 and set(row) <= allowed and row == sorted(row)


def test_check_settings_rejects_impossible_windows():
    for bad in [{"num_negatives": 0}, {"range_min": 5, "range_max": 3}, {"range_min": 3, "range_max": 3},
                {"range_min": -1}, {"num_negatives": 20, "range_min": 0, "range_max": 10}, {"margin": 1.5},
                {"sampling": "best"}]:
        settings = {"num_negatives": 3, "range_min": 2, "range_max": 200, "margin": 0.95, "sampling": "top", **bad}
        with pytest.raises(ValueError):
            check_settings(**settings)


def test_build_corpus_dedups_in_first_seen_order():
    records = [{"query": "q1", "positive": "a", "negatives": ["b", "a"]}, {"query": "q2", "positive": "b"}]
    assert build_corpus(records) == ["a", "b"]


# --- the pipeline with a stand-in embedder (fixed pseudo-random vectors per text) -----------------


class FakeEmbedder:
    """Records what it encodes; a text gets its vector from `fixed` or a pseudo-random unit vector."""

    def __init__(self, fixed=None):
        self.encoded, self.fixed = [], fixed or {}

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False):
        self.encoded.append(list(texts))
        vectors = np.stack([self.fixed.get(t, np.random.default_rng(zlib.crc32(t.encode())).normal(size=4))
                            for t in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fake_records():
    return [
        {"query": "what is a cat", "positive": "cats are small felines", "negatives": ["dogs bark"],
         "instruction": "Retrieve a definition", "task": "defs", "family": "retrieval", "id": 7},
        {"query": "what is a cat", "positive": "a cat is a pet", "negatives": [], "instruction": "Retrieve a definition"},
        {"query": "rain", "positive": "water falling from clouds", "instruction": ""},
    ]


def test_pipeline_prefixes_queries_only_and_excludes_positives_query_text_and_existing():
    model = FakeEmbedder()
    corpus = ["cats are small felines", "a cat is a pet", "dogs bark", "what is a cat", "rain",
              "snow is frozen", "the sun is hot", "fish swim"]
    out = mine_hard_negatives(fake_records(), model=model, corpus=corpus, num_negatives=8, range_min=0,
                              range_max=8, margin=None)
    queries, documents = model.encoded
    assert queries == ["Instruct: Retrieve a definition\nQuery: what is a cat", "rain"]  # each query embedded once
    assert documents[: len(corpus)] == corpus  # documents are plain
    # the two records of one query share their positives; the existing negative comes last, never twice
    assert out[0]["negatives"][-1] == "dogs bark"
    assert set(out[0]["negatives"][:-1]) == {"rain", "snow is frozen", "the sun is hot", "fish swim"}
    assert len(out[0]["mined_negative_scores"]) == 4 and len(out[1]["negatives"]) == 5
    assert "rain" not in out[2]["negatives"] and "water falling from clouds" not in out[2]["negatives"]
    assert len(out[2]["negatives"]) == len(corpus) - 1  # its positive is not in this corpus; only "rain" drops
    for record, mined in zip(fake_records(), out):  # every input field survives unchanged
        assert {k: v for k, v in mined.items() if k not in ("negatives", "mined_negative_scores")} == \
            {k: v for k, v in record.items() if k != "negatives"}
        assert mined["mined_negative_scores"] == sorted(mined["mined_negative_scores"], reverse=True)


def test_margin_uses_the_hardest_of_a_querys_positives():
    # cosine with the query: positives 1.0 and 0.5, candidates 0.6 and 0.4. The threshold is
    # 0.95 * min(1.0, 0.5) = 0.475, so 0.6 is dropped (it beats the weaker positive) and 0.4 kept.
    fixed = {"q": np.array([1.0, 0, 0, 0]), "p1": np.array([1.0, 0, 0, 0]), "p2": np.array([0.5, 0.75 ** 0.5, 0, 0]),
             "c": np.array([0.6, 0, 0.8, 0]), "d": np.array([0.4, 0, 0, 0.84 ** 0.5])}
    records = [{"query": "q", "positive": "p1"}, {"query": "q", "positive": "p2"}]
    out = mine_hard_negatives(records, model=FakeEmbedder(fixed), corpus=["p1", "p2", "c", "d"], num_negatives=2,
                              range_min=0, range_max=4)
    assert [r["negatives"] for r in out] == [["d"], ["d"]]
    assert out[0]["mined_negative_scores"] == pytest.approx([0.4], abs=1e-5)
    out = mine_hard_negatives(records, model=FakeEmbedder(fixed), corpus=["p1", "p2", "c", "d"], num_negatives=2,
                              range_min=0, range_max=4, margin=None)
    assert out[0]["negatives"] == ["c", "d"]


def test_pipeline_without_prefix_and_without_existing_negatives():
    model = FakeEmbedder()
    out = mine_hard_negatives(fake_records(), model=model, num_negatives=5, range_min=0, range_max=10,
                              margin=None, instruction_prefix=False, keep_existing=False)
    assert model.encoded[0] == ["what is a cat", "rain"]
    assert len(out[0]["negatives"]) == len(out[0]["mined_negative_scores"])  # only mined ones
    assert "dogs bark" in out[0]["negatives"]  # the default corpus holds the existing negatives
    assert query_text({"query": "q", "instruction": None}) == "q"


def test_pipeline_random_sampling_is_deterministic_given_a_seed():
    records = [{"query": f"query {i}", "positive": f"document {i}"} for i in range(30)]

    def run(seed):
        out = mine_hard_negatives(records, model=FakeEmbedder(), num_negatives=3, range_min=0, range_max=20,
                                  sampling="random", seed=seed)
        return [r["negatives"] for r in out]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_pipeline_rejects_bad_records_and_empty_corpus():
    with pytest.raises(ValueError, match="positive"):
        mine_hard_negatives([{"query": "q"}], model=FakeEmbedder())
    with pytest.raises(ValueError, match="empty"):
        mine_hard_negatives([{"query": "q", "positive": "p"}], model=FakeEmbedder(), corpus=[])


# --- the real default embedder on topic-separated texts -------------------------------------------

TOPICS = {
    "cooking": [
        ("How do I bake sourdough bread?", "Sourdough bread rises with a fermented starter and bakes in a hot Dutch oven."),
        ("How long should pasta boil?", "Dry spaghetti cooks in salted boiling water for about ten minutes."),
        ("How do you make a tomato sauce?", "Simmer crushed tomatoes with garlic, olive oil and basil for a simple sauce."),
        ("What is the best way to roast a chicken?", "Roast a whole chicken at 220 degrees until the skin is crisp and golden."),
        ("How do I cook rice on the stove?", "Rinse the rice, add water, and simmer it covered until the grains are tender."),
        ("How do I whip cream by hand?", "Whisk cold heavy cream with a little sugar until soft peaks form."),
    ],
    "astronomy": [
        ("Why is Mars red?", "Iron oxide dust on the surface of Mars gives the planet its rusty red color."),
        ("How far away is the Moon?", "The Moon orbits Earth at an average distance of about 384,000 kilometres."),
        ("What is a black hole?", "A black hole is a region of spacetime where gravity is so strong that not even light escapes."),
        ("How many moons does Jupiter have?", "Jupiter, the largest planet, has dozens of moons including Io and Europa."),
        ("What causes a solar eclipse?", "A solar eclipse happens when the Moon passes between the Sun and Earth."),
        ("How hot is the surface of the Sun?", "The visible surface of the Sun, the photosphere, is about 5,500 degrees Celsius."),
    ],
    "football": [
        ("How many players are on a soccer team?", "A soccer side fields eleven players, one of them the goalkeeper."),
        ("What is the offside rule in football?", "An attacker is offside when nearer the goal line than the second-last defender as the ball is played."),
        ("How long is a football match?", "A professional football match lasts two halves of forty-five minutes each."),
        ("Who won the 2014 World Cup?", "Germany beat Argentina in the final to win the 2014 FIFA World Cup in Brazil."),
        ("What does a red card mean?", "A referee shows a red card to send a player off the pitch for a serious foul."),
        ("How is a penalty kick taken?", "A penalty kick is taken from the spot twelve yards out with only the goalkeeper to beat."),
    ],
    "programming": [
        ("How do I reverse a list in Python?", "Call list.reverse() or use slicing with [::-1] to reverse a Python list."),
        ("What is a segmentation fault?", "A segmentation fault is a crash caused by a program accessing memory it is not allowed to."),
        ("How do I undo a git commit?", "Use git revert to add a commit that undoes changes, or git reset to move the branch back."),
        ("What is recursion in programming?", "Recursion is when a function calls itself to solve smaller instances of a problem."),
        ("How do I read a file in Python?", "Open the file with open(path) in a with block and call read() to get its text."),
        ("What is a hash table?", "A hash table maps keys to values by hashing each key to a bucket in an array."),
    ],
}
RECORDS = [{"query": q, "positive": p, "topic": t, "negatives": []} for t, pairs in TOPICS.items() for q, p in pairs]
TOPIC_OF = {r["positive"]: r["topic"] for r in RECORDS}


@pytest.fixture(scope="module")
def embedder():
    return mining.load_embedder("default", device="cpu")


def test_real_embedder_mines_same_topic_negatives_that_match_brute_force(embedder):
    out = mine_hard_negatives(RECORDS, model=embedder, num_negatives=3, range_min=0, range_max=24, margin=None,
                              device="cpu")
    for record in out:
        assert len(record["negatives"]) == 3
        assert record["positive"] not in record["negatives"] and record["query"] not in record["negatives"]
    # the hardest negative shares the query's topic far more often than chance (1 in 4)
    assert sum(TOPIC_OF[r["negatives"][0]] == r["topic"] for r in out) >= 20
    # FAISS's ranking is the exact cosine ranking
    queries = embedder.encode([r["query"] for r in RECORDS], normalize_embeddings=True)
    docs = embedder.encode([r["positive"] for r in RECORDS], normalize_embeddings=True)
    scores = queries @ docs.T
    np.fill_diagonal(scores, -np.inf)  # the positive
    for i, record in enumerate(out):
        expected = [RECORDS[j]["positive"] for j in np.argsort(-scores[i])[:3]]
        assert record["negatives"] == expected
        assert record["mined_negative_scores"] == pytest.approx(np.sort(scores[i])[::-1][:3], abs=1e-4)


def test_real_embedder_margin_drops_a_near_duplicate_of_the_positive(embedder):
    record = {"query": "Why is Mars red?", "positive": TOPICS["astronomy"][0][1]}
    near_duplicate = "Iron oxide dust on the surface of Mars gives the planet a rusty red colour."
    corpus = [r["positive"] for r in RECORDS] + [near_duplicate]
    kept = mine_hard_negatives([record], model=embedder, corpus=corpus, num_negatives=5, range_min=0, margin=None)
    dropped = mine_hard_negatives([record], model=embedder, corpus=corpus, num_negatives=5, range_min=0, margin=0.95)
    assert kept[0]["negatives"][0] == near_duplicate
    assert near_duplicate not in dropped[0]["negatives"] and len(dropped[0]["negatives"]) == 5


# --- the CLI --------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--input", "{tmp}/nope.jsonl"], "does not exist"),
    ("no-positive", ["--input", "{tmp}/bad.jsonl"], "bad.jsonl:2: missing field 'positive'"),  # as train says
    ("empty-corpus", ["--input", "{tmp}/ok.jsonl", "--corpus", "{tmp}/empty.txt"], "holds no documents"),
    ("window", ["--input", "{tmp}/ok.jsonl", "--range-min", "50", "--range-max", "10"], "range_min (50) must be smaller"),
    ("count", ["--input", "{tmp}/ok.jsonl", "--num-negatives", "0"], "num_negatives must be >= 1"),
    ("model", ["--input", "{tmp}/ok.jsonl", "--model", "{tmp}/no-such-model"], "is not a directory"),
    ("no-weights", ["--input", "{tmp}/ok.jsonl", "--model", "{tmp}/config-only"], "could not load an embedding model"),
    ("empty-negative", ["--input", "{tmp}/bad-negative.jsonl"], "bad-negative.jsonl:1: field 'negatives' must be"),
    ("not-utf8", ["--input", "{tmp}/latin1.jsonl"], "latin1.jsonl is not UTF-8 text"),
    ("device", ["--input", "{tmp}/ok.jsonl", "--device", "bogus"], "--device bogus: not a device name"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case, args, message):
    write_jsonl(tmp_path / "ok.jsonl", RECORDS[:2])
    write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"query": "q without a positive"}])
    write_jsonl(tmp_path / "bad-negative.jsonl", [{**RECORDS[0], "negatives": [""]}])
    (tmp_path / "latin1.jsonl").write_bytes('{"query": "caf\u00e9", "positive": "p"}\n'.encode("latin-1"))
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out.jsonl")]
    assert mine_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_never_overwrites_its_input(tmp_path, capsys):
    path = write_jsonl(tmp_path / "mined.jsonl", RECORDS[:2])  # re-mining the default output's name
    before = path.read_text()
    assert mine_cli.main(["--input", str(path)]) == 2
    assert "would overwrite --input" in capsys.readouterr().err and path.read_text() == before


def test_cli_process_exit_code_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "speedx.embed.mine", "--input", str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "speedx.embed.mine", "--help"], capture_output=True,
                               text=True, timeout=120, check=False).stdout
    for flag in ("--input", "--out", "--corpus", "--model", "--num-negatives", "--range-min", "--range-max",
                 "--margin", "--sampling", "--seed", "--batch-size", "--device"):
        assert flag in help_text


def test_cli_writes_mined_records_and_summary(tmp_path, capsys, monkeypatch, embedder):
    monkeypatch.setattr(mining, "load_embedder", lambda name, device=None: embedder)  # reuse the loaded model
    rows = [dict(r, instruction="Answer the question", negatives=["an existing negative"]) for r in RECORDS[:12]]
    write_jsonl(tmp_path / "examples.jsonl", rows)
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": str(i), "title": "", "text": r["positive"]}) + "\n" for i, r in enumerate(RECORDS)))
    out = tmp_path / "run" / "mined.jsonl"
    code = mine_cli.main(["--input", str(tmp_path / "examples.jsonl"), "--out", str(out), "--corpus",
                          str(tmp_path / "corpus.jsonl"), "--num-negatives", "4", "--range-min", "1", "--no-progress",
                          "--device", "cpu"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "mined 12 queries against 24 candidates" in summary and "queries/s" in summary
    assert "0 queries got fewer" in summary
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert not list(out.parent.glob("*.tmp"))
    assert len(mined) == 12
    for row, record in zip(rows, mined):
        assert {k: record[k] for k in row if k != "negatives"} == {k: v for k, v in row.items() if k != "negatives"}
        assert record["negatives"][-1] == "an existing negative" and len(record["negatives"]) == 5
        assert row["positive"] not in record["negatives"] and len(record["mined_negative_scores"]) == 4


def test_cli_reads_what_train_reads_a_run_directory_and_sentence_transformers_rows(tmp_path, monkeypatch):
    from speedx.embed.data import load_training_rows

    model = FakeEmbedder()
    monkeypatch.setattr(mining, "load_embedder", lambda name, device=None: model)
    run = tmp_path / "run"  # a synthesis run directory: its examples.jsonl, as `train --data run` reads
    run.mkdir()
    write_jsonl(run / "examples.jsonl", RECORDS[:8])
    settings = ["--num-negatives", "2", "--range-min", "0", "--margin", "none", "--no-progress"]
    assert mine_cli.main(["--input", str(run), *settings]) == 0
    file_out = tmp_path / "file.jsonl"
    assert mine_cli.main(["--input", str(run / "examples.jsonl"), "--out", str(file_out), *settings]) == 0
    assert (run / "mined.jsonl").read_text() == file_out.read_text()  # written inside the run

    # The sentence-transformers export's triplets: anchors embedded as written, "negative" folded into "negatives".
    triplets = [{"anchor": f"Instruct: Answer it\nQuery: {r['query']}", "positive": r["positive"],
                 "negative": "an existing negative"} for r in RECORDS[:8]]
    write_jsonl(tmp_path / "triplets.jsonl", triplets)
    model.encoded.clear()
    assert mine_cli.main(["--input", str(tmp_path / "triplets.jsonl"), *settings]) == 0
    assert model.encoded[0] == [t["anchor"] for t in triplets]
    mined = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    rows = load_training_rows(tmp_path / "mined.jsonl", max_negatives=3)
    for triplet, record, row in zip(triplets, mined, rows):
        assert "negative" not in record and record["negatives"][-1] == "an existing negative"
        assert len(record["mined_negative_scores"]) == 2 and row["negatives"] == record["negatives"]
        assert row["anchor"] == triplet["anchor"] and row["positive"] == triplet["positive"]


def test_mined_negatives_reach_training_with_default_settings(tmp_path, monkeypatch, embedder):
    """mine, then train, both with their defaults: the one negative a row trains with (--max-negatives 1)
    is its hardest mined negative, not the synthesized one mining kept."""
    from speedx.embed import trainer
    from speedx.train import main as train_main

    monkeypatch.setattr(mining, "load_embedder", lambda name, device=None: embedder)
    trained = []

    def fake_train(rows, cfg, out):  # what matters is what reaches the trainer
        trained.extend(rows)
        return None, {"examples": len(rows), "steps": 1, "train_loss": 0.0, "train_seconds": 0.0}

    monkeypatch.setattr(trainer, "train_embedder", fake_train)
    write_jsonl(tmp_path / "examples.jsonl", [dict(r, negatives=["a synthesized negative"]) for r in RECORDS])
    assert mine_cli.main(["--input", str(tmp_path / "examples.jsonl"), "--no-progress"]) == 0
    mined = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert train_main(["--data", str(tmp_path / "mined.jsonl"), "--out", str(tmp_path / "model")]) == 0
    assert len(trained) == len(mined) == len(RECORDS)
    for row, record in zip(trained, mined):
        assert record["mined_negative_scores"]  # every query got mined negatives
        assert row["negatives"] == [record["negatives"][0]] != ["a synthesized negative"]
        assert row["negatives"][0] in TOPIC_OF  # a corpus text: another query's positive
