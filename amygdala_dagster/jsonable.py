"""Numpy-bearing values as plain JSON types: the one converter the manifest and the evaluation use."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
