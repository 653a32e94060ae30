"""Per-family checks of a generated example; each rejection names its reason."""

from __future__ import annotations

import re

from speedx.synth.dedup import normalize_text
from speedx.synth.families import Family

# How far a length may stray from what the knobs asked before we call it wrong: small models
# miss word counts, and a loose bound still catches the truncated and the runaway.
SHORTER_FACTOR = 4.0
LONGER_FACTOR = 3.0
SENTENCE_MAX_WORDS = 80
# A text asked to be long must be a passage, not as long as asked: the embedded 135M model writes
# 20-60 word "300-word" documents, useful data that a quarter of the asked length rejected.
PASSAGE_MIN_WORDS = 20
# A text asked to be short may run to a sentence: queries of 11-15 words asked as "fewer than 5"
# are still queries (the small model's most common too_long), and a runaway is far longer.
SHORT_TEXT_MAX_WORDS = 20


def _words(text: str) -> int:
    return len(text.split())


def _word_range(spec: str) -> tuple[float, float]:
    """'fewer than 5 words' / '5 to 15 words' / 'at least 10' / '300' -> (min, max) words allowed."""
    numbers = [int(n) for n in re.findall(r"\d+", spec)]
    if spec.startswith("fewer than"):
        return 1, max(numbers[0] * 2, SHORT_TEXT_MAX_WORDS)
    if spec.startswith("at least"):
        return min(numbers[0] / SHORTER_FACTOR, PASSAGE_MIN_WORDS), float("inf")
    if len(numbers) == 2:
        return max(1, numbers[0] / 2), numbers[1] * 2
    return min(numbers[0] / SHORTER_FACTOR, PASSAGE_MIN_WORDS), numbers[0] * LONGER_FACTOR


def validate_example(family: Family, data: object, knobs: dict[str, str]) -> str | None:
    """None when the example is usable, else the rejection reason."""
    if not isinstance(data, dict) or sorted(data) != sorted(family.keys):
        return "wrong_keys"
    if any(not isinstance(v, str) for v in data.values()):
        return "non_string_field"
    if any(not v.strip() for v in data.values()):
        return "empty_field"
    norm = {key: normalize_text(value) for key, value in data.items()}
    query = norm[family.query_key]
    docs = [family.positive_key, *family.negative_keys]
    if family.name == "classification" and norm["label"] == norm["misleading_label"]:
        return "label_equals_misleading_label"
    if family.name in ("sts", "bitext") and len(set(norm.values())) < len(norm):
        return "fields_not_distinct"
    if any(norm[d] == query or (_words(query) >= 3 and query in norm[d]) for d in docs):
        return "document_copies_query"
    if len(set(norm.values())) < len(norm):
        return "fields_not_distinct"
    return _length_problem(family, data, knobs)


def _length_problem(family: Family, data: dict, knobs: dict[str, str]) -> str | None:
    limits: dict[str, tuple[float, float]] = {}
    if family.name == "retrieval":
        limits[family.query_key] = _word_range(knobs["query_length"]) if "query_length" in knobs else (1, 60)
        for key in (family.positive_key, *family.negative_keys):
            limits[key] = _word_range(knobs["num_words"])
    elif family.name == "classification":
        limits["input_text"] = _word_range(knobs["num_words"])
        limits["label"] = limits["misleading_label"] = (1, 12)
    elif family.name == "long_long":
        limits["input"] = limits["positive_document"] = (int(knobs["num_words"]) / SHORTER_FACTOR, float("inf"))
    elif family.name == "short_short":
        limits["input"] = limits["positive_document"] = (1, 60)
    elif knobs.get("unit") in ("sentence", "phrase"):  # sts, bitext
        limits = {key: (1, SENTENCE_MAX_WORDS) for key in family.keys}
    for key, (low, high) in limits.items():
        words = _words(data[key])
        if words < low:
            return f"too_short:{key}"
        if words > high:
            return f"too_long:{key}"
    return None
