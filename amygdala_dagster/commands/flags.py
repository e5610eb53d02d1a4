"""argparse types shared by the command lines: each rejects bad input with a message naming the value."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _float_in(text: str, ok: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):  # nan fails every comparison
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def score(text: str) -> float:
    return _float_in(text, lambda v: 0 <= v <= 10, "a score from 0 to 10")


def fraction(text: str) -> float:
    return _float_in(text, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def open_fraction(text: str) -> float:
    return _float_in(text, lambda v: 0 < v < 1, "a fraction in (0, 1)")
