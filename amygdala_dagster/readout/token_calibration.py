"""Token-level calibration (Contract 3 ``token_calibration``): what the runtime's per-token scores look like.

The runtime projects every token, so a threshold must be set on the
distribution of per-token projections, not on mean-pooled texts (whose
spread is narrower). Per concept and layer, over that concept's calibration
texts (its held-out negatives by default, or runtime-like text given with
``--calibration-texts``), with special tokens and the first
``skip_first_tokens`` positions left out (decoders put outsized activations
on the first position, see benchmarks/RESULTS.md), this module records the
mean, standard deviation and upper quantiles of the projections and the
threshold above which ``target_rate`` of the tokens lie.

The shipped numbers use every calibration text. The threshold rule is
checked on tokens not used to set it by cross-fitting over texts (folds by
content hash; each fold measured against the threshold set on the others):
``heldout.fire_rate`` is the rate a user should expect on text the
calibration never saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from amygdala_dagster.readout.manifest import calibration_entry
from amygdala_dagster.readout.runtime import (
    DEFAULT_SKIP_FIRST_TOKENS, Encoded, ReadoutRuntime, TokenActivationCache, encode, scored_mask, token_activations,
)

log = logging.getLogger(__name__)

DEFAULT_TARGET_RATE = 0.01
DEFAULT_FOLDS = 5
QUANTILES = ("0.5", "0.9", "0.99", "0.999")
#: A concept's held-out check is meaningful when it expects at least this many firing tokens.
MIN_EXPECTED_FIRES = 10
SOURCE_HOLDOUT = "holdout_negatives"


def text_folds(keys: Sequence[str], n_folds: int = DEFAULT_FOLDS) -> np.ndarray:
    """A fold number per text (by content key): stable (independent of order and of the other texts'
    presence only through the ranking), as equal in size as possible; fewer folds than texts never."""
    n = len(keys)
    order = np.argsort([hashlib.sha256(f"token-calibration\0{k}".encode()).hexdigest() for k in keys],
                       kind="stable")
    folds = np.zeros(n, dtype=int)
    folds[order] = np.arange(n) % max(min(int(n_folds), n), 1)
    return folds


def _threshold(x: np.ndarray, target_rate: float) -> float:
    return float(np.quantile(x, 1.0 - target_rate))


def calibrate_tokens(
    values: Sequence[np.ndarray],
    keys: Sequence[str],
    *,
    source: str,
    skip_first_tokens: int,
    target_rate: float = DEFAULT_TARGET_RATE,
    n_folds: int = DEFAULT_FOLDS,
) -> dict[str, Any] | None:
    """The ``token_calibration`` entry from per-text arrays of scored-token projections.

    ``values[i]`` holds text ``keys[i]``'s projections at the scored
    positions. Statistics and the shipped threshold use every text.
    ``heldout`` measures the threshold rule on tokens not used to set it:
    the texts are split into ``n_folds`` folds by content hash, each fold's
    tokens are compared with the threshold set on the other folds, and the
    firing rate is pooled over all folds (cross-fitting: every text is
    measured once, out of sample). None when no text has a scored token.
    """
    if not 0 < target_rate < 1:
        raise ValueError(f"token target rate must be within (0, 1), got {target_rate}")
    kept = [(np.asarray(v, np.float64), k) for v, k in zip(values, keys) if len(v)]
    if not kept:
        return None
    x = np.concatenate([v for v, _ in kept])
    threshold = _threshold(x, target_rate)
    out: dict[str, Any] = {
        "source": source,
        "skip_first_tokens": int(skip_first_tokens),
        "n_texts": len(kept),
        "n_tokens": int(x.size),
        "neg_mean": float(x.mean()),
        "neg_std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "quantiles": {q: float(np.quantile(x, float(q))) for q in QUANTILES},
        "target_rate": float(target_rate),
        "threshold": threshold,
        "heldout": None,
    }
    folds = text_folds([k for _, k in kept], n_folds)
    n_f = int(folds.max()) + 1
    if n_f >= 2:
        fires = tokens = 0
        for f in range(n_f):
            fit = np.concatenate([v for (v, _), g in zip(kept, folds) if g != f])
            check = np.concatenate([v for (v, _), g in zip(kept, folds) if g == f])
            fires += int(np.sum(check >= _threshold(fit, target_rate)))
            tokens += int(check.size)
        rate = fires / tokens
        out["heldout"] = {
            "method": f"{n_f}-fold by text", "n_texts": len(kept), "n_tokens": tokens, "fire_rate": rate,
            "ratio_to_target": rate / target_rate,
            "enough_tokens": bool(tokens * target_rate >= MIN_EXPECTED_FIRES),
        }
    return out


def calibrate_readout(
    readout: Any,
    items_by_concept: Mapping[str, Sequence[tuple[str, Any]]],
    *,
    hidden_layers: Sequence[int],
    tokenizer: Any,
    max_tokens: int | None,
    runtime_factory: Callable[[], ReadoutRuntime],
    cache: TokenActivationCache | None = None,
    source: str | Mapping[str, str] = SOURCE_HOLDOUT,
    skip_first_tokens: int = DEFAULT_SKIP_FIRST_TOKENS,
    target_rate: float = DEFAULT_TARGET_RATE,
    n_folds: int = DEFAULT_FOLDS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, dict[str, Any] | None]]:
    """``{concept: {layer: token_calibration}}`` for every concept and layer of ``readout``.

    ``items_by_concept[c]`` lists ``(key, text or messages)`` of concept
    ``c``'s calibration texts; ``hidden_layers`` the layers (in order) of
    the runtime's / cache's per-token activations. Each distinct token sequence is read once
    (from ``cache``, else forwarded by the runtime ``runtime_factory()``
    builds -- only when something is missing) and projected on the rows of
    the concepts that use it. ``source`` (one string, or one per concept)
    is recorded in each entry.
    """
    concepts = list(readout.concepts)
    layers = [int(x) for x in readout.layers]
    hidden_layers = [int(x) for x in hidden_layers]
    missing_layers = [x for x in layers if x not in hidden_layers]
    if missing_layers:
        raise ValueError(f"the activations hold layers {hidden_layers}, not the readout's {missing_layers}")
    encoded: list[Encoded] = []
    index: dict[str, int] = {}
    users: dict[int, list[tuple[int, str]]] = {}
    by_item: dict[str, Encoded] = {}  # concepts share most calibration texts: each is tokenised once
    for ci, concept in enumerate(concepts):
        for key, item in items_by_concept.get(concept, ()):
            item_key = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
            enc = by_item.get(item_key)
            if enc is None:
                enc = by_item[item_key] = encode(tokenizer, item, max_tokens)
            slot = index.setdefault(enc.key, len(encoded))
            if slot == len(encoded):
                encoded.append(enc)
            users.setdefault(slot, []).append((ci, key))
    per: dict[tuple[int, int], list[np.ndarray]] = {}
    keys: dict[int, list[str]] = {}
    rows = {layer: np.asarray(readout.vectors[layer], np.float64) for layer in layers}
    positions = [hidden_layers.index(layer) for layer in layers]
    for slot, hidden in token_activations(encoded, cache, runtime_factory, progress=progress):
        mask = scored_mask(encoded[slot], skip_first_tokens)
        h = hidden[mask]  # [T', L, H]
        cis = [ci for ci, _ in users[slot]]
        for li, layer in enumerate(layers):
            proj = h[:, positions[li], :].astype(np.float64) @ rows[layer][cis].T
            for j, ci in enumerate(cis):
                per.setdefault((ci, li), []).append(proj[:, j])
        for ci, key in users[slot]:
            keys.setdefault(ci, []).append(key)
    out: dict[str, dict[int, dict[str, Any] | None]] = {}
    for ci, concept in enumerate(concepts):
        src = source if isinstance(source, str) else source.get(concept, SOURCE_HOLDOUT)
        out[concept] = {
            layer: calibrate_tokens(per.get((ci, li), []), keys.get(ci, []), source=src,
                                    skip_first_tokens=skip_first_tokens, target_rate=target_rate,
                                    n_folds=n_folds)
            for li, layer in enumerate(layers)
        }
    return out


def manifest_token_calibration(manifest: Mapping[str, Any]) -> dict[str, dict[int, dict[str, Any] | None]]:
    """``{concept: {layer: token_calibration}}`` as a manifest stores it (None entries for format 1)."""
    return {c: {int(l): calibration_entry(manifest, c, int(l), "token") for l in manifest["layers"]}
            for c in manifest["concepts"]}


def heldout_summary(token_cal: Mapping[str, Mapping[Any, Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """One row per concept and layer: the threshold's firing rate on held-out calibration tokens."""
    rows = []
    for concept, per in token_cal.items():
        for layer, cal in per.items():
            held = (cal or {}).get("heldout") or {}
            rows.append({
                "concept": concept, "layer": int(layer),
                "target_rate": (cal or {}).get("target_rate"),
                "heldout_fire_rate": held.get("fire_rate"),
                "ratio_to_target": held.get("ratio_to_target"),
                "heldout_tokens": held.get("n_tokens"),
                "enough_tokens": bool(held.get("enough_tokens")),
            })
    return rows


def heldout_problems(token_cal: Mapping[str, Mapping[Any, Mapping[str, Any] | None]], max_ratio: float = 2.0
                     ) -> list[str]:
    """Concepts/layers whose threshold fires on held-out calibration tokens more than ``max_ratio`` x target."""
    out = []
    for row in heldout_summary(token_cal):
        ratio = row["ratio_to_target"]
        if ratio is not None and row["enough_tokens"] and ratio > max_ratio:
            out.append(f"{row['concept']} layer {row['layer']}: token threshold fires on "
                       f"{row['heldout_fire_rate']:.2%} of held-out calibration tokens "
                       f"({ratio:.1f}x the target {row['target_rate']:.2%})")
    return out


def calibration_items(
    example_sets: Mapping[str, Any], concepts: Sequence[str], records: Sequence[Any] | None = None,
    records_name: str | None = None,
) -> tuple[dict[str, list[tuple[str, Any]]], dict[str, str]]:
    """``(items_by_concept, source_by_concept)``: each concept's held-out negatives (its train
    negatives when the holdout has none), or the same ``records`` (:class:`~amygdala_dagster.readout.runtime.InputRecord`,
    from ``--calibration-texts``) for every concept."""
    if records is not None:
        items = [(r.id, r.item) for r in records]
        source = f"calibration_texts:{records_name}" if records_name else "calibration_texts"
        return {c: items for c in concepts}, {c: source for c in concepts}
    items_by: dict[str, list[tuple[str, Any]]] = {}
    source_by: dict[str, str] = {}
    for c in concepts:
        s = example_sets[c]
        negs, source = s.holdout_negatives, SOURCE_HOLDOUT
        if not negs:
            log.warning("%s: no held-out negatives; token calibration on its train negatives", c)
            negs, source = s.train_negatives, "train_negatives"
        items_by[c] = [(e.key, e.text) for e in negs]
        source_by[c] = source
    return items_by, source_by


def engine_runtime_factory(engine: Any) -> Callable[[], ReadoutRuntime]:
    """Builds (when called) a capture-only runtime over an :class:`~amygdala_dagster.engine.activations.ActivationEngine`'s
    model, layers, layer path and token limit; the engine's weights are loaded then, not before."""
    def build() -> ReadoutRuntime:
        loaded = engine.load_weights()
        return ReadoutRuntime(loaded.model, engine.tokenizer, None, layers=list(engine.layers),
                              layer_path=engine.resolved_layer_path, max_tokens=engine.max_tokens,
                              batch_size=engine.batch_size, max_batch_tokens=engine.max_batch_tokens)
    return build


def engine_token_cache(engine: Any, cache_root: Any) -> TokenActivationCache:
    """The per-token activation cache for ``engine``'s fingerprint under ``cache_root``."""
    return TokenActivationCache(cache_root, engine.fingerprint, engine.loaded.dtype)


def calibrate_with_engine(
    engine: Any, cache_root: Any, readout: Any, items_by_concept: Mapping[str, Sequence[tuple[str, Any]]],
    source: str | Mapping[str, str], **kwargs: Any,
) -> dict[str, dict[int, dict[str, Any] | None]]:
    """:func:`calibrate_readout` with the engine's tokenizer, token limit and model (weights loaded only
    for sequences not in the per-token cache under ``cache_root``)."""
    return calibrate_readout(
        readout, items_by_concept, hidden_layers=engine.layers, tokenizer=engine.tokenizer,
        max_tokens=engine.max_tokens, runtime_factory=engine_runtime_factory(engine),
        cache=engine_token_cache(engine, cache_root), source=source, **kwargs,
    )
