"""Format checks for the built-in topic taxonomy (speedx/synth/data/topics.txt)."""

from collections import Counter
from importlib import resources

import pytest

SEP = " > "


@pytest.fixture(scope="module")
def raw() -> str:
    res = resources.files("speedx.synth") / "data" / "topics.txt"
    assert res.is_file(), "topics.txt is missing from the speedx.synth package data"
    return res.read_bytes().decode("utf-8")  # must be valid UTF-8


@pytest.fixture(scope="module")
def lines(raw: str) -> list[str]:
    assert raw.endswith("\n") or "\n" not in raw
    return raw.splitlines()


def test_count(lines):
    assert len(lines) >= 2500


def test_no_blank_or_padded_lines(lines):
    for ln in lines:
        assert ln.strip(), "blank line"
        assert ln == ln.strip(), f"leading/trailing whitespace: {ln!r}"
        assert "\r" not in ln and "\t" not in ln, f"stray control character: {ln!r}"


def test_levels_well_formed(lines):
    for ln in lines:
        parts = ln.split(SEP)
        assert 2 <= len(parts) <= 4, f"depth {len(parts)}: {ln!r}"
        for p in parts:
            assert p and p == p.strip(), f"empty or padded level in {ln!r}"
            assert ">" not in p, f"malformed separator in {ln!r}"
            assert "  " not in p, f"double space in {ln!r}"


def test_no_duplicates(lines):
    dups = [ln for ln, c in Counter(lines).items() if c > 1]
    assert not dups, dups[:10]


def test_sorted(lines):
    assert lines == sorted(lines)


def test_parents_present(lines):
    present = set(lines)
    missing = set()
    for ln in lines:
        parts = ln.split(SEP)
        for k in range(2, len(parts)):
            parent = SEP.join(parts[:k])
            if parent not in present:
                missing.add(parent)
    assert not missing, sorted(missing)[:10]


def test_domain_balance(lines):
    domains = Counter(ln.split(SEP, 1)[0] for ln in lines)
    assert len(domains) >= 15, sorted(domains)
    total = len(lines)
    too_big = {d: c for d, c in domains.items() if c > 0.15 * total}
    assert not too_big, too_big
