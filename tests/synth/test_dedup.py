"""Exact and near-duplicate detection (speedx.synth.dedup)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from speedx.synth.dedup import Deduplicator, normalize_text

WORDS = (
    "retrieval models map queries and passages into a shared vector space so that relevant pairs land close "
    "together while unrelated text drifts apart training them needs many diverse examples with hard negatives "
    "that look similar on the surface but fail to answer the question asked by the user"
).split()


def text60(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(60)]


def test_normalize_text():
    assert normalize_text("Hello, World!") == normalize_text("  hello   world ") == "hello world"
    assert normalize_text("“Quoted” ﬁne C++ (x) wor-ld…") == "quoted fine c++ x wor-ld"  # NFKC, symbols kept


def test_exact_duplicates_after_normalization():
    d = Deduplicator()
    assert d.check_and_add("a", "What is the capital of France? Paris.") is None
    for i, variant in enumerate(["what is the CAPITAL of france paris", "  What   is the capital, of France!? Paris "]):
        assert d.check_and_add(f"dup{i}", variant) == "exact"
    assert len(d) == 1


def test_one_word_changed_is_near():
    for seed in range(5):
        d = Deduplicator()
        words = text60(seed)
        d.add("orig", " ".join(words))
        words[30] = "zebra"  # 3 of 58 shingles change: Jaccard 55/61 ~ 0.90 >= 0.85
        assert d.check("edited", " ".join(words)) == "near"


def test_two_words_changed_is_near_at_lower_threshold():
    # Two separate edits replace 6 of 58 3-word shingles: Jaccard 52/64 ~ 0.81, below the 0.85 default,
    # so this level of editing needs a lower threshold (or shorter shingles) to be called a duplicate.
    for seed in range(5):
        d = Deduplicator(threshold=0.7)
        words = text60(seed)
        d.add("orig", " ".join(words))
        words[15], words[45] = "zebra", "quokka"
        assert d.check("edited", " ".join(words)) == "near"


def test_distinct_texts_on_one_topic_are_kept():
    rng = random.Random(0)
    verbs = ["train", "evaluate", "fine-tune", "deploy", "compress", "benchmark", "debug"]
    things = ["an embedding model", "a reranker", "a dense retriever", "a sparse index", "a bi-encoder"]
    langs = ["for legal contracts", "on medical notes", "in Python code search", "for Swahili news", "on recipes"]
    goals = ["with little labeled data", "under a tight latency budget", "without a GPU", "across languages"]
    combos = sorted({(v, t, l, g) for v in verbs for t in things for l in langs for g in goals})
    d = Deduplicator()
    for i, (v, t, l, g) in enumerate(rng.sample(combos, 50)):
        assert d.check_and_add(str(i), f"How should I {v} {t} {l} {g}?") is None
    assert len(d) == 50


def test_deterministic_across_instances_and_processes():
    texts = [" ".join(text60(s)) for s in range(3)]
    a, b = Deduplicator(), Deduplicator()
    assert [a.check_and_add(str(i), t) for i, t in enumerate(texts * 2)] == [
        b.check_and_add(str(i), t) for i, t in enumerate(texts * 2)
    ]
    sig = a._prepare(texts[0])[1].hashvalues.tolist()
    # A different hash seed in a fresh interpreter must not change the MinHash (no salted hash()).
    code = (
        "from speedx.synth.dedup import Deduplicator\n"
        f"print(Deduplicator()._prepare({texts[0]!r})[1].hashvalues.tolist())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sig)


def test_readding_a_key_is_a_noop():
    d = Deduplicator()
    d.add("k", "first text about retrieval")
    d.add("k", "a completely different second text")
    assert len(d) == 1
    assert d.check("other", "a completely different second text") is None


def test_short_texts():
    d = Deduplicator(shingle_size=3)
    assert d.check_and_add("a", "hi there") is None  # 2 words < shingle size: one shingle of both
    assert d.check_and_add("b", "Hi, there!") == "exact"
    assert d.check_and_add("c", "hi") is None
    assert d.check_and_add("d", "there hi") is None
    assert d.check_and_add("e", "") is None  # empty is new once, then an exact duplicate of itself
    assert d.check_and_add("f", " ... ") == "exact"
    assert len(d) == 4


def test_check_does_not_add():
    d = Deduplicator()
    assert d.check("a", "some text to look at") is None
    assert d.check("a", "some text to look at") is None
    assert len(d) == 0
    d.add("a", "some text to look at")
    assert d.check("b", "some text to look at") == "exact"
