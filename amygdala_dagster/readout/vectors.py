"""Readout directions from cached activations.

For one emotion the default direction at each hooked layer is
``mean(pos) - mean(neg)`` over the *train* split (Contrastive Activation
Addition), unit-normalised by :func:`amygdala_dagster.readout.estimators.unit_direction`.
The mean-difference path only needs per-layer sums and counts
(:class:`EmotionStats`), accumulated in float64 while streaming over the
activation cache, so memory does not grow with the number of examples. Other
estimators (``estimators.ESTIMATORS``) get the full train arrays.

Examples are duck-typed: anything with ``.key``, ``.text`` and ``.split``
(``amygdala_dagster.examples.selection.Example``); example sets have ``.emotion``,
``.positives`` and ``.negatives``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from amygdala_dagster.engine.cache import ActivationCache, layer_positions, text_sha256
from amygdala_dagster.examples.selection import ExampleSet, training_problems
from amygdala_dagster.files.atomic import atomic_write_bytes
from amygdala_dagster.readout.estimators import (
    DEFAULT_ESTIMATOR,
    DegenerateDirectionError,
    get_estimator,
    unit_direction,
)
from amygdala_dagster.readout.metrics import calibration

log = logging.getLogger(__name__)

STATS_FORMAT = "amygdala-emotion-stats/1"
_CHUNK = 256


class TrainingDataError(DegenerateDirectionError):
    """An emotion cannot be trained from its examples (e.g. no negatives in the train split)."""


# ----------------------------------------------------------------------------- helpers
def _split_shas(examples: Iterable[Any], split: str | None) -> list[str]:
    return [text_sha256(ex.text) for ex in examples if split is None or ex.split == split]


def layer_columns(cache: ActivationCache, layers: Sequence[int] | None) -> tuple[list[int], list[int] | None]:
    """``(layers, column indices into the cache rows, or None for all)``; ValueError names missing layers."""
    cache_layers = cache.layers
    if layers is None:
        if cache_layers is None:
            raise ValueError("the cache fingerprint records no layers; pass layers explicitly")
        return list(cache_layers), None
    layers = [int(x) for x in layers]
    if cache_layers is None or layers == list(cache_layers):
        return layers, None
    return layers, layer_positions(cache, layers)


def _sum_rows(cache: ActivationCache, shas: Sequence[str], cols: list[int] | None) -> tuple[np.ndarray | None, int]:
    total: np.ndarray | None = None
    for chunk in cache.iter_chunks(shas, _CHUNK):
        if cols is not None:
            chunk = chunk[:, cols]
        s = chunk.astype(np.float64).sum(axis=0)
        total = s if total is None else total + s
    return total, len(shas)


# ----------------------------------------------------------------------------- stats
@dataclass
class EmotionStats:
    """Per-layer float64 sums and counts of pooled activations for one emotion."""

    emotion: str
    layers: list[int]
    pos_sum: np.ndarray  # [L, H] float64
    neg_sum: np.ndarray  # [L, H] float64
    pos_n: int
    neg_n: int

    @property
    def pos_mean(self) -> np.ndarray:
        return self.pos_sum / max(self.pos_n, 1)

    @property
    def neg_mean(self) -> np.ndarray:
        return self.neg_sum / max(self.neg_n, 1)


def emotion_stats(
    cache: ActivationCache,
    example_set: ExampleSet,
    split: str = "train",
    *,
    layers: Sequence[int] | None = None,
) -> EmotionStats:
    """Sums and counts of the cached activations of ``example_set``'s ``split`` examples.

    ``layers`` defaults to the cache's layers; a subset selects columns. Every
    text must already be in the cache (see :func:`amygdala_dagster.engine.forward.ensure_cached`).
    """
    layers, cols = layer_columns(cache, layers)
    pos_shas = _split_shas(example_set.positives, split)
    neg_shas = _split_shas(example_set.negatives, split)
    shape = cache.shape
    pos_sum, pos_n = _sum_rows(cache, pos_shas, cols)
    neg_sum, neg_n = _sum_rows(cache, neg_shas, cols)
    hidden = shape[1] if shape is not None else 0
    zero = np.zeros((len(layers), hidden), dtype=np.float64)
    return EmotionStats(
        emotion=example_set.emotion,
        layers=layers,
        pos_sum=pos_sum if pos_sum is not None else zero.copy(),
        neg_sum=neg_sum if neg_sum is not None else zero.copy(),
        pos_n=pos_n,
        neg_n=neg_n,
    )


def save_stats(path: str | os.PathLike[str], stats: EmotionStats) -> None:
    """Write ``stats`` as safetensors (float64 sums, counts in the metadata), atomically."""
    payload = st_save(
        {"pos_sum": np.ascontiguousarray(stats.pos_sum, dtype=np.float64),
         "neg_sum": np.ascontiguousarray(stats.neg_sum, dtype=np.float64)},
        metadata={
            "format": STATS_FORMAT,
            "emotion": stats.emotion,
            "layers": json.dumps([int(x) for x in stats.layers]),
            "pos_n": str(int(stats.pos_n)),
            "neg_n": str(int(stats.neg_n)),
        },
    )
    atomic_write_bytes(path, payload)


def load_stats(path: str | os.PathLike[str]) -> EmotionStats:
    """Read a file written by :func:`save_stats`."""
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{path}: not an emotion-stats file (format {meta.get('format')!r})")
        pos_sum = f.get_tensor("pos_sum")
        neg_sum = f.get_tensor("neg_sum")
    return EmotionStats(
        emotion=meta["emotion"],
        layers=[int(x) for x in json.loads(meta["layers"])],
        pos_sum=pos_sum,
        neg_sum=neg_sum,
        pos_n=int(meta["pos_n"]),
        neg_n=int(meta["neg_n"]),
    )


def _check_counts(emotion: str, pos_n: int, neg_n: int, split: str = "train") -> None:
    problems = training_problems(emotion, pos_n, neg_n, split)
    if problems:
        raise TrainingDataError(problems[0])


def directions_from_stats(stats: EmotionStats) -> tuple[np.ndarray, np.ndarray]:
    """Unit mean-difference directions ``[L, H]`` float32 and raw norms ``[L]`` float64.

    Refuses (:class:`TrainingDataError` / ``DegenerateDirectionError``, naming the
    emotion and layer) an emotion without positives or negatives, or whose
    direction has (near-)zero norm at some layer.
    """
    _check_counts(stats.emotion, stats.pos_n, stats.neg_n)
    diff = stats.pos_mean - stats.neg_mean
    units, norms = [], []
    for i, layer in enumerate(stats.layers):
        u, n = unit_direction(diff[i], f"emotion {stats.emotion!r}, layer {layer}")
        units.append(u)
        norms.append(n)
    return np.stack(units).astype(np.float32), np.asarray(norms, dtype=np.float64)


_SPLIT_COUNTS = ("train_positives", "train_negatives", "holdout_positives", "holdout_negatives")


def _counts(example_set: ExampleSet) -> dict[str, int]:
    """The per-split example counts the manifest records (from ``ExampleSet.counts``)."""
    counts = example_set.counts()
    return {k: counts[k] for k in _SPLIT_COUNTS}


def train_directions(
    cache: ActivationCache,
    example_set: ExampleSet,
    layers: Sequence[int] | None = None,
    estimator_name: str = DEFAULT_ESTIMATOR,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Unit directions ``[L, H]`` float32, raw norms ``[L]`` and example counts for one emotion.

    ``mean_difference`` streams sums over the cache; any other estimator in
    ``estimators.ESTIMATORS`` is called per layer on the full train arrays.
    """
    counts = _counts(example_set)
    if estimator_name == "mean_difference":
        stats = emotion_stats(cache, example_set, "train", layers=layers)
        unit, norms = directions_from_stats(stats)
        return unit, norms, counts
    estimator = get_estimator(estimator_name)
    layers, cols = layer_columns(cache, layers)
    _check_counts(example_set.emotion, counts["train_positives"], counts["train_negatives"])
    pos = cache.get(_split_shas(example_set.positives, "train"))
    neg = cache.get(_split_shas(example_set.negatives, "train"))
    if cols is not None:
        pos, neg = pos[:, cols], neg[:, cols]
    units: list[np.ndarray] = []
    raw_norms: list[float] = []
    for i, layer in enumerate(layers):
        direction = estimator(pos[:, i], neg[:, i])
        u, n = unit_direction(direction, f"emotion {example_set.emotion!r}, layer {layer}")
        units.append(u)
        raw_norms.append(n)
    return np.stack(units).astype(np.float32), np.asarray(raw_norms, dtype=np.float64), counts


# ----------------------------------------------------------------------------- calibration
def _proj_stats(values: np.ndarray) -> dict[str, float | None]:
    n = int(values.shape[0])
    if n == 0:
        return {"mean": None, "std": None}
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if n > 1 else 0.0,
    }


def projection_calibration(
    cache: ActivationCache,
    example_set: ExampleSet,
    unit_vectors: np.ndarray,
    layers: Sequence[int] | None = None,
    split: str = "holdout",
    *,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
) -> dict[int, dict[str, Any]]:
    """Per layer: the runtime calibration of ``split``'s projections on ``unit_vectors``.

    ``{split, pos_mean, pos_std, n_pos, neg_mean, neg_std, n_neg, threshold,
    threshold_method}`` as :func:`amygdala_dagster.readout.metrics.calibration`
    computes it; without a threshold when a class is empty.
    """
    layers, cols = layer_columns(cache, layers)
    unit = np.asarray(unit_vectors, dtype=np.float64)
    out: dict[int, dict[str, Any]] = {}
    projs: dict[str, list[np.ndarray]] = {"pos": [], "neg": []}
    for name, examples in (("pos", example_set.positives), ("neg", example_set.negatives)):
        for chunk in cache.iter_chunks(_split_shas(examples, split), _CHUNK):
            if cols is not None:
                chunk = chunk[:, cols]
            projs[name].append(np.einsum("nlh,lh->nl", chunk.astype(np.float64), unit))
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, len(layers)))) for k, v in projs.items()}
    for i, layer in enumerate(layers):
        pos, neg = arrays["pos"][:, i], arrays["neg"][:, i]
        if len(pos) and len(neg):
            out[layer] = {"split": split, **calibration(
                pos, neg, threshold_method=threshold_method, target_fpr=target_fpr)}
            continue
        p, n = _proj_stats(pos), _proj_stats(neg)
        out[layer] = {
            "split": split,
            "pos_mean": p["mean"], "pos_std": p["std"], "n_pos": int(len(pos)),
            "neg_mean": n["mean"], "neg_std": n["std"], "n_neg": int(len(neg)),
        }
    return out


def holdout_calibration(
    cache: ActivationCache,
    example_set: ExampleSet,
    unit_vectors: np.ndarray,
    layers: Sequence[int] | None = None,
    *,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
) -> dict[int, dict[str, Any]]:
    """Calibration of the projection on ``unit_vectors`` (``[L, H]``) for the manifest.

    Per layer ``{split, pos_mean, pos_std, n_pos, neg_mean, neg_std, n_neg,
    threshold, threshold_method}``: the projections of the *held-out* positives
    and negatives (pooled activation dot unit vector; with mean pooling this
    equals the mean of the per-token projections a runtime computes), with the
    decision threshold chosen by ``threshold_method`` (``max_f1`` or
    ``fixed_fpr`` at ``target_fpr``). When the holdout split lacks positives or
    negatives the train split is used instead and ``split`` says so (such
    numbers are optimistic).
    """
    kw: dict[str, Any] = {"threshold_method": threshold_method, "target_fpr": target_fpr}
    cal = projection_calibration(cache, example_set, unit_vectors, layers, "holdout", **kw)
    first = next(iter(cal.values()), None)
    if first is not None and (first["n_pos"] == 0 or first["n_neg"] == 0):
        log.warning(
            "emotion %r: holdout split has %d positives / %d negatives; calibrating on the train split",
            example_set.emotion, first["n_pos"], first["n_neg"],
        )
        cal = projection_calibration(cache, example_set, unit_vectors, layers, "train", **kw)
    return cal


# ----------------------------------------------------------------------------- readout
@dataclass
class TrainedReadout:
    """The trained matrix: all emotions' unit directions.

    Ready for :func:`amygdala_dagster.readout.manifest.write_readout`.

    ``vectors[layer]`` is ``[C, H]`` float32 with rows in ``concepts`` order;
    ``raw_norms[concept]`` lists the pre-normalisation norm per layer (in
    ``layers`` order); ``counts[concept]`` the example counts;
    ``calibration[concept][layer]`` the projection statistics (may be empty).
    """

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, np.ndarray]
    raw_norms: dict[str, list[float]]
    counts: dict[str, dict[str, int]]
    calibration: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    estimator: str = DEFAULT_ESTIMATOR
    skipped: list[str] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).shape[1])



def readout_from_directions(
    directions: Mapping[str, tuple[np.ndarray, np.ndarray, dict[str, int]]],
    layers: Sequence[int],
    *,
    order: Sequence[str] | None = None,
    calibration: Mapping[str, dict[int, dict[str, Any]]] | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
) -> TrainedReadout:
    """Assemble per-emotion ``(unit [L,H], raw_norms [L], counts)`` into a :class:`TrainedReadout`."""
    concepts = list(order) if order is not None else sorted(directions)
    missing = [c for c in concepts if c not in directions]
    if missing:
        raise ValueError(f"no directions for concepts {missing}")
    if not concepts:
        raise TrainingDataError("no emotions to train: the readout would be empty")
    layers = [int(x) for x in layers]
    vectors = {
        layer: np.ascontiguousarray(np.stack([directions[c][0][i] for c in concepts]).astype(np.float32))
        for i, layer in enumerate(layers)
    }
    return TrainedReadout(
        concepts=concepts,
        layers=layers,
        vectors=vectors,
        raw_norms={c: [float(x) for x in directions[c][1]] for c in concepts},
        counts={c: dict(directions[c][2]) for c in concepts},
        calibration={c: dict(calibration[c]) for c in concepts if calibration and c in calibration},
        estimator=estimator,
    )


def train_readout(
    example_sets: Mapping[str, Any],
    cache: ActivationCache,
    layers: Sequence[int] | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    *,
    order: Sequence[str] | None = None,
    calibrate: bool = True,
    skip_invalid: bool = False,
    stats: Mapping[str, EmotionStats] | None = None,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
) -> TrainedReadout:
    """Train every emotion of ``example_sets`` from the cache into one :class:`TrainedReadout`.

    ``stats`` gives already computed train statistics (mean-difference only):
    the directions then come from them instead of a pass over the cache, which
    still serves the held-out calibration (threshold by ``threshold_method``).
    Rows follow ``order`` (default: sorted emotion names). All emotions are
    attempted and the refusals reported together in one
    :class:`TrainingDataError` naming each emotion; with ``skip_invalid`` the
    refused emotions are left out with a warning instead and the returned
    object's ``skipped`` lists the reasons.
    """
    layers, _ = layer_columns(cache, layers)
    names = list(order) if order is not None else sorted(example_sets)
    directions: dict[str, tuple[np.ndarray, np.ndarray, dict[str, int]]] = {}
    calibration: dict[str, dict[int, dict[str, Any]]] = {}
    errors: list[str] = []
    if stats is not None and estimator != "mean_difference":
        raise ValueError(f"precomputed statistics give mean-difference directions, not {estimator!r}")
    for name in names:
        try:
            if stats is not None:
                directions[name] = (*directions_from_stats(stats[name]), _counts(example_sets[name]))
            else:
                directions[name] = train_directions(cache, example_sets[name], layers, estimator)
        except DegenerateDirectionError as exc:
            errors.append(str(exc))
            continue
        if calibrate:
            calibration[name] = holdout_calibration(cache, example_sets[name], directions[name][0], layers,
                                                    threshold_method=threshold_method, target_fpr=target_fpr)
    if errors and not skip_invalid:
        raise TrainingDataError("; ".join(errors))
    for err in errors:
        log.warning("skipping: %s", err)
    kept = [n for n in names if n in directions]
    readout = readout_from_directions(directions, layers, order=kept, calibration=calibration, estimator=estimator)
    readout.skipped = errors
    return readout


__all__ = [
    "EmotionStats",
    "TrainedReadout",
    "TrainingDataError",
    "directions_from_stats",
    "emotion_stats",
    "holdout_calibration",
    "load_stats",
    "projection_calibration",
    "readout_from_directions",
    "save_stats",
    "train_directions",
    "train_readout",
    "layer_columns",
]
