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

The same projections (:func:`project_calibration`, read once) set each
concept's episode rule (:func:`calibrate_episodes`, see
:mod:`amygdala_dagster.readout.episode`) on the calibration texts without the
concept: its held-out negatives, or the ``--calibration-texts`` records not
labelled with it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from amygdala_dagster.engine.token_sample import SampleEntry, TokenSample
from amygdala_dagster.readout.episode import (
    DEFAULT_FALSE_ALARM_RATE,
    DEFAULT_HALF_LIFE_TOKENS,
    DEFAULT_MIN_TOKENS,
    calibrate_episode,
)
from amygdala_dagster.readout.folds import text_folds
from amygdala_dagster.readout.manifest import ReadoutMatrix
from amygdala_dagster.readout.runtime import DEFAULT_SKIP_FIRST_TOKENS, scored_positions

log = logging.getLogger(__name__)

DEFAULT_TARGET_RATE = 0.01
DEFAULT_FOLDS = 5
QUANTILES = ("0.5", "0.9", "0.99", "0.999")
#: A concept's held-out check is meaningful when it expects at least this many firing tokens.
MIN_EXPECTED_FIRES = 10
SOURCE_HOLDOUT = "holdout_negatives"
#: The calibration sample's source when it holds the graph's held-out texts (each concept uses its negatives).
SOURCE_HOLDOUT_TEXTS = "holdout_texts"


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


class TokenSource(Protocol):
    """Where per-token activations ``[T, L, H]`` are read by sequence key.

    The run's is a :class:`~amygdala_dagster.engine.token_cache.TokenCache`.
    """

    def get(self, key: str) -> np.ndarray: ...


@dataclass
class CalibrationProjections:
    """Per concept and layer, the projections of each calibration text's scored tokens (read once, shared by
    the token calibration and the episode rule): ``per[(ci, li)][j]`` belongs to ``entries[ci][j]``, whose
    cross-fitting fold is set by ``fold_keys[ci][j]`` (copies of one token sequence share a fold)."""

    concepts: list[str]
    layers: list[int]
    skip_first_tokens: int
    per: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)
    entries: dict[int, list[SampleEntry]] = field(default_factory=dict)
    fold_keys: dict[int, list[str]] = field(default_factory=dict)


def project_calibration(
    readout: ReadoutMatrix, entries_by_concept: Mapping[str, Sequence[SampleEntry]], tokens: TokenSource, *,
    hidden_layers: Sequence[int], skip_first_tokens: int = DEFAULT_SKIP_FIRST_TOKENS,
) -> CalibrationProjections:
    """The calibration texts' per-token projections: each distinct sequence's activations (layers
    ``hidden_layers``, in order) are read from ``tokens`` once and projected on the rows of the concepts
    that use it -- no model involved."""
    concepts = list(readout.concepts)
    layers = [int(x) for x in readout.layers]
    hidden_layers = [int(x) for x in hidden_layers]
    missing_layers = [x for x in layers if x not in hidden_layers]
    if missing_layers:
        raise ValueError(f"the activations hold layers {hidden_layers}, not the readout's {missing_layers}")
    uses: dict[str, list[tuple[int, SampleEntry]]] = {}
    for ci, concept in enumerate(concepts):
        for entry in entries_by_concept.get(concept, ()):
            uses.setdefault(entry.key, []).append((ci, entry))
    out = CalibrationProjections(concepts, layers, int(skip_first_tokens))
    rows = {layer: np.asarray(readout.vectors[layer], np.float64) for layer in layers}
    positions = [hidden_layers.index(layer) for layer in layers]
    for key, used in uses.items():
        first = used[0][1]
        hidden = tokens.get(key)
        h = hidden[scored_positions(first.special, skip_first_tokens)]  # [T', L, H]
        cis = sorted({ci for ci, _ in used})
        column = {ci: j for j, ci in enumerate(cis)}
        for li, layer in enumerate(layers):
            proj = h[:, positions[li], :].astype(np.float64) @ rows[layer][cis].T
            for ci, _ in used:
                out.per.setdefault((ci, li), []).append(proj[:, column[ci]])
        for ci, entry in used:  # each record keeps its own labels; copies of a sequence share a fold
            out.entries.setdefault(ci, []).append(entry)
            out.fold_keys.setdefault(ci, []).append(first.id)
    return out


def _source(source: str | Mapping[str, str], concept: str) -> str:
    return source if isinstance(source, str) else source.get(concept, SOURCE_HOLDOUT)


def calibrate_readout(
    readout: ReadoutMatrix,
    entries_by_concept: Mapping[str, Sequence[SampleEntry]],
    tokens: TokenSource,
    *,
    hidden_layers: Sequence[int],
    source: str | Mapping[str, str] = SOURCE_HOLDOUT,
    skip_first_tokens: int = DEFAULT_SKIP_FIRST_TOKENS,
    target_rate: float = DEFAULT_TARGET_RATE,
    n_folds: int = DEFAULT_FOLDS,
    projections: CalibrationProjections | None = None,
) -> dict[str, dict[int, dict[str, Any] | None]]:
    """``{concept: {layer: token_calibration}}`` for every concept and layer of ``readout``.

    ``entries_by_concept[c]`` lists concept ``c``'s calibration inputs (entries of the calibration
    :class:`~amygdala_dagster.engine.token_sample.TokenSample`), projected by :func:`project_calibration`
    (or given as ``projections``). ``source`` (one string, or one per concept) is recorded in each entry.
    """
    if projections is None:
        projections = project_calibration(readout, entries_by_concept, tokens, hidden_layers=hidden_layers,
                                          skip_first_tokens=skip_first_tokens)
    out: dict[str, dict[int, dict[str, Any] | None]] = {}
    for ci, concept in enumerate(projections.concepts):
        entries = projections.entries.get(ci, [])
        out[concept] = {}
        for li, layer in enumerate(projections.layers):
            cal = calibrate_tokens(projections.per.get((ci, li), []), projections.fold_keys.get(ci, []),
                                   source=_source(source, concept), skip_first_tokens=projections.skip_first_tokens,
                                   target_rate=target_rate, n_folds=n_folds)
            if cal is not None:
                cal["n_truncated_texts"] = sum(int(e.truncated) for e in entries)
            out[concept][layer] = cal
    return out


def calibrate_episodes(
    projections: CalibrationProjections,
    token_calibration: Mapping[str, Mapping[int, Mapping[str, Any] | None]] | None = None,
    *,
    source: str | Mapping[str, str] = SOURCE_HOLDOUT,
    half_life_tokens: float | None = DEFAULT_HALF_LIFE_TOKENS,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    n_folds: int = DEFAULT_FOLDS,
) -> dict[str, dict[int, dict[str, Any] | None]]:
    """``{concept: {layer: episode}}``: each concept's episode rule on its calibration texts that are not
    labelled with it (a ``--calibration-texts`` record with ``"emotions"`` naming the concept is an episode
    *with* it; records without labels count as episodes without every concept)."""
    out: dict[str, dict[int, dict[str, Any] | None]] = {}
    for ci, concept in enumerate(projections.concepts):
        entries = projections.entries.get(ci, [])
        fold_keys = projections.fold_keys.get(ci, [])
        keep = [j for j, e in enumerate(entries) if concept not in (e.emotions or ())]
        out[concept] = {}
        for li, layer in enumerate(projections.layers):
            values = projections.per.get((ci, li), [])
            rule = calibrate_episode(
                [values[j] for j in keep], [fold_keys[j] for j in keep], source=_source(source, concept),
                skip_first_tokens=projections.skip_first_tokens, half_life_tokens=half_life_tokens,
                min_tokens=min_tokens, false_alarm_rate=false_alarm_rate, n_folds=n_folds,
                token_calibration=(token_calibration or {}).get(concept, {}).get(layer))
            if rule is not None:
                rule["n_labelled_left_out"] = len(entries) - len(keep)
            out[concept][layer] = rule
        if keep and all(r is None for r in out[concept].values()):
            log.warning("%s: none of its %d calibration episodes has %d scored tokens; no episode rule (give longer "
                        "--calibration-texts or lower the evaluation resource's episode_min_tokens)",
                        concept, len(keep), min_tokens)
    return out


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


def calibration_entries(sample: TokenSample, example_sets: Mapping[str, Any], concepts: Sequence[str]
                        ) -> tuple[dict[str, list[SampleEntry]], dict[str, str]]:
    """``(entries_by_concept, source_by_concept)`` from the calibration sample: every entry for every concept
    when it holds ``--calibration-texts`` records, else each concept's held-out negatives among the
    sample's held-out texts (a concept with none in the sample gets no token calibration, with a warning)."""
    if sample.source != SOURCE_HOLDOUT_TEXTS:
        return {c: list(sample.entries) for c in concepts}, {c: sample.source for c in concepts}
    by_id = {e.id: e for e in sample.entries}
    entries: dict[str, list[SampleEntry]] = {}
    for c in concepts:
        wanted = [by_id[ex.key] for ex in example_sets[c].holdout_negatives if ex.key in by_id]
        if not wanted:
            log.warning("%s: none of its held-out negatives is in the calibration sample (%d texts); no token "
                        "calibration (raise --calibration-tokens or give --calibration-texts)", c, len(by_id))
        entries[c] = wanted
    return entries, {c: SOURCE_HOLDOUT for c in concepts}
