"""Direction estimators: (positive activations, negative activations) -> direction.

An estimator takes ``pos`` of shape ``[N, H]`` and ``neg`` of shape ``[M, H]``
(float32 or float64 numpy arrays, one hooked layer) and returns an
unnormalised direction of shape ``[H]`` (float64) that points from the
negatives towards the positives. Normalisation, and the refusal of a
(near-)zero direction, happen in one place: :func:`unit_direction`.
Mean-difference (CAA) is the default and what is shipped unless configured;
``lda`` (shrinkage LDA) and ``logistic`` (a logistic-regression probe) are the
alternatives the evaluation report compares it with. Every estimator's output
goes through :func:`unit_direction`, so the shipped file format does not
depend on the estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

Estimator = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Below this L2 norm a difference of means is treated as "no direction".
MIN_DIRECTION_NORM = 1e-8


class DegenerateDirectionError(ValueError):
    """An estimator produced no usable direction (empty class or ~zero norm)."""


def mean_difference(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``mean(pos) - mean(neg)``, accumulated in float64."""
    return cast(np.ndarray, pos.astype(np.float64).mean(axis=0) - neg.astype(np.float64).mean(axis=0))


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


def _check_classes(pos: np.ndarray, neg: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise ValueError(f"{name}: expected pos [N, H] and neg [M, H], got {pos.shape} and {neg.shape}")
    if len(pos) == 0 or len(neg) == 0:
        raise DegenerateDirectionError(f"{name}: needs at least one positive and one negative")
    return pos, neg


def shrinkage_lda(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Whitened direction ``Sigma^-1 (mean(pos) - mean(neg))`` (shrinkage LDA).

    ``Sigma = (1 - a) S + a m I`` is the pooled within-class covariance ``S``
    shrunk towards a scaled identity (``m`` = mean variance) with the
    Ledoit-Wolf coefficient ``a``, so it stays invertible when there are fewer
    examples than hidden dimensions. With fewer examples than dimensions the
    solve goes through the Woodbury identity (an ``N x N`` system), so a large
    hidden size costs ``O(N^2 H)`` rather than ``O(H^3)``.
    """
    # Lazy: +0.19 s on every start (after sklearn.metrics), and only the LDA comparison needs it.
    from sklearn.covariance import ledoit_wolf_shrinkage

    pos, neg = _check_classes(pos, neg, "lda")
    diff = pos.mean(axis=0) - neg.mean(axis=0)
    x = np.concatenate([pos - pos.mean(axis=0), neg - neg.mean(axis=0)])
    n, h = x.shape
    mu = float((x**2).sum()) / (n * h)
    if n < 2 or mu <= 0.0:
        return cast(np.ndarray, diff)  # no within-class spread to whiten by
    alpha = float(ledoit_wolf_shrinkage(x, assume_centered=True))
    b = max(alpha * mu, 1e-12 * mu)  # the identity part; kept > 0 so the system is definite
    c = (1.0 - alpha) / n  # Sigma = c X^T X + b I
    if n < h:
        # (b I + c X^T X)^-1 d = d / b - (c / b^2) X^T (I + (c / b) X X^T)^-1 X d
        small = np.eye(n) + (c / b) * (x @ x.T)
        return cast(np.ndarray, diff / b - (c / b**2) * (x.T @ np.linalg.solve(small, x @ diff)))
    return np.linalg.solve(c * (x.T @ x) + b * np.eye(h), diff)


def make_logistic(C: float = 1.0, max_iter: int = 2000) -> Estimator:
    """A logistic-regression probe estimator with inverse regularisation strength ``C``.

    Features are standardised before the fit; the coefficients are mapped back
    to activation space (divided by the feature scales), so the direction
    applies to raw activations like the other estimators'.
    """

    def logistic(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        # Lazy: +0.08 s on every start, and only the logistic comparison needs it.
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        pos, neg = _check_classes(pos, neg, "logistic")
        x = np.concatenate([pos, neg])
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(x), y)
        return cast(np.ndarray, model.coef_[0].astype(np.float64) / scaler.scale_)

    logistic.__name__ = "logistic"
    return logistic


logistic = make_logistic()


ESTIMATORS: dict[str, Estimator] = {
    "mean_difference": mean_difference,
    "lda": shrinkage_lda,
    "logistic": logistic,
}
DEFAULT_ESTIMATOR = "mean_difference"


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}"
        ) from None


def make_estimator(name: str, **options: Any) -> Estimator:
    """Like :func:`get_estimator`, with options (``logistic``: ``C``, ``max_iter``)."""
    if name == "logistic" and options:
        return make_logistic(**options)
    if options:
        raise ValueError(f"estimator {name!r} takes no options (got {', '.join(sorted(options))})")
    return get_estimator(name)
