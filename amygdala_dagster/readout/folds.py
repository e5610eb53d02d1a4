"""Folds by text for cross-fitting: the token calibration and the episode rule are each checked on texts not
used to set them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def text_folds(keys: Sequence[str], n_folds: int = 5) -> np.ndarray:
    """A fold number per text (by content key), for cross-fitting the token calibration and the episode
    rule: stable (independent of order and of the other texts' presence only through the ranking), as
    equal in size as possible; fewer folds than texts never."""
    n = len(keys)
    order = np.argsort([hashlib.sha256(f"token-calibration\0{k}".encode()).hexdigest() for k in keys],
                       kind="stable")
    folds = np.zeros(n, dtype=int)
    folds[order] = np.arange(n) % max(min(int(n_folds), n), 1)
    return folds
