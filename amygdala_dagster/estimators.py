"""Direction estimators: (positive activations, negative activations) -> direction.

An estimator takes ``pos`` of shape ``[N, H]`` and ``neg`` of shape ``[M, H]``
(float32 or float64 numpy arrays, one hooked layer) and returns an
unnormalised direction of shape ``[H]`` (float64) that points from the
negatives towards the positives. Normalisation, and the refusal of a
(near-)zero direction, happen in one place: :func:`unit_direction`.
Mean-difference (CAA) is the default and what is shipped unless configured.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Below this L2 norm a difference of means is treated as "no direction".
MIN_DIRECTION_NORM = 1e-8


class DegenerateDirectionError(ValueError):
    """An estimator produced no usable direction (empty class or ~zero norm)."""


def mean_difference(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``mean(pos) - mean(neg)``, accumulated in float64."""
    return pos.astype(np.float64).mean(axis=0) - neg.astype(np.float64).mean(axis=0)


def unit_direction(direction: np.ndarray, what: str) -> tuple[np.ndarray, float]:
    """``direction`` scaled to unit L2 norm, and its raw norm.

    Raises :class:`DegenerateDirectionError` naming ``what`` (e.g. the emotion
    and layer) when the norm is (near-)zero or the vector is not finite, so no
    NaN or Inf can reach a vectors file.
    """
    direction = np.asarray(direction, dtype=np.float64)
    norm = float(np.linalg.norm(direction))
    if not np.isfinite(norm) or not np.all(np.isfinite(direction)):
        raise DegenerateDirectionError(f"{what}: direction is not finite")
    if norm < MIN_DIRECTION_NORM:
        raise DegenerateDirectionError(
            f"{what}: positives and negatives give a (near-)zero direction "
            f"(norm {norm:.3g}); the examples do not separate"
        )
    return direction / norm, norm


ESTIMATORS: dict[str, Estimator] = {
    "mean_difference": mean_difference,
}
DEFAULT_ESTIMATOR = "mean_difference"


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
        ) from None
