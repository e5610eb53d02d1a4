"""JSON helpers used everywhere: numpy values as plain JSON types, and the one JSONL line reader."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any, *, nonfinite_as_null: bool = False) -> Any:
    """``value`` with numpy scalars/arrays made plain and mapping keys made strings.

    ``nonfinite_as_null`` maps NaN/Inf to None (strict JSON for reports). Left
    off, they are kept so that a writer with ``allow_nan=False`` (the manifest)
    refuses them instead of writing ``null``.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, nonfinite_as_null=nonfinite_as_null) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite_as_null=nonfinite_as_null) for v in value]
    if isinstance(value, np.ndarray):
        plain = value.tolist()
        return jsonable(plain, nonfinite_as_null=True) if nonfinite_as_null else plain
    if isinstance(value, np.generic):
        value = value.item()
    if nonfinite_as_null and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def jsonl_values(path: str | os.PathLike[str], error: type[Exception] = ValueError,
                 data: bytes | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of a JSONL file (``where`` is ``path:line``).

    ``data`` is the file's bytes when the caller has read them. A line that is
    not UTF-8 or not JSON (nesting too deep included) raises ``error`` naming
    the file and line.
    """
    if data is None:
        data = Path(path).read_bytes()
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise error(f"{where}: not valid JSON (nested too deeply)") from None
        yield where, value


def jsonl_objects(path: str | os.PathLike[str], error: type[Exception] = ValueError
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """:func:`jsonl_values` of a file whose every line must be a JSON object."""
    for where, value in jsonl_values(path, error):
        if not isinstance(value, dict):
            raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, value
