"""Separation metrics on plain numpy arrays of projections (no model, no files).

Conventions used throughout:
- ``pos`` / ``neg`` are 1-D arrays of scores (projections) of positives and negatives;
- a score ``>= threshold`` is classified positive;
- AUROC counts ties as half (scikit-learn's ROC curve and ``auc``; scipy's Mann-Whitney U /
  (n_pos * n_neg) in the vectorised bootstrap);
- standard deviations are sample standard deviations (ddof=1; 0.0 for a single value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu, norm
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    confusion_matrix_at_thresholds,
    f1_score,
)

THRESHOLD_METHODS = ("max_f1", "fixed_fpr")


def _as_1d(x: np.ndarray | list[float], what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: scores must be finite")
    return arr


def _labelled(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, y_score)`` for scikit-learn: positives labelled 1, negatives 0."""
    return np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]


def auroc(pos: np.ndarray | list[float], neg: np.ndarray | list[float]) -> float:
    """Area under the ROC curve of ``pos`` vs ``neg``: P(pos > neg) + 0.5 P(pos == neg).

    scikit-learn's ROC points (confusion counts at every distinct score) and
    trapezoidal ``auc``: the same number as ``roc_auc_score``, without its
    per-call input checks (a few ms, which add up over 200 emotions). NaN when
    either side is empty.
    """
    pos = _as_1d(pos, "auroc pos")
    neg = _as_1d(neg, "auroc neg")
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    return _area(_counts_at_thresholds(pos, neg), len(pos), len(neg))


def _area(c: Mapping[str, np.ndarray], n_pos: int, n_neg: int) -> float:
    return float(auc(np.r_[0.0, c["fp"] / n_neg], np.r_[0.0, c["tp"] / n_pos]))


def _auroc_statistic(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC as the Mann-Whitney U of ``pos`` over ``neg`` / (n_pos n_neg), vectorised along ``axis``."""
    u = mannwhitneyu(pos, neg, axis=axis, method="asymptotic", use_continuity=False).statistic
    return cast(np.ndarray, u / (pos.shape[axis] * neg.shape[axis]))


def bootstrap_auroc_ci(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | np.ndarray | None:
    """Percentile bootstrap confidence interval for :func:`auroc` (``scipy.stats.bootstrap``).

    Positives and negatives are resampled separately (stratified), ``n_boot``
    times, with a fixed ``seed`` so the interval is reproducible. ``None`` when
    ``n_boot`` is 0 or a side has fewer than two scores. ``pos`` and ``neg`` may also be
    ``[K, n]`` arrays (K score sets sharing one resampling, e.g. the layers of
    one emotion): the result is then a ``[K, 2]`` array of intervals.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("bootstrap: scores must be finite")
    n_p, n_n = pos.shape[-1], neg.shape[-1]
    if n_boot <= 0 or n_p < 2 or n_n < 2:
        return None  # a side of one example has no spread to resample
    if np.ptp(pos) == 0 and np.ptp(neg) == 0 and pos.ndim == 1:
        # Every resample equals the sample; scipy would warn about a degenerate distribution.
        a = auroc(pos, neg)
        return a, a
    res = bootstrap(
        (pos, neg), _auroc_statistic, n_resamples=n_boot, confidence_level=level, method="percentile",
        vectorized=True, paired=False, axis=-1, rng=np.random.default_rng(seed),
    )
    lo, hi = res.confidence_interval
    if pos.ndim == 1:
        return float(lo), float(hi)
    return np.stack([np.asarray(lo, np.float64), np.asarray(hi, np.float64)], axis=-1)


def sample_std(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1)) if len(x) >= 2 else 0.0


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """(mean(pos) - mean(neg)) / pooled sample standard deviation.

    ``inf``/``-inf`` when the pooled SD is zero but the means differ, 0.0 when
    both are equal, NaN when a side is empty.
    """
    pos = _as_1d(pos, "cohens_d pos")
    neg = _as_1d(neg, "cohens_d neg")
    n_p, n_n = len(pos), len(neg)
    if n_p == 0 or n_n == 0:
        return math.nan
    diff = float(pos.mean() - neg.mean())
    dof = n_p + n_n - 2
    if dof <= 0:
        pooled = 0.0
    else:
        ss = ((pos - pos.mean()) ** 2).sum() + ((neg - neg.mean()) ** 2).sum()
        pooled = math.sqrt(ss / dof)
    if pooled == 0.0:
        if diff == 0.0:
            return 0.0
        return math.copysign(math.inf, diff)
    return diff / pooled


def _midpoint_below(candidate: float, scores_sorted_desc: np.ndarray) -> float:
    """Halfway between ``candidate`` and the next lower distinct score (or ``candidate``).

    Gives the same classification of every given score as ``candidate`` itself,
    but leaves a margin on both sides for unseen scores.
    """
    lower = scores_sorted_desc[scores_sorted_desc < candidate]
    if len(lower) == 0:
        return float(candidate)
    return float((candidate + lower[0]) / 2.0)


def _counts_at_thresholds(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """scikit-learn's confusion counts of ``score >= t`` at every distinct score ``t`` (descending)."""
    tns, fps, fns, tps, thresholds = confusion_matrix_at_thresholds(*_labelled(pos, neg))
    return {"tn": tns, "fp": fps, "fn": fns, "tp": tps, "threshold": thresholds}


def _f1(c: Mapping[str, np.ndarray]) -> np.ndarray:
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return cast(np.ndarray, np.divide(2 * c["tp"], denom, out=np.zeros(len(denom)), where=denom > 0))


def _pick(c: Mapping[str, np.ndarray], n_neg: int, method: str, target_fpr: float) -> int | None:
    """Index (into the descending thresholds) of the rule's threshold; None: nothing may fire."""
    if method == "max_f1":
        return int(np.argmax(_f1(c)))  # first maximum in descending order = highest threshold
    # fpr grows as the threshold falls, so the qualifying thresholds are a prefix; the last is the lowest.
    ok = np.flatnonzero(c["fp"] / n_neg <= target_fpr + 1e-12)
    return int(ok[-1]) if len(ok) else None


def _threshold_and_counts(pos: np.ndarray, neg: np.ndarray, method: str, target_fpr: float,
                          c: Mapping[str, np.ndarray] | None = None) -> tuple[float, dict[str, int]]:
    """The rule's threshold (midpoint rule) and the confusion counts there, from ``c`` when given."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}")
    if method == "fixed_fpr" and not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be within [0, 1], got {target_fpr}")
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"threshold_{method} needs at least one positive and one negative")
    c = _counts_at_thresholds(pos, neg) if c is None else c
    i = _pick(c, len(neg), method, target_fpr)
    if i is None:
        top = float(c["threshold"][0])
        return top + max(abs(top), 1.0) * 1e-6, {"tp": 0, "fn": len(pos), "fp": 0, "tn": len(neg)}
    counts = {k: int(c[k][i]) for k in ("tp", "fn", "fp", "tn")}
    return _midpoint_below(float(c["threshold"][i]), c["threshold"]), counts


def confusion_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> dict[str, int]:
    """``{tp, fn, fp, tn}`` of ``score >= threshold`` (scikit-learn's confusion matrix)."""
    y, s = _labelled(np.asarray(pos, np.float64).reshape(-1), np.asarray(neg, np.float64).reshape(-1))
    tn, fp, fn, tp = confusion_matrix(y, s >= threshold, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fn": int(fn), "fp": int(fp), "tn": int(tn)}


def f1_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    y, s = _labelled(np.asarray(pos, np.float64).reshape(-1), np.asarray(neg, np.float64).reshape(-1))
    return float(f1_score(y, s >= threshold, labels=[0, 1], zero_division=0.0))


def accuracy_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    y, s = _labelled(np.asarray(pos, np.float64).reshape(-1), np.asarray(neg, np.float64).reshape(-1))
    return float(accuracy_score(y, s >= threshold)) if len(y) else math.nan


def threshold_max_f1(pos: np.ndarray, neg: np.ndarray) -> float:
    """Decision threshold maximising F1 of ``score >= t`` on the given scores.

    Candidates are the distinct scores (scikit-learn's confusion counts at every
    threshold); among equally good candidates the highest wins (fewest false
    positives). The returned value is the midpoint between the winner and the
    next lower distinct score, which classifies every given score exactly as the
    winner does, with a margin on both sides for unseen scores.
    """
    return _threshold_and_counts(_as_1d(pos, "threshold pos"), _as_1d(neg, "threshold neg"), "max_f1", 0.0)[0]


def threshold_fixed_fpr(pos: np.ndarray, neg: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold whose false-positive rate on ``neg`` is at most ``target_fpr``.

    The lowest such threshold maximises the true-positive rate under the FPR
    constraint. If no score qualifies, the threshold lies just above the
    highest score (nothing is classified positive). Midpoint rule as in
    :func:`threshold_max_f1`.
    """
    return _threshold_and_counts(_as_1d(pos, "threshold pos"), _as_1d(neg, "threshold neg"), "fixed_fpr",
                                 target_fpr)[0]


def calibration(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
) -> dict[str, Any]:
    """Runtime calibration of one emotion at one layer from held-out projections.

    ``{pos_mean, pos_std, neg_mean, neg_std, n_pos, n_neg, threshold,
    threshold_method}`` (+ ``target_fpr`` for ``fixed_fpr``). See
    :func:`z_score` and :func:`probability` for how a runtime uses it.
    """
    return _calibration(_as_1d(pos, "calibration pos"), _as_1d(neg, "calibration neg"),
                        threshold_method, target_fpr)[0]


def _calibration(pos: np.ndarray, neg: np.ndarray, threshold_method: str, target_fpr: float,
                 c: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    threshold, counts = _threshold_and_counts(pos, neg, threshold_method, target_fpr, c)
    out = {
        "pos_mean": float(pos.mean()),
        "pos_std": sample_std(pos),
        "neg_mean": float(neg.mean()),
        "neg_std": sample_std(neg),
        "n_pos": int(len(pos)),
        "n_neg": int(len(neg)),
        "threshold": float(threshold),
        "threshold_method": threshold_method,
    }
    if threshold_method == "fixed_fpr":
        out["target_fpr"] = float(target_fpr)
    return out, counts


def separation(pos: np.ndarray, neg: np.ndarray, *, threshold_method: str = "max_f1",
               target_fpr: float = 0.05) -> dict[str, Any]:
    """Every held-out number of one vector's projections from one pass over the thresholds:
    ``{n_pos, n_neg, auroc, cohens_d, calibration, confusion, accuracy, f1}`` (the last four None
    when a side is empty). AUROC is the area under the ROC curve of the same counts (scikit-learn's
    ``auc``), accuracy and F1 those of the calibration's threshold."""
    pos = _as_1d(pos, "separation pos")
    neg = _as_1d(neg, "separation neg")
    out: dict[str, Any] = {"n_pos": len(pos), "n_neg": len(neg), "auroc": math.nan, "cohens_d": cohens_d(pos, neg),
                 "accuracy": None, "f1": None, "calibration": None, "confusion": None}
    if len(pos) and len(neg):
        c = _counts_at_thresholds(pos, neg)
        out["auroc"] = _area(c, len(pos), len(neg))
        cal, counts = _calibration(pos, neg, threshold_method, target_fpr, c)
        out["calibration"] = cal
        out["confusion"] = counts
        out["accuracy"] = (counts["tp"] + counts["tn"]) / (len(pos) + len(neg))
        out["f1"] = float(_f1({k: np.array([v]) for k, v in counts.items()})[0])
    return out


def z_score(raw: np.ndarray | float, neg_mean: np.ndarray | float, neg_std: np.ndarray | float) -> np.ndarray:
    """How many negative-class SDs a raw projection lies above the negatives' mean.

    The one definition of the calibrated score, for the report and the runtime
    reference alike. Broadcasts: ``raw [..., C]`` with per-concept ``neg_mean``
    and ``neg_std`` of shape ``[C]``. Where ``neg_std`` is 0, NaN or missing
    (a calibration from a single negative, or none), the score is NaN: there is
    no spread to scale by, and any stand-in (1.0, 1e-6) would invent a scale.
    """
    sd = np.asarray(neg_std, dtype=np.float64)
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, np.nan)
    return (np.asarray(raw, dtype=np.float64) - np.asarray(neg_mean, dtype=np.float64)) / sd


def probability(raw: np.ndarray | float, calib: Mapping[str, Any]) -> np.ndarray:
    """P(positive | raw) under two equal-prior Gaussians with the pooled SD (monotone in raw)."""
    n_p, n_n = calib["n_pos"], calib["n_neg"]
    dof = max(n_p + n_n - 2, 1)
    var = ((n_p - 1) * calib["pos_std"] ** 2 + (n_n - 1) * calib["neg_std"] ** 2) / dof
    var = var if var > 0 else 1.0
    mid = (calib["pos_mean"] + calib["neg_mean"]) / 2.0
    logit = (calib["pos_mean"] - calib["neg_mean"]) / var * (np.asarray(raw, dtype=np.float64) - mid)
    return cast(np.ndarray, 1.0 / (1.0 + np.exp(-np.clip(logit, -500, 500))))


def summarise_lengths(lengths: np.ndarray | list[int]) -> dict[str, Any]:
    """Count, mean and quartiles of text lengths (characters)."""
    x = np.asarray(lengths, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": None, "min": None, "p25": None, "median": None, "p75": None, "max": None}
    q = np.quantile(x, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {
        "n": int(len(x)),
        "mean": float(x.mean()),
        "min": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "max": float(q[4]),
    }


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a rate ``k / n`` (None for ``n == 0``).

    Used for the conversation-level firing rates rather than a bootstrap: a
    percentile bootstrap of 0 fires in 50 conversations is [0, 0], a certainty
    that 50 conversations do not give.
    """
    if n <= 0:
        return None
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
