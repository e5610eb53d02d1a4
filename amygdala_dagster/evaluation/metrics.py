"""Separation metrics on plain numpy arrays of projections (no model, no files).

Conventions used throughout:
- ``pos`` / ``neg`` are 1-D arrays of scores (projections) of positives and negatives;
- a score ``>= threshold`` is classified positive;
- AUROC counts ties as half (Mann-Whitney U / (n_pos * n_neg));
- standard deviations are sample standard deviations (ddof=1; 0.0 for a single value).
"""

from __future__ import annotations

import math

import numpy as np

THRESHOLD_METHODS = ("max_f1", "fixed_fpr")


def _as_1d(x: np.ndarray | list[float], what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: scores must be finite")
    return arr


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of ``pos`` vs ``neg``: P(pos > neg) + 0.5 P(pos == neg).

    NaN when either side is empty.
    """
    pos = _as_1d(pos, "auroc pos")
    neg = _as_1d(neg, "auroc neg")
    n_p, n_n = len(pos), len(neg)
    if n_p == 0 or n_n == 0:
        return math.nan
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[:n_p].sum() - n_p * (n_p + 1) / 2.0
    return float(u / (n_p * n_n))


def bootstrap_auroc_ci(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval for :func:`auroc`.

    Positives and negatives are resampled separately (stratified), ``n_boot``
    times, with a fixed ``seed`` so the interval is reproducible. ``None`` when
    ``n_boot`` is 0 or a side is empty.
    """
    pos = _as_1d(pos, "bootstrap pos")
    neg = _as_1d(neg, "bootstrap neg")
    n_p, n_n = len(pos), len(neg)
    if n_boot <= 0 or n_p == 0 or n_n == 0:
        return None
    # Pairwise win matrix; a resample's AUROC is a weighted mean of it, weights
    # being the multinomial resampling counts, so all resamples go in one einsum.
    wins = (pos[:, None] > neg[None, :]).astype(np.float64)
    wins += 0.5 * (pos[:, None] == neg[None, :])
    rng = np.random.default_rng(seed)
    cp = rng.multinomial(n_p, np.full(n_p, 1.0 / n_p), size=n_boot).astype(np.float64)
    cn = rng.multinomial(n_n, np.full(n_n, 1.0 / n_n), size=n_boot).astype(np.float64)
    values = np.einsum("bi,ij,bj->b", cp, wins, cn) / (n_p * n_n)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


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


def confusion_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> dict[str, int]:
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    tp = int((pos >= threshold).sum())
    fp = int((neg >= threshold).sum())
    return {"tp": tp, "fn": len(pos) - tp, "fp": fp, "tn": len(neg) - fp}


def f1_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    c = confusion_at(pos, neg, threshold)
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / denom if denom else 0.0


def accuracy_at(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    c = confusion_at(pos, neg, threshold)
    n = c["tp"] + c["tn"] + c["fp"] + c["fn"]
    return (c["tp"] + c["tn"]) / n if n else math.nan


def threshold_max_f1(pos: np.ndarray, neg: np.ndarray) -> float:
    """Decision threshold maximising F1 of ``score >= t`` on the given scores.

    Candidates are the distinct scores; among equally good candidates the
    highest wins (fewest false positives). The returned value is the midpoint
    between the winner and the next lower distinct score, which classifies
    every given score exactly as the winner does.
    """
    pos = _as_1d(pos, "threshold pos")
    neg = _as_1d(neg, "threshold neg")
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("threshold_max_f1 needs at least one positive and one negative")
    scores = np.unique(np.concatenate([pos, neg]))[::-1]  # distinct, descending
    pos_sorted = np.sort(pos)
    neg_sorted = np.sort(neg)
    tp = len(pos) - np.searchsorted(pos_sorted, scores, side="left")
    fp = len(neg) - np.searchsorted(neg_sorted, scores, side="left")
    fn = len(pos) - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.argmax(f1))  # first maximum in descending order = highest threshold
    return _midpoint_below(float(scores[best]), scores)


def threshold_fixed_fpr(pos: np.ndarray, neg: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold whose false-positive rate on ``neg`` is at most ``target_fpr``.

    The lowest such threshold maximises the true-positive rate under the FPR
    constraint. If no score qualifies, the threshold lies just above the
    highest score (nothing is classified positive). Midpoint rule as in
    :func:`threshold_max_f1`.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be within [0, 1], got {target_fpr}")
    pos = _as_1d(pos, "threshold pos")
    neg = _as_1d(neg, "threshold neg")
    if len(neg) == 0:
        raise ValueError("threshold_fixed_fpr needs at least one negative")
    scores = np.unique(np.concatenate([pos, neg]))[::-1]
    neg_sorted = np.sort(neg)
    fpr = (len(neg) - np.searchsorted(neg_sorted, scores, side="left")) / len(neg)
    ok = np.flatnonzero(fpr <= target_fpr + 1e-12)
    if len(ok) == 0:
        top = float(scores[0])
        return top + max(abs(top), 1.0) * 1e-6
    # fpr grows as the threshold falls, so the qualifying candidates are a prefix.
    return _midpoint_below(float(scores[ok[-1]]), scores)


def calibration(
    pos: np.ndarray,
    neg: np.ndarray,
    *,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
) -> dict:
    """Runtime calibration of one emotion at one layer from held-out projections.

    ``{pos_mean, pos_std, neg_mean, neg_std, n_pos, n_neg, threshold,
    threshold_method}`` (+ ``target_fpr`` for ``fixed_fpr``). See
    :func:`z_score` and :func:`probability` for how a runtime uses it.
    """
    pos = _as_1d(pos, "calibration pos")
    neg = _as_1d(neg, "calibration neg")
    if threshold_method == "max_f1":
        threshold = threshold_max_f1(pos, neg)
    elif threshold_method == "fixed_fpr":
        threshold = threshold_fixed_fpr(pos, neg, target_fpr)
    else:
        raise ValueError(
            f"unknown threshold method {threshold_method!r}; choose one of {', '.join(THRESHOLD_METHODS)}"
        )
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
    return out


def z_score(raw: np.ndarray | float, calib: dict) -> np.ndarray:
    """How many negative-class SDs a raw projection lies above the negatives' mean."""
    sd = calib["neg_std"] if calib["neg_std"] > 0 else 1.0
    return (np.asarray(raw, dtype=np.float64) - calib["neg_mean"]) / sd


def probability(raw: np.ndarray | float, calib: dict) -> np.ndarray:
    """P(positive | raw) under two equal-prior Gaussians with the pooled SD (monotone in raw)."""
    n_p, n_n = calib["n_pos"], calib["n_neg"]
    dof = max(n_p + n_n - 2, 1)
    var = ((n_p - 1) * calib["pos_std"] ** 2 + (n_n - 1) * calib["neg_std"] ** 2) / dof
    var = var if var > 0 else 1.0
    mid = (calib["pos_mean"] + calib["neg_mean"]) / 2.0
    logit = (calib["pos_mean"] - calib["neg_mean"]) / var * (np.asarray(raw, dtype=np.float64) - mid)
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -500, 500)))


def summarise_lengths(lengths: np.ndarray | list[int]) -> dict:
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
