"""argparse types shared by the command lines: each rejects bad input with a message naming the value."""

from __future__ import annotations

import argparse
import re
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


def unit_fraction(text: str) -> float:
    return _float_in(text, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")


def open_fraction(text: str) -> float:
    return _float_in(text, lambda v: 0 < v < 1, "a fraction in (0, 1)")


_SIZE = re.compile(r"^\s*([0-9]+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def byte_size(text: str) -> int:
    """A number of bytes >= 1: ``1048576``, ``512KiB``, ``4MiB``, ``1GiB`` (K, M, G are powers of 1024)."""
    m = _SIZE.match(text)
    value = int(m.group(1)) * _UNITS[m.group(2)[:1].lower()] if m else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a size in bytes >= 1 such as 1048576 or 4MiB, got {text!r}")
    return value
