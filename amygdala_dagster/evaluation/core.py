"""Evaluation of readout vectors: does each vector read what it claims?

Everything here works on arrays: pooled activations read from the activation
cache (which the GPU step filled, conversation snippets included) and the
per-token scores of :mod:`.conversations`. Nothing here loads a model. The
result of :func:`evaluate` is a JSON-ready dict: the content of
``evaluation.json``. Its parts: the trivial baselines of :mod:`.confounds`, the verdicts of
:mod:`.verdicts`, the snippet scores of :mod:`.generalisation`; :mod:`.layer_sweep` sweeps layers.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import polars as pl
import sklearn

from amygdala_dagster.engine.cache import ActivationCache, layer_positions, text_sha256
from amygdala_dagster.evaluation.confounds import confounds
from amygdala_dagster.evaluation.generalisation import generalisation, read_snippets
from amygdala_dagster.evaluation.verdicts import Criteria, apply_verdicts
from amygdala_dagster.examples.catalog import cooccurrence
from amygdala_dagster.examples.selection import Example, ExampleSet, sets_by_emotion
from amygdala_dagster.files.jsonio import jsonable
from amygdala_dagster.readout import metrics as M
from amygdala_dagster.readout.estimators import DegenerateDirectionError, make_estimator, unit_direction
from amygdala_dagster.readout.manifest import ReadoutMatrix

log = logging.getLogger(__name__)

EVALUATION_FORMAT_VERSION = 2
DEFAULT_ESTIMATORS = ("mean_difference", "lda", "logistic")
# With estimators="auto", LDA and logistic (the costly refits) are compared up to this many emotions;
# beyond it only when asked for (each costs ~0.1 s per emotion and layer).
AUTO_COMPARE_MAX_EMOTIONS = 24
def resolve_estimators(estimators: Sequence[str] | str | None, n_emotions: int) -> tuple[str, ...]:
    """The estimators to compare: a list as given, ``"none"``, or ``"auto"``/None (all three up to
    :data:`AUTO_COMPARE_MAX_EMOTIONS` emotions, else none)."""
    if estimators is None or estimators == "auto":
        # mean_difference alone would only repeat the shipped vector's numbers: compare nothing then.
        return DEFAULT_ESTIMATORS if n_emotions <= AUTO_COMPARE_MAX_EMOTIONS else ()
    if isinstance(estimators, str):
        estimators = () if estimators == "none" else [e.strip() for e in estimators.split(",") if e.strip()]
    for name in estimators:
        make_estimator(name)  # fail fast on a typo
    return tuple(estimators)


# ----------------------------------------------------------------------------- helpers


def json_clean(obj: Any) -> Any:
    """``obj`` with NaN/Inf replaced by None and numpy scalars/arrays made plain (strict JSON)."""
    return jsonable(obj, nonfinite_as_null=True)


def _best_layer(aurocs: Mapping[int, float | None]) -> int | None:
    best, best_auc = None, -math.inf
    for layer, auc in aurocs.items():
        if auc is not None and math.isfinite(auc) and auc > best_auc:
            best, best_auc = layer, auc
    return best


# ----------------------------------------------------------------------------- per emotion


class _Activations:
    """The pooled activations of every example text, read from the cache once, with each text's row."""

    def __init__(self, cache: ActivationCache, sets: Mapping[str, Any]):
        self.row: dict[str, int] = {}
        owners: dict[str, Any] = {}
        for s in sets.values():
            for e in (*s.positives, *s.negatives):
                sha = text_sha256(e.text)
                if sha not in self.row:
                    self.row[sha] = len(self.row)
                    owners[sha] = e
        missing = cache.missing(list(self.row))
        if missing:
            raise KeyError(
                f"example {owners[missing[0]].key!r}: its text is not in the activation cache {cache.directory}; "
                "run the activation step first"
            )
        shape = cache.shape or (0, 0)
        self.data = cache.get(list(self.row)) if self.row else np.zeros((0, *shape), dtype=np.float32)

    def rows(self, examples: Sequence[Example]) -> np.ndarray:
        return np.fromiter((self.row[text_sha256(e.text)] for e in examples), dtype=np.int64, count=len(examples))


def evaluate_emotion(
    cache: ActivationCache,
    example_set: ExampleSet,
    readout: ReadoutMatrix,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
    bootstrap: int = 1000,
    bootstrap_max_n: int = 400,
    logistic_C: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate one emotion's shipped vectors (every layer of ``readout``) from cached activations.

    The same numbers as its entry in :func:`evaluate` (which evaluates every
    emotion from one read of the cache); verdicts need every emotion (cross-talk),
    so they come from :func:`~amygdala_dagster.evaluation.verdicts.judge`.
    """
    emotion = example_set.emotion
    sets = {emotion: example_set}
    acts = _Activations(cache, sets)
    return _evaluate_emotion(acts, cache, example_set, readout, estimators=estimators,
                             threshold_method=threshold_method, target_fpr=target_fpr, bootstrap=bootstrap,
                             bootstrap_max_n=bootstrap_max_n, logistic_C=logistic_C, seed=seed)


def _evaluate_emotion(
    acts: _Activations, cache: ActivationCache, example_set: ExampleSet, readout: ReadoutMatrix, *,
    estimators: Sequence[str], threshold_method: str, target_fpr: float, bootstrap: int,
    bootstrap_max_n: int, logistic_C: float, seed: int,
) -> dict[str, Any]:
    emotion = example_set.emotion
    if emotion not in readout.concepts:
        raise ValueError(f"emotion {emotion!r} has no readout vector (concepts: {', '.join(readout.concepts)})")
    ci = list(readout.concepts).index(emotion)
    layers = [int(layer) for layer in readout.layers]
    pos_idx = layer_positions(cache, layers, f"emotion {emotion!r}")

    hp, hn = example_set.holdout_positives, example_set.holdout_negatives
    tp, tn = example_set.train_positives, example_set.train_negatives
    r_hp, r_hn, r_tp, r_tn = (acts.rows(x) for x in (hp, hn, tp, tn))
    # [L, H] shipped vectors of this emotion, and the projections of its held-out texts: [L, n].
    v = np.stack([np.asarray(readout.vectors[layer][ci], dtype=np.float64) for layer in layers])

    def project(rows: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, np.einsum("nlh,lh->ln", acts.data[rows][:, pos_idx, :].astype(np.float64), v))

    p_all, n_all = project(r_hp), project(r_hn)

    per_layer: dict[int, dict[str, Any]] = {}
    # A holdout lacking a class lacks it at every layer: then every layer calibrates on the train split.
    train_p, train_n = (project(r_tp), project(r_tn)) if not (len(hp) and len(hn)) else (None, None)
    for k, layer in enumerate(layers):
        p, n = p_all[k], n_all[k]
        sep = M.separation(p, n, threshold_method=threshold_method, target_fpr=target_fpr)
        sep["auroc_ci"] = None
        if sep["calibration"] is not None:
            sep["calibration"]["split"] = "holdout"
        else:
            # Holdout lacks a class: calibrate on the train split (optimistic, marked as such).
            # Same rule as vectors.holdout_calibration: both classes from the train split.
            assert train_p is not None and train_n is not None  # set above when the holdout lacks a class
            cp, cn = train_p[k], train_n[k]
            if len(cp) and len(cn):
                cal = M.calibration(cp, cn, threshold_method=threshold_method, target_fpr=target_fpr)
                cal["split"] = "train"
                sep["calibration"] = cal
        per_layer[layer] = sep
    if bootstrap > 0 and len(hp) and len(hn) and len(hp) + len(hn) <= bootstrap_max_n:
        # One resampling for all layers of the emotion (scipy's vectorised bootstrap).
        cis = M.bootstrap_auroc_ci(p_all, n_all, n_boot=bootstrap, seed=seed)
        for k, layer in enumerate(layers if cis is not None else []):
            per_layer[layer]["auroc_ci"] = (float(cast(np.ndarray, cis)[k][0]), float(cast(np.ndarray, cis)[k][1]))

    # Estimators side by side: fit on train, score the holdout.
    compared: dict[str, dict[int, float | None]] = {}
    for name in estimators:
        est = make_estimator(name, C=logistic_C) if name == "logistic" else make_estimator(name)
        compared[name] = {}
        for layer, li in zip(layers, pos_idx):
            auc = None
            if len(r_tp) and len(r_tn) and len(r_hp) and len(r_hn):
                try:
                    u, _ = unit_direction(est(acts.data[r_tp, li, :], acts.data[r_tn, li, :]),
                                          f"{emotion} layer {layer} ({name})")
                    auc = M.auroc(acts.data[r_hp, li, :].astype(np.float64) @ u,
                                  acts.data[r_hn, li, :].astype(np.float64) @ u)
                except DegenerateDirectionError as exc:
                    log.warning("estimator comparison: %s", exc)
            compared[name][layer] = auc

    aurocs = {layer: per_layer[layer]["auroc"] for layer in layers}
    best = _best_layer(aurocs)
    conf = confounds(example_set)
    conf["vector_auroc"] = aurocs[best] if best is not None else math.nan
    return {
        "emotion": emotion,
        "counts": example_set.counts(),
        "layers": {str(layer): per_layer[layer] for layer in layers},
        "best_layer": best,
        "best_auroc": conf["vector_auroc"],
        "estimators": {name: {str(layer): v for layer, v in d.items()} for name, d in compared.items()},
        "confounds": conf,
        "projections": {
            str(layer): {"positive": p_all[k].tolist(), "negative": n_all[k].tolist(),
                     "positive_keys": [e.key for e in hp], "negative_keys": [e.key for e in hn]}
            for k, layer in enumerate(layers)
        },
    }


# ----------------------------------------------------------------------------- cross-talk


def crosstalk(readout: ReadoutMatrix, *, snapshot: pl.DataFrame | None = None,
              threshold: float = 0.5) -> dict[str, Any]:
    """Cosine similarity between emotion vectors per layer, beside the tags' co-occurrence."""
    concepts = list(readout.concepts)
    cos_by_layer: dict[str, list[list[float]]] = {}
    for layer in readout.layers:
        v = np.asarray(readout.vectors[int(layer)], dtype=np.float64)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        u = v / np.where(norms > 0, norms, 1.0)
        # 4 decimals: display values (200 emotions x layers would otherwise be megabytes of digits)
        cos_by_layer[str(layer)] = np.round(np.clip(u @ u.T, -1.0, 1.0), 4).tolist()
    co = None
    if snapshot is not None:
        _, corr = cooccurrence(snapshot, concepts)
        co = np.round(corr, 4).tolist()
    pairs: list[dict[str, Any]] = []
    for layer_name, mat in cos_by_layer.items():
        for i in range(len(concepts)):
            for j in range(i + 1, len(concepts)):
                if mat[i][j] >= threshold:
                    pairs.append({
                        "a": concepts[i], "b": concepts[j], "layer": int(layer_name), "cosine": mat[i][j],
                        "cooccurrence": co[i][j] if co is not None else None,
                    })
    pairs.sort(key=lambda p: (-p["cosine"], p["a"], p["b"], p["layer"]))
    return {"concepts": concepts, "threshold": threshold, "cosine": cos_by_layer, "cooccurrence": co, "pairs": pairs}


# ----------------------------------------------------------------------------- everything


def evaluate(
    cache: ActivationCache,
    example_sets: Mapping[str, ExampleSet] | Iterable[ExampleSet],
    readout: ReadoutMatrix,
    *,
    snapshot: pl.DataFrame | None = None,
    snippets: Sequence[Mapping[str, str]] | str | os.PathLike[str] | None = None,
    estimators: Sequence[str] | str | None = "auto",
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
    crosstalk_cosine: float = 0.5,
    bootstrap: int = 1000,
    bootstrap_max_n: int = 400,
    confound_margin: float | None = None,
    logistic_C: float = 1.0,
    top_k: int = 5,
    seed: int = 0,
    sweep: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    criteria: Criteria | None = None,
    conversations: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole evaluation (the content of ``evaluation.json``), JSON-clean (NaN/Inf -> null).

    ``example_sets``: ``{emotion: ExampleSet}`` (or an iterable of them); every
    concept of ``readout`` must have one. ``snapshot`` (the memory snapshot
    table) adds the tags' co-occurrence beside the cross-talk; ``snippets``
    (records or a JSONL path, all in ``cache``) adds the generalisation section. ``sweep`` is a :func:`sweep_layers`
    result to include. ``meta`` is copied into the result as ``meta``.
    ``estimators``: see :func:`resolve_estimators`. ``criteria`` decide the
    verdicts (:func:`~amygdala_dagster.evaluation.verdicts.judge`; ``confound_margin``, when given, overrides
    ``criteria.confound_margin``). ``conversations`` (with ``per_emotion``) is
    stored as ``conversations`` and taken into account by the verdicts.
    Each emotion's held-out ``projections`` are in the result for the plots;
    :func:`amygdala_dagster.evaluation.report.write_report` stores them beside
    ``evaluation.json`` (Parquet) rather than in it.
    """
    if threshold_method not in M.THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {threshold_method!r}; "
                         f"choose one of {', '.join(M.THRESHOLD_METHODS)}")
    sets = sets_by_emotion(example_sets)
    missing = [c for c in readout.concepts if c not in sets]
    if missing:
        raise ValueError(f"no examples for concept(s) {', '.join(missing)}; pass the examples the vectors came from")
    estimators = resolve_estimators(estimators, len(readout.concepts))
    criteria = criteria or Criteria()
    if confound_margin is not None:
        criteria = Criteria(**{**criteria.to_dict(), "confound_margin": float(confound_margin)})
    acts = _Activations(cache, {c: sets[c] for c in readout.concepts})
    emotions: dict[str, Any] = {}
    # sklearn's input checks cost more than the metrics on a few hundred scores; the inputs are checked here.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        for emotion in readout.concepts:
            emotions[emotion] = _evaluate_emotion(
                acts, cache, sets[emotion], readout, estimators=estimators,
                threshold_method=threshold_method, target_fpr=target_fpr, bootstrap=bootstrap,
                bootstrap_max_n=bootstrap_max_n, logistic_C=logistic_C, seed=seed,
            )

    layers = [int(layer) for layer in readout.layers]
    mean_auc = {}
    for layer in layers:
        vals = [emotions[e]["layers"][str(layer)]["auroc"] for e in emotions]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        mean_auc[str(layer)] = float(np.mean(vals)) if vals else None
    est_mean = {}
    for name in estimators:
        vals = [emotions[e]["estimators"][name][str(layer)] for e in emotions for layer in layers]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        est_mean[name] = float(np.mean(vals)) if vals else None

    result: dict[str, Any] = {
        "format_version": EVALUATION_FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "settings": {
            "estimators": list(estimators), "threshold_method": threshold_method, "target_fpr": target_fpr,
            "crosstalk_cosine": crosstalk_cosine, "bootstrap": bootstrap, "bootstrap_max_n": bootstrap_max_n,
            "bootstrap_level": 0.95, "confound_margin": criteria.confound_margin, "logistic_C": logistic_C,
            "top_k": top_k, "seed": seed, "cache_fingerprint_id": cache.fingerprint_id,
            "criteria": criteria.to_dict(),
            "projection": "dot(pooled activation, unit vector) in float64",
            "calibrated_score": {
                "z": "(raw - neg_mean) / neg_std (null where neg_std is 0: no spread to scale by)",
                "probability": "sigmoid((pos_mean - neg_mean) / pooled_var * (raw - (pos_mean + neg_mean) / 2))",
            },
        },
        "concepts": list(readout.concepts),
        "layers": layers,
        "emotions": emotions,
        "summary": {
            "mean_auroc_by_layer": mean_auc,
            "mean_auroc_by_estimator": est_mean,
            "best_layer": {e: emotions[e]["best_layer"] for e in emotions},
            "best_auroc": {e: emotions[e]["best_auroc"] for e in emotions},
            "recommended_layers": (list(sweep["recommended_layers"]) if sweep else
                                   sorted((layer for layer in layers if mean_auc[str(layer)] is not None),
                                          key=lambda layer: (-cast(float, mean_auc[str(layer)]), layer))[:3]),
        },
        "crosstalk": crosstalk(readout, snapshot=snapshot, threshold=crosstalk_cosine),
        "layer_sweep": dict(sweep) if sweep else None,
        "generalisation": None,
        "conversations": dict(conversations) if conversations else None,
    }
    if snippets is not None:
        if isinstance(snippets, (str, os.PathLike)):
            result["meta"].setdefault("snippets_file", str(snippets))
            snippets = read_snippets(snippets)
        layer_for = {e: emotions[e]["best_layer"] for e in emotions}
        cal_for = {e: {int(layer): v["calibration"] for layer, v in emotions[e]["layers"].items()} for e in emotions}
        result["generalisation"] = generalisation(
            cache, readout, snippets, layer_for, cal_for, top_k=top_k
        )
    return apply_verdicts(json_clean(result), criteria)


def calibration_for_manifest(evaluation: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{concept: {str(layer): calibration dict}}`` from an :func:`evaluate` result.

    Each calibration dict holds ``pos_mean, pos_std, neg_mean, neg_std, n_pos,
    n_neg, threshold, threshold_method`` (+ ``target_fpr``), ``split`` and the
    held-out ``auroc``. Raises ValueError naming a concept/layer that has none.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for concept in evaluation["concepts"]:
        per = {}
        for layer in evaluation["layers"]:
            entry = evaluation["emotions"][concept]["layers"][str(layer)]
            cal = entry.get("calibration")
            if not cal:
                raise ValueError(f"no calibration for {concept!r} at layer {layer}: no positives or no negatives")
            per[str(layer)] = {**cal, "auroc": entry.get("auroc")}
        out[concept] = per
    return out
