"""Lenient JSON-object parsing of LLM output (speedx.synth.json_repair)."""

from __future__ import annotations

import pytest

from speedx.synth.json_repair import JSONRepairError, parse_json_object

OBJ = {"query": "what is bm25", "positive": "A ranking function.", "n": 2}


def test_plain_json():
    assert parse_json_object('{"query": "what is bm25", "positive": "A ranking function.", "n": 2}') == OBJ


def test_surrounding_prose():
    text = 'Sure! Here is the example:\n{"query": "what is bm25", "positive": "A ranking function.", "n": 2}\nThanks.'
    assert parse_json_object(text) == OBJ


def test_code_fence_with_language():
    assert parse_json_object('```json\n{"a": 1, "b": [1, 2]}\n```') == {"a": 1, "b": [1, 2]}


def test_code_fence_without_language():
    assert parse_json_object('Output:\n```\n{"a": 1}\n```\nDone.') == {"a": 1}


def test_trailing_text_after_closing_brace():
    assert parse_json_object('{"a": 1}} and then {"b": 2}') == {"a": 1}  # first complete object wins


def test_missing_final_brace():
    assert parse_json_object('{"a": 1, "b": "two"') == {"a": 1, "b": "two"}


def test_truncated_nested_closes_in_order():
    assert parse_json_object('{"a": {"b": [1, {"c": "trunc') == {"a": {"b": [1, {"c": "trunc"}]}}


def test_truncated_inside_a_key_drops_it():
    assert parse_json_object('{"a": 1, "negat') == {"a": 1}
    assert parse_json_object('{"a": 1, "b":') == {"a": 1}


def test_truncated_code_fence():
    assert parse_json_object('```json\n{"a": [1, 2\n```') == {"a": [1, 2]}


def test_trailing_commas():
    assert parse_json_object('{"a": [1, 2,], "b": {"c": 3,},}') == {"a": [1, 2], "b": {"c": 3}}


def test_smart_quotes():
    text = "{\u201cquery\u201d: \u201cwhat is x\u201d, \u201cn\u201d: 2}"
    assert parse_json_object(text) == {"query": "what is x", "n": 2}


def test_smart_quotes_inside_a_normal_string_are_kept():
    assert parse_json_object('{"a": "he said \u201chi\u201d", "b": 1,}') == {"a": "he said \u201chi\u201d", "b": 1}


def test_python_literals():
    text = '{"a": True, "b": False, "c": None, "d": "True story",}'
    assert parse_json_object(text) == {"a": True, "b": False, "c": None, "d": "True story"}


def test_single_quotes():
    text = "{'a': 'it's fine', 'b': 'say \"hi\"', 'c': 'don\\'t'}"
    assert parse_json_object(text) == {"a": "it's fine", "b": 'say "hi"', "c": "don't"}


def test_braces_inside_strings():
    assert parse_json_object('{"a": "x } y"}') == {"a": "x } y"}
    assert parse_json_object('Here: {"a": "x } y", "b": "{"} trailing }') == {"a": "x } y", "b": "{"}


def test_list_with_one_dict():
    assert parse_json_object('[{"a": 1}]') == {"a": 1}
    assert parse_json_object('Result: [{"a": 1}] ok') == {"a": 1}


def test_raw_newline_in_string():
    assert parse_json_object('{"a": "line1\nline2"}') == {"a": "line1\nline2"}


def test_skips_non_json_braces_in_prose():
    assert parse_json_object('Use the format {query, positive}. Output: {"query": "q"}') == {"query": "q"}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("no braces at all", "no JSON object"),
        ('[{"a": 1}, {"b": 2}]', "list of 2"),
        ('Here: [{"a": 1}, {"b": 2}]', "list of 2"),
        ("42", "int"),
        ("{broken", "could not repair"),
    ],
)
def test_failures(text, reason):
    with pytest.raises(JSONRepairError, match=reason):
        parse_json_object(text)
