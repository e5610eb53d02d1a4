"""The layer sweep: held-out AUROC of every emotion at every layer an engine hooked, and the layers to use."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np

from amygdala_dagster.engine.cache import ActivationCache, layer_positions, text_sha256
from amygdala_dagster.examples.selection import Example, ExampleSet, sets_by_emotion
from amygdala_dagster.readout import metrics as M
from amygdala_dagster.readout.estimators import DegenerateDirectionError, make_estimator, unit_direction

log = logging.getLogger(__name__)


def _acts(cache: ActivationCache, examples: Sequence[Example]) -> np.ndarray:
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


def sweep_layers(
    cache: ActivationCache,
    example_sets: Mapping[str, ExampleSet] | Iterable[ExampleSet],
    *,
    layers: Sequence[int] | None = None,
    estimator: str = "mean_difference",
    n_recommend: int = 3,
    n_model_layers: int | None = None,
    cache_stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Held-out AUROC of every emotion at every layer sweeping ``cache``'s layers.

    ``cache`` holds the activations of every example text at every layer to
    sweep (an engine hooking them all filled it: a fingerprint of its own).
    Each emotion's direction is fitted on its train split at each layer and
    scored on its holdout.
    ``recommended_layers`` are the ``n_recommend`` layers with the highest mean
    held-out AUROC (best first).
    """
    sets = sets_by_emotion(example_sets)
    wanted = [int(layer) for layer in (layers if layers is not None else cache.layers or [])]
    positions = layer_positions(cache, wanted, "layer sweep")
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
        vals = [v for e in table if (v := table[e][str(layer)]) is not None]
        mean_auc[str(layer)] = float(np.mean(vals)) if vals else None
    ranked = sorted((layer for layer in wanted if mean_auc[str(layer)] is not None),
                    key=lambda layer: (-cast(float, mean_auc[str(layer)]), layer))
    out = {
        "layers": wanted,
        "estimator": estimator,
        "auroc": table,
        "mean_auroc": mean_auc,
        "recommended_layers": ranked[:n_recommend],
        "n_model_layers": n_model_layers,
        "cache_fingerprint_id": cache.fingerprint_id,
        "cache_stats": dict(cache_stats) if cache_stats is not None else None,
    }
    if n_model_layers:
        out["depth_fraction"] = {str(layer): (layer + 1) / n_model_layers for layer in wanted}
    return out
