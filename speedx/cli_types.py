"""argparse value types that refuse a bad value where it enters, naming the value and what is allowed
(argparse adds the flag and exits with code 2)."""

from __future__ import annotations

import argparse
import math


def number(kind: type = float, *, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None):
    """An int or a finite float within the given bounds."""
    bounds = [f">= {at_least}" if at_least is not None else None, f"> {above}" if above is not None else None,
              f"<= {at_most}" if at_most is not None else None]
    allowed = " ".join(["an integer" if kind is int else "a finite number", " and ".join(b for b in bounds if b)])

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or \
                (at_least is not None and value < at_least) or (above is not None and value <= above) or \
                (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"got {text!r}; give {allowed.strip()}")
        return value

    return parse


def non_empty(what: str):
    """A string that is not empty or blank, e.g. a path or a name."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"got {text!r}; give {what}")
        return text

    return parse
