"""Lenient parsing of LLM output that should be one JSON object (for engines that cannot constrain decoding)."""

from __future__ import annotations

import json
import re
from itertools import islice

_DECODER = json.JSONDecoder(strict=False)  # LLMs put raw newlines/tabs inside strings
_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_START = re.compile(r"\{|\[\s*\{")  # an object, or a list whose first item is one
_WORD = re.compile(r"[A-Za-z_]\w*")
_AFTER_STRING = re.compile(r"\s*(?:[,:}\]]|\Z)")  # a single quote ends a string only here, so "it's" stays inside
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_SMART = "\u201c\u201d"
_MAX_STARTS = 8  # candidate start positions per source; bounds the work on brace-heavy prose


class JSONRepairError(ValueError):
    """Nothing usable as a single JSON object was found."""


def _as_dict(value: object) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return value[0]
    if isinstance(value, list):
        raise JSONRepairError(f"top level is a list of {len(value)} items, expected one object")
    raise JSONRepairError(f"top level is {type(value).__name__}, expected an object")


def _read_string(s: str, i: int) -> tuple[str, int]:
    """Read the string opening at s[i] (", ', or smart quote) as a JSON string; returns (literal, next index)."""
    q = s[i]
    closers = '"' if q == '"' else "'" if q == "'" else _SMART
    buf, i, n = ['"'], i + 1, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 < n:  # a lone backslash at a truncated end is dropped
                buf.append("'" if s[i + 1] == "'" else s[i : i + 2])  # \' is not a JSON escape
            i += 2
            continue
        i += 1
        if c in closers and (q != "'" or _AFTER_STRING.match(s, i)):
            break
        buf.append('\\"' if c == '"' else c)
    buf.append('"')  # also closes a string cut off by truncation
    return "".join(buf), i


def _repair(s: str) -> str:
    """Rewrite the value starting at s[0] into JSON: quotes, Python literals, trailing commas, truncation."""
    out: list[str] = []
    stack: list[str] = []  # expected closers, innermost last
    cuts: list[int] = []  # per open level: where to cut `out` if its last item is truncated garbage
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == '"' or c == "'" or c in _SMART:
            lit, i = _read_string(s, i)
            out.append(lit)
            continue
        if word := _WORD.match(s, i):
            out.append(_PY_LITERALS.get(word.group(), word.group()))
            i = word.end()
            continue
        i += 1
        if c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
            cuts.append(len(out))
        elif c in "}]":
            if c not in stack:
                continue  # stray closer
            while out and (out[-1].isspace() or out[-1] == ","):  # trailing commas
                out.pop()
            while stack and stack[-1] != c:  # close what the model forgot, e.g. a "]" before "}"
                out.append(stack.pop())
                cuts.pop()
            out.append(stack.pop())
            cuts.pop()
            if not stack:
                return "".join(out)  # first complete top-level value; trailing text is ignored
        else:
            if c == "," and stack:
                cuts[-1] = len(out)
            out.append(c)
    # Truncated: close as-is if that parses, else drop the innermost unfinished item (e.g. a cut-off key) and close.
    closed = "".join(out).rstrip().rstrip(",") + "".join(reversed(stack))
    try:
        _DECODER.decode(closed)
        return closed
    except json.JSONDecodeError:
        del out[cuts[-1] :]
        return "".join(out).rstrip().rstrip(",") + "".join(reversed(stack))


def parse_json_object(text: str) -> dict:
    """Parse the first JSON object in `text`, repairing common LLM damage; raises JSONRepairError."""
    if not text or not text.strip():
        raise JSONRepairError("empty input")
    try:
        return _as_dict(_DECODER.decode(text))  # fast path: already valid
    except json.JSONDecodeError:
        pass
    fence = _FENCE.search(text)
    sources = [fence.group(1), text] if fence else [text]
    found = False
    for src in sources:
        for m in islice(_START.finditer(src), _MAX_STARTS):
            found = True
            try:  # a complete value followed by prose / a closing fence
                return _as_dict(_DECODER.raw_decode(src, m.start())[0])
            except json.JSONDecodeError:
                pass
            try:  # increasingly invasive: rewrite quotes/literals, drop trailing commas, close truncation
                if obj := _as_dict(_DECODER.decode(_repair(src[m.start() :]))):
                    return obj  # an object emptied by repair (e.g. "{broken") is not usable
            except json.JSONDecodeError:
                pass
    raise JSONRepairError("could not repair the JSON object" if found else "no JSON object in text")
