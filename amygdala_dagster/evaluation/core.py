"""Evaluation of readout vectors: does each vector read what it claims?

Everything here reads activations from the activation cache only; nothing
already cached is forwarded again (conversation snippets go through
:func:`amygdala_dagster.cache.ensure_cached` first, so only new snippets cost a
forward pass). The result of :func:`evaluate` is a JSON-ready dict: the
content of ``evaluation.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amygdala_dagster.cache import ActivationCache, ensure_cached, text_sha256
from amygdala_dagster.estimators import DegenerateDirectionError, make_estimator, unit_direction
from amygdala_dagster.evaluation import metrics as M

log = logging.getLogger(__name__)

EVALUATION_FORMAT_VERSION = 1
DEFAULT_ESTIMATORS = ("mean_difference", "lda", "logistic")


# ----------------------------------------------------------------------------- helpers


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def json_clean(obj: Any) -> Any:
    """``obj`` with NaN/Inf replaced by None and numpy scalars/arrays made plain (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _finite_or_none(obj)
    return obj


def _sets_by_emotion(example_sets: Mapping[str, Any] | Iterable[Any]) -> dict[str, Any]:
    if isinstance(example_sets, Mapping):
        return dict(example_sets)
    return {s.emotion: s for s in example_sets}


def _cache_layers(cache: ActivationCache) -> list[int]:
    layers = cache.layers
    if layers is None:
        raise ValueError(f"activation cache {cache.directory}: its fingerprint records no 'layers'")
    return layers


def _layer_positions(cache_layers: Sequence[int], wanted: Sequence[int], what: str) -> list[int]:
    missing = [l for l in wanted if l not in cache_layers]
    if missing:
        raise ValueError(
            f"{what}: layer(s) {missing} are not in the activation cache (it holds layers {list(cache_layers)})"
        )
    return [list(cache_layers).index(l) for l in wanted]


def _acts(cache: ActivationCache, examples: Sequence[Any]) -> np.ndarray:
    """``[N, L, H]`` float64 activations of ``examples`` from the cache (KeyError names the example)."""
    if not examples:
        shape = cache.shape or (0, 0)
        return np.zeros((0, *shape), dtype=np.float64)
    shas = [text_sha256(e.text) for e in examples]
    try:
        return cache.get(shas).astype(np.float64)
    except KeyError:
        for e, sha in zip(examples, shas):
            if sha not in cache:
                raise KeyError(
                    f"example {e.key!r}: its text is not in the activation cache {cache.directory}; "
                    "run the activation step first"
                ) from None
        raise


def _best_layer(aurocs: Mapping[int, float | None]) -> int | None:
    best, best_auc = None, -math.inf
    for layer, auc in aurocs.items():
        if auc is not None and math.isfinite(auc) and auc > best_auc:
            best, best_auc = layer, auc
    return best


def _separation(
    pos: np.ndarray, neg: np.ndarray, *, threshold_method: str, target_fpr: float, bootstrap: int,
    bootstrap_max_n: int, seed: int,
) -> dict[str, Any]:
    """Held-out separation numbers and calibration of one vector's projections."""
    out: dict[str, Any] = {
        "n_pos": len(pos), "n_neg": len(neg),
        "auroc": M.auroc(pos, neg), "auroc_ci": None,
        "cohens_d": M.cohens_d(pos, neg),
        "accuracy": None, "f1": None, "calibration": None,
    }
    if len(pos) and len(neg):
        if bootstrap > 0 and len(pos) + len(neg) <= bootstrap_max_n:
            out["auroc_ci"] = M.bootstrap_auroc_ci(pos, neg, n_boot=bootstrap, seed=seed)
        cal = M.calibration(pos, neg, threshold_method=threshold_method, target_fpr=target_fpr)
        cal["split"] = "holdout"
        out["calibration"] = cal
        out["accuracy"] = M.accuracy_at(pos, neg, cal["threshold"])
        out["f1"] = M.f1_at(pos, neg, cal["threshold"])
        out["confusion"] = M.confusion_at(pos, neg, cal["threshold"])
    return out


# ----------------------------------------------------------------------------- confounds


def _oriented_length_auroc(train_pos: Sequence[Any], train_neg: Sequence[Any],
                           hold_pos: Sequence[Any], hold_neg: Sequence[Any]) -> float:
    """Held-out AUROC of "text length" as a classifier, its sign chosen on the train split."""
    hp = np.array([len(e.text) for e in hold_pos], dtype=np.float64)
    hn = np.array([len(e.text) for e in hold_neg], dtype=np.float64)
    a = M.auroc(hp, hn)
    if not math.isfinite(a):
        return a
    if train_pos and train_neg:
        tp = np.mean([len(e.text) for e in train_pos])
        tn = np.mean([len(e.text) for e in train_neg])
        return a if tp >= tn else 1.0 - a
    return max(a, 1.0 - a)  # no train split to orient by: the baseline gets the benefit of the doubt


def _node_type_auroc(train_pos: Sequence[Any], train_neg: Sequence[Any],
                     hold_pos: Sequence[Any], hold_neg: Sequence[Any]) -> float:
    """Held-out AUROC of "node type" as a classifier: each type scores its train positive rate."""
    fit_pos, fit_neg = (train_pos, train_neg) if train_pos and train_neg else (hold_pos, hold_neg)
    cp = Counter(e.node_type for e in fit_pos)
    cn = Counter(e.node_type for e in fit_neg)
    prior = len(fit_pos) / max(len(fit_pos) + len(fit_neg), 1)

    def rate(t: str) -> float:
        n = cp[t] + cn[t]
        return cp[t] / n if n else prior

    return M.auroc([rate(e.node_type) for e in hold_pos], [rate(e.node_type) for e in hold_neg])


def confounds(example_set: Any) -> dict[str, Any]:
    """Node-type mix and text lengths of positives vs negatives, and trivial-baseline AUROCs."""
    tp, tn = example_set.train_positives, example_set.train_negatives
    hp, hn = example_set.holdout_positives, example_set.holdout_negatives
    return {
        "node_type_mix": {
            "positive": dict(sorted(Counter(e.node_type for e in example_set.positives).items())),
            "negative": dict(sorted(Counter(e.node_type for e in example_set.negatives).items())),
        },
        "text_length": {
            "positive": M.summarise_lengths([len(e.text) for e in example_set.positives]),
            "negative": M.summarise_lengths([len(e.text) for e in example_set.negatives]),
        },
        "baseline_auroc": {
            "length": _oriented_length_auroc(tp, tn, hp, hn),
            "node_type": _node_type_auroc(tp, tn, hp, hn),
        },
    }


# ----------------------------------------------------------------------------- per emotion


def evaluate_emotion(
    cache: ActivationCache,
    example_set: Any,
    readout: Any,
    *,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
    bootstrap: int = 1000,
    bootstrap_max_n: int = 400,
    confound_margin: float = 0.0,
    logistic_C: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate one emotion's shipped vectors (every layer of ``readout``) from cached activations.

    Held-out separation and calibration use the shipped vectors; the estimator
    comparison refits each estimator on the train split and scores the holdout.
    Calibration falls back to the train split (``calibration["split"] == "train"``)
    when the holdout lacks positives or negatives, so every layer gets one.
    """
    emotion = example_set.emotion
    if emotion not in readout.concepts:
        raise ValueError(f"emotion {emotion!r} has no readout vector (concepts: {', '.join(readout.concepts)})")
    ci = list(readout.concepts).index(emotion)
    layers = [int(l) for l in readout.layers]
    pos_idx = _layer_positions(_cache_layers(cache), layers, f"emotion {emotion!r}")

    hp, hn = example_set.holdout_positives, example_set.holdout_negatives
    tp, tn = example_set.train_positives, example_set.train_negatives
    a_hp, a_hn, a_tp, a_tn = (_acts(cache, x) for x in (hp, hn, tp, tn))

    per_layer: dict[int, dict[str, Any]] = {}
    projections: dict[int, dict[str, list[float]]] = {}
    for layer, li in zip(layers, pos_idx):
        v = np.asarray(readout.vectors[layer][ci], dtype=np.float64)
        p, n = a_hp[:, li, :] @ v, a_hn[:, li, :] @ v
        sep = _separation(p, n, threshold_method=threshold_method, target_fpr=target_fpr,
                          bootstrap=bootstrap, bootstrap_max_n=bootstrap_max_n, seed=seed)
        if sep["calibration"] is None:
            # Holdout lacks a class: calibrate on the train split (optimistic, marked as such).
            # Same rule as vectors.holdout_calibration: both classes from the train split.
            cp, cn = a_tp[:, li, :] @ v, a_tn[:, li, :] @ v
            if len(cp) and len(cn):
                cal = M.calibration(cp, cn, threshold_method=threshold_method, target_fpr=target_fpr)
                cal["split"] = "train"
                sep["calibration"] = cal
        per_layer[layer] = sep
        projections[layer] = {"positive": p.tolist(), "negative": n.tolist()}

    # Estimators side by side: fit on train, score the holdout.
    compared: dict[str, dict[int, float | None]] = {}
    for name in estimators:
        est = make_estimator(name, C=logistic_C) if name == "logistic" else make_estimator(name)
        compared[name] = {}
        for layer, li in zip(layers, pos_idx):
            auc = None
            if len(a_tp) and len(a_tn) and len(a_hp) and len(a_hn):
                try:
                    u, _ = unit_direction(est(a_tp[:, li, :], a_tn[:, li, :]), f"{emotion} layer {layer} ({name})")
                    auc = M.auroc(a_hp[:, li, :] @ u, a_hn[:, li, :] @ u)
                except DegenerateDirectionError as exc:
                    log.warning("estimator comparison: %s", exc)
            compared[name][layer] = auc

    aurocs = {l: per_layer[l]["auroc"] for l in layers}
    best = _best_layer(aurocs)
    conf = confounds(example_set)
    vector_auc = aurocs[best] if best is not None else math.nan
    baseline = max((b for b in conf["baseline_auroc"].values() if b is not None and math.isfinite(b)),
                   default=math.nan)
    flags = []
    if not math.isfinite(vector_auc):
        flags.append({"emotion": emotion, "kind": "not_evaluable",
                      "message": f"{emotion}: the holdout lacks positives or negatives; no held-out AUROC"})
    elif math.isfinite(baseline) and vector_auc <= baseline + confound_margin:
        which = max(conf["baseline_auroc"], key=lambda k: conf["baseline_auroc"][k]
                    if conf["baseline_auroc"][k] is not None and math.isfinite(conf["baseline_auroc"][k]) else -1)
        flags.append({
            "emotion": emotion, "kind": "confound",
            "message": (f"{emotion}: best held-out AUROC {vector_auc:.3f} (layer {best}) is no better than "
                        f"the trivial {which.replace('_', ' ')} baseline ({baseline:.3f})"),
        })
    conf["vector_auroc"] = vector_auc
    conf["flagged"] = any(f["kind"] == "confound" for f in flags)

    return {
        "emotion": emotion,
        "counts": example_set.counts(),
        "layers": {str(l): per_layer[l] for l in layers},
        "best_layer": best,
        "best_auroc": vector_auc,
        "estimators": {name: {str(l): v for l, v in d.items()} for name, d in compared.items()},
        "confounds": conf,
        "projections": {
            str(l): {**projections[l], "positive_keys": [e.key for e in hp], "negative_keys": [e.key for e in hn]}
            for l in layers
        },
        "flags": flags,
    }


# ----------------------------------------------------------------------------- cross-talk


def crosstalk(readout: Any, *, snapshot: Any = None, threshold: float = 0.5) -> dict[str, Any]:
    """Cosine similarity between emotion vectors per layer, beside the tags' co-occurrence."""
    concepts = list(readout.concepts)
    cos_by_layer: dict[str, list[list[float]]] = {}
    for layer in readout.layers:
        v = np.asarray(readout.vectors[int(layer)], dtype=np.float64)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        u = v / np.where(norms > 0, norms, 1.0)
        cos_by_layer[str(layer)] = np.clip(u @ u.T, -1.0, 1.0).tolist()
    co = None
    if snapshot is not None:
        from amygdala_dagster.examples import cooccurrence

        _, corr = cooccurrence(snapshot, concepts)
        co = corr.tolist()
    pairs = []
    for layer, mat in cos_by_layer.items():
        for i in range(len(concepts)):
            for j in range(i + 1, len(concepts)):
                if mat[i][j] >= threshold:
                    pairs.append({
                        "a": concepts[i], "b": concepts[j], "layer": int(layer), "cosine": mat[i][j],
                        "cooccurrence": co[i][j] if co is not None else None,
                    })
    pairs.sort(key=lambda p: (-p["cosine"], p["a"], p["b"], p["layer"]))
    return {"concepts": concepts, "threshold": threshold, "cosine": cos_by_layer, "cooccurrence": co, "pairs": pairs}


# ----------------------------------------------------------------------------- generalisation


def read_snippets(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Conversation snippets from a JSONL file of ``{"id", "text"}`` (errors name the line)."""
    path = Path(path)
    out, seen = [], set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "id" not in obj:
                raise ValueError(f'{path}:{lineno}: expected an object with "id" and "text"')
            if not obj["text"].strip():
                raise ValueError(f"{path}:{lineno}: snippet {obj['id']!r} has empty text")
            sid = str(obj["id"])
            if sid in seen:
                raise ValueError(f"{path}:{lineno}: duplicate snippet id {sid!r}")
            seen.add(sid)
            out.append({"id": sid, "text": obj["text"]})
    return out


def generalisation(
    cache: ActivationCache,
    readout: Any,
    snippets: Sequence[Mapping[str, str]],
    layer_for: Mapping[str, int | None],
    calibration_for: Mapping[str, Mapping[int, dict | None]],
    *,
    engine: Any = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """Top and bottom snippets per emotion by calibrated score at the emotion's chosen layer."""
    texts = [s["text"] for s in snippets]
    ids = [str(s["id"]) for s in snippets]
    stats = None
    if engine is not None:
        stats = ensure_cached(engine, cache, texts, keys=ids, progress=False).to_dict()
    missing = [i for i, t in zip(ids, texts) if text_sha256(t) not in cache]
    if missing:
        raise ValueError(
            f"{len(missing)} conversation snippet(s) (first {missing[0]!r}) are not in the activation cache "
            "and no engine was given to forward them"
        )
    acts = cache.get([text_sha256(t) for t in texts]).astype(np.float64) if texts else None
    cache_layers = _cache_layers(cache)
    out: dict[str, Any] = {"n_snippets": len(snippets), "cache_stats": stats, "emotions": {}}
    for ci, emotion in enumerate(readout.concepts):
        layer = layer_for.get(emotion)
        if layer is None:
            layer = int(readout.layers[-1])
        cal = (calibration_for.get(emotion) or {}).get(layer)
        if acts is None:
            out["emotions"][emotion] = {"layer": layer, "top": [], "bottom": []}
            continue
        li = _layer_positions(cache_layers, [layer], f"snippets for {emotion!r}")[0]
        raw = acts[:, li, :] @ np.asarray(readout.vectors[layer][ci], dtype=np.float64)
        z = M.z_score(raw, cal) if cal else np.full_like(raw, np.nan)
        prob = M.probability(raw, cal) if cal else np.full_like(raw, np.nan)
        order = np.argsort(-raw, kind="mergesort")

        def row(i: int) -> dict[str, Any]:
            return {"id": ids[i], "text": texts[i], "raw": float(raw[i]), "z": float(z[i]),
                    "probability": float(prob[i]),
                    "above_threshold": bool(cal and raw[i] >= cal["threshold"])}

        k = min(top_k, len(order))
        out["emotions"][emotion] = {
            "layer": layer,
            "top": [row(int(i)) for i in order[:k]],
            "bottom": [row(int(i)) for i in order[::-1][:k]],
            "fraction_above_threshold": float(np.mean(raw >= cal["threshold"])) if cal else None,
        }
    return out


# ----------------------------------------------------------------------------- layer sweep


def sweep_layers(
    engine: Any,
    cache: ActivationCache,
    example_sets: Mapping[str, Any] | Iterable[Any],
    *,
    layers: Sequence[int] | None = None,
    estimator: str = "mean_difference",
    n_recommend: int = 3,
    n_model_layers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out AUROC of every emotion at every layer, from one pass of the model.

    ``engine`` hooks every layer to sweep and ``cache`` is the cache for its
    fingerprint (a namespace of its own). All texts of all emotions are cached
    in one :func:`ensure_cached` call, then each emotion's direction is fitted
    on its train split at each layer and scored on its holdout.
    ``recommended_layers`` are the ``n_recommend`` layers with the highest mean
    held-out AUROC (best first).
    """
    sets = _sets_by_emotion(example_sets)
    cache_layers = _cache_layers(cache)
    wanted = [int(l) for l in (layers if layers is not None else cache_layers)]
    positions = _layer_positions(cache_layers, wanted, "layer sweep")
    texts, keys = [], []
    for s in sets.values():
        for e in (*s.positives, *s.negatives):
            texts.append(e.text)
            keys.append(e.key)
    stats = ensure_cached(engine, cache, texts, keys=keys, progress=progress) if engine is not None else None
    est = make_estimator(estimator)
    table: dict[str, dict[str, float | None]] = {}
    for emotion, s in sets.items():
        a_tp, a_tn = _acts(cache, s.train_positives), _acts(cache, s.train_negatives)
        a_hp, a_hn = _acts(cache, s.holdout_positives), _acts(cache, s.holdout_negatives)
        row: dict[str, float | None] = {}
        for layer, li in zip(wanted, positions):
            auc = None
            if len(a_tp) and len(a_tn) and len(a_hp) and len(a_hn):
                try:
                    u, _ = unit_direction(est(a_tp[:, li, :], a_tn[:, li, :]), f"{emotion} layer {layer}")
                    auc = M.auroc(a_hp[:, li, :] @ u, a_hn[:, li, :] @ u)
                except DegenerateDirectionError as exc:
                    log.warning("layer sweep: %s", exc)
            row[str(layer)] = auc
        table[emotion] = row
    mean_auc: dict[str, float | None] = {}
    for layer in wanted:
        vals = [table[e][str(layer)] for e in table if table[e][str(layer)] is not None]
        mean_auc[str(layer)] = float(np.mean(vals)) if vals else None
    ranked = sorted((l for l in wanted if mean_auc[str(l)] is not None),
                    key=lambda l: (-mean_auc[str(l)], l))
    out = {
        "layers": wanted,
        "estimator": estimator,
        "auroc": table,
        "mean_auroc": mean_auc,
        "recommended_layers": ranked[:n_recommend],
        "n_model_layers": n_model_layers,
        "cache_fingerprint_id": cache.fingerprint_id,
        "cache_stats": stats.to_dict() if stats is not None else None,
    }
    if n_model_layers:
        out["depth_fraction"] = {str(l): (l + 1) / n_model_layers for l in wanted}
    return out


# ----------------------------------------------------------------------------- everything


def evaluate(
    cache: ActivationCache,
    example_sets: Mapping[str, Any] | Iterable[Any],
    readout: Any,
    *,
    snapshot: Any = None,
    snippets: Sequence[Mapping[str, str]] | str | os.PathLike[str] | None = None,
    engine: Any = None,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    threshold_method: str = "max_f1",
    target_fpr: float = 0.05,
    crosstalk_cosine: float = 0.5,
    bootstrap: int = 1000,
    bootstrap_max_n: int = 400,
    confound_margin: float = 0.0,
    logistic_C: float = 1.0,
    top_k: int = 5,
    seed: int = 0,
    sweep: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole evaluation (the content of ``evaluation.json``), JSON-clean (NaN/Inf -> null).

    ``example_sets``: ``{emotion: ExampleSet}`` (or an iterable of them); every
    concept of ``readout`` must have one. ``snapshot`` (the memory snapshot
    table) adds the tags' co-occurrence beside the cross-talk; ``snippets``
    (records or a JSONL path) adds the generalisation section, forwarding only
    uncached snippets through ``engine``. ``sweep`` is a :func:`sweep_layers`
    result to include. ``meta`` is copied into the result as ``meta``.
    """
    if threshold_method not in M.THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {threshold_method!r}; choose one of {', '.join(M.THRESHOLD_METHODS)}")
    for name in estimators:
        make_estimator(name)  # fail fast on a typo
    sets = _sets_by_emotion(example_sets)
    missing = [c for c in readout.concepts if c not in sets]
    if missing:
        raise ValueError(f"no examples for concept(s) {', '.join(missing)}; pass the examples the vectors came from")
    emotions: dict[str, Any] = {}
    flags: list[dict[str, str]] = []
    for emotion in readout.concepts:
        res = evaluate_emotion(
            cache, sets[emotion], readout, estimators=estimators, threshold_method=threshold_method,
            target_fpr=target_fpr, bootstrap=bootstrap, bootstrap_max_n=bootstrap_max_n,
            confound_margin=confound_margin, logistic_C=logistic_C, seed=seed,
        )
        emotions[emotion] = res
        flags.extend(res["flags"])
        for f in res["flags"]:
            log.warning("evaluation: %s", f["message"])

    layers = [int(l) for l in readout.layers]
    mean_auc = {}
    for layer in layers:
        vals = [emotions[e]["layers"][str(layer)]["auroc"] for e in emotions]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        mean_auc[str(layer)] = float(np.mean(vals)) if vals else None
    est_mean = {}
    for name in estimators:
        vals = [emotions[e]["estimators"][name][str(l)] for e in emotions for l in layers]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        est_mean[name] = float(np.mean(vals)) if vals else None

    result: dict[str, Any] = {
        "format_version": EVALUATION_FORMAT_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "settings": {
            "estimators": list(estimators), "threshold_method": threshold_method, "target_fpr": target_fpr,
            "crosstalk_cosine": crosstalk_cosine, "bootstrap": bootstrap, "bootstrap_max_n": bootstrap_max_n,
            "bootstrap_level": 0.95, "confound_margin": confound_margin, "logistic_C": logistic_C,
            "top_k": top_k, "seed": seed, "cache_fingerprint_id": cache.fingerprint_id,
            "projection": "dot(pooled activation, unit vector) in float64",
            "calibrated_score": {
                "z": "(raw - neg_mean) / neg_std",
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
                                   sorted((l for l in layers if mean_auc[str(l)] is not None),
                                          key=lambda l: (-mean_auc[str(l)], l))[:3]),
            "n_flagged": sum(1 for f in flags if f["kind"] == "confound"),
        },
        "crosstalk": crosstalk(readout, snapshot=snapshot, threshold=crosstalk_cosine),
        "layer_sweep": dict(sweep) if sweep else None,
        "generalisation": None,
        "flags": flags,
    }
    if snippets is not None:
        if isinstance(snippets, (str, os.PathLike)):
            result["meta"].setdefault("snippets_file", str(snippets))
            snippets = read_snippets(snippets)
        layer_for = {e: emotions[e]["best_layer"] for e in emotions}
        cal_for = {e: {int(l): v["calibration"] for l, v in emotions[e]["layers"].items()} for e in emotions}
        result["generalisation"] = generalisation(
            cache, readout, snippets, layer_for, cal_for, engine=engine, top_k=top_k
        )
    return json_clean(result)


def calibration_for_manifest(evaluation: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """``{concept: {str(layer): calibration dict}}`` from an :func:`evaluate` result.

    Each calibration dict holds ``pos_mean, pos_std, neg_mean, neg_std, n_pos,
    n_neg, threshold, threshold_method`` (+ ``target_fpr``), ``split`` and the
    held-out ``auroc``. Raises ValueError naming a concept/layer that has none.
    """
    out: dict[str, dict[str, dict]] = {}
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
