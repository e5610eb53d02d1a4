"""Evaluation on labelled conversations, read per token as the runtime reads them.

For each emotion of the readout, over conversations labelled with the
emotions they carry (``{"id", "text" | "messages", "emotions": [...]}``):

- ``text_auroc``: AUROC of the text-level score (the projection of the
  mean-pooled activation, what training and the text calibration see);
- ``token_auroc``: AUROC of the token-level score, the maximum over scored
  positions of a short trailing moving average of the calibrated per-token
  score (one loud token does not decide it);
- ``fire_rate_without``: share of conversations *without* the emotion in
  which the runtime's token threshold fires at least once;
- ``fire_rate_with``, ``first_fire_median``: the same on conversations with
  it, and the median token position of the first firing there;
- ``n_with``, ``n_without``;
- ``episode``: the manifest's episode rule (format 3) over each conversation,
  token by token as the runtime applies it: ``false_alarm_rate`` (share of
  conversations without the emotion where the rule fired) and ``hit_rate``
  (with it), each with a 95% Wilson interval, ``auroc`` of the rule's score
  (its statistic at the end of the conversation) with a bootstrap interval
  (:func:`~amygdala_dagster.readout.metrics.bootstrap_auroc_ci`), the rule's
  ``target_rate`` and ``threshold_z``, and ``first_fire_median``; null for a
  manifest without episode rules.

Stored as ``evaluation["conversations"]["per_emotion"][emotion]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from amygdala_dagster.engine.token_sample import TokenSample
from amygdala_dagster.evaluation.trace import SMOOTH_WINDOW, episode_rules, moving_average, thresholds, trace_record
from amygdala_dagster.files.jsonio import jsonable
from amygdala_dagster.readout import metrics as M
from amygdala_dagster.readout.manifest import CalibratedReadout, calibration_entry
from amygdala_dagster.readout.runtime import TokenScores, manifest_skip_first_tokens, scores_from_hidden
from amygdala_dagster.readout.token_calibration import TokenSource

log = logging.getLogger(__name__)

#: How many conversations the report shows as traces.
N_TRACES = 3


def sample_scores(sample: TokenSample, tokens: TokenSource, readout: CalibratedReadout,
                  hidden_layers: Sequence[int]) -> list[TokenScores]:
    """Per-token scores of every conversation of ``sample``, from their stored per-token activations."""
    skip = manifest_skip_first_tokens(readout.manifest)
    return [scores_from_hidden(e.encoded(), tokens.get(e.key), readout, hidden_layers, skip, e.id)
            for e in sample.entries]


def _text_score(s: TokenScores, layer: int, ci: int, pooling: str) -> float:
    raw = s.raw[layer][:, ci]
    return float(raw[-1] if pooling == "last" else raw.mean())


def _token_score(s: TokenScores, layer: int, ci: int, window: int) -> float:
    z = s.calibrated[layer][s.scored, ci]
    if z.size == 0:
        return math.nan
    if not np.isfinite(z).all():  # no token calibration (format 1): rank by raw projections
        z = s.raw[layer][s.scored, ci]
    return float(moving_average(z, window).max())


def _first_fire(s: TokenScores, layer: int, ci: int, threshold: float | None) -> int | None:
    if threshold is None:
        return None
    hits = np.flatnonzero(s.scored & (s.raw[layer][:, ci] >= threshold))
    return int(hits[0]) if hits.size else None


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def episode_metrics(scores: Sequence[TokenScores], has: np.ndarray, layer: int, ci: int,
                    rule: Mapping[str, Any] | None, *, bootstrap: int = 200, seed: int = 0) -> dict[str, Any] | None:
    """The episode rule of concept ``ci`` at ``layer`` on labelled conversations (``has[i]``: conversation
    ``i`` carries the emotion); None when the manifest has no rule for it."""
    found = [s.episode.get(layer) for s in scores]
    traces = [t for t in found if t is not None]
    if rule is None or rule.get("threshold") is None or len(traces) != len(found):
        return None
    fired = np.array([bool(t.fired[ci]) for t in traces])
    score = np.array([float(t.score[ci]) for t in traces])
    first = [int(t.first[ci]) for t, h in zip(traces, has) if h and t.fired[ci]]
    ok = np.isfinite(score)
    pos, neg = score[has & ok], score[~has & ok]
    auc = M.auroc(pos, neg) if pos.size and neg.size else math.nan
    auc_ci = M.bootstrap_auroc_ci(pos, neg, n_boot=bootstrap, seed=seed) if math.isfinite(auc) else None
    n_with, n_without = int(has.sum()), int((~has).sum())
    k_with, k_without = int(fired[has].sum()), int(fired[~has].sum())
    return {
        "target_rate": rule.get("false_alarm_rate"), "threshold_z": rule.get("threshold_z"),
        "half_life_tokens": rule.get("half_life_tokens"), "min_tokens": rule.get("min_tokens"),
        "source": rule.get("source"),
        "n_with": n_with, "n_without": n_without, "n_fired_with": k_with, "n_fired_without": k_without,
        "false_alarm_rate": k_without / n_without if n_without else None,
        "false_alarm_ci": M.wilson_interval(k_without, n_without),
        "hit_rate": k_with / n_with if n_with else None, "hit_ci": M.wilson_interval(k_with, n_with),
        "auroc": _finite(auc), "auroc_ci": list(auc_ci) if auc_ci is not None else None,
        "first_fire_median": float(np.median(first)) if first else None,
    }


def evaluate_conversations(
    scores: Sequence[TokenScores], labelled: Sequence[Sequence[str] | None], readout: CalibratedReadout, *,
    layer_for: Mapping[str, int | None] | None = None, window: int = SMOOTH_WINDOW, n_traces: int = N_TRACES,
    source: str | None = None, bootstrap: int = 200, seed: int = 0,
) -> dict[str, Any]:
    """The ``conversations`` section of the evaluation (see the module docstring), JSON-ready.

    ``layer_for[emotion]`` picks the layer per emotion (default: the
    readout's last); ``traces`` holds :func:`~amygdala_dagster.evaluation.trace.trace_record`
    records (trimmed to their shown concepts) of the first ``n_traces``
    labelled conversations.
    """
    manifest = readout.manifest
    pooling = str(manifest.get("pooling") or "mean")
    concepts = list(readout.concepts)
    labels = [set(x or ()) for x in labelled]
    unknown = sorted(set().union(*labels) - set(concepts)) if labels else []
    per_emotion: dict[str, Any] = {}
    thr_by_layer = {int(layer): thresholds(manifest, int(layer)) for layer in readout.layers}
    for ci, e in enumerate(concepts):
        best = (layer_for or {}).get(e)
        layer = int(readout.layers[-1] if best is None else best)
        kind, thr = thr_by_layer[layer]
        t = thr.get(e)
        threshold = t["raw"] if t else None
        has = np.array([e in lab for lab in labels], dtype=bool)
        text = np.array([_text_score(s, layer, ci, pooling) for s in scores])
        token = np.array([_token_score(s, layer, ci, window) for s in scores])
        first = [_first_fire(s, layer, ci, threshold) for s in scores]
        fires = np.array([f is not None for f in first], dtype=bool)
        ok = np.isfinite(token)
        with_first = [f for f, h in zip(first, has) if h and f is not None]
        per_emotion[e] = {
            "layer": layer,
            "calibration": kind,
            "n_with": int(has.sum()),
            "n_without": int((~has).sum()),
            "text_auroc": _finite(M.auroc(text[has], text[~has])),
            "token_auroc": _finite(M.auroc(token[has & ok], token[~has & ok])),
            "fire_rate_without": float(fires[~has].mean()) if (~has).any() and threshold is not None else None,
            "fire_rate_with": float(fires[has].mean()) if has.any() and threshold is not None else None,
            "first_fire_median": float(np.median(with_first)) if with_first else None,
            "episode": episode_metrics(scores, has, layer, ci, calibration_entry(manifest, e, layer, "episode"),
                                       bootstrap=bootstrap, seed=seed),
        }
    shown = [i for i, lab in enumerate(labels) if lab & set(concepts)][:n_traces]
    traces = []
    for i in shown:
        layer = int(readout.layers[-1])
        named = sorted(labels[i] & set(concepts))
        rec = trace_record(scores[i], layer, manifest, top_k=max(4, len(named)))
        top = list(dict.fromkeys([*named, *rec["top"]]))[: max(4, len(named))]
        rec.update(top=top, labels=sorted(labels[i]), raw={c: rec["raw"][c] for c in top},
                   z={c: rec["z"][c] for c in top}, summary={c: rec["summary"][c] for c in top},
                   episode={c: rec["episode"][c] for c in top},
                   episode_z={c: rec["episode_z"][c] for c in top} if rec["episode_z"] is not None else None)
        traces.append(rec)
    def mean(key: str) -> float | None:
        return _finite(np.mean([v[key] for v in per_emotion.values() if v[key] is not None]))

    episodes = [v["episode"] for v in per_emotion.values() if v.get("episode")]

    def ep_mean(key: str) -> float | None:
        vals = [x[key] for x in episodes if x[key] is not None]
        return _finite(np.mean(vals)) if vals else None
    return {
        "source": source,
        "n_conversations": len(labels),
        "window": int(window),
        "skip_first_tokens": manifest_skip_first_tokens(manifest),
        "unknown_labels": unknown,
        "per_emotion": per_emotion,
        "summary": {"mean_text_auroc": mean("text_auroc") if per_emotion else None,
                    "mean_token_auroc": mean("token_auroc") if per_emotion else None,
                    "mean_fire_rate_without": mean("fire_rate_without") if per_emotion else None,
                    "mean_episode_false_alarm_rate": ep_mean("false_alarm_rate"),
                    "mean_episode_hit_rate": ep_mean("hit_rate"), "mean_episode_auroc": ep_mean("auroc")},
        "thresholds": {str(layer): thr_by_layer[int(layer)][1] for layer in readout.layers},
        "episode_rules": {str(layer): episode_rules(manifest, int(layer)) for layer in readout.layers},
        "traces": traces,
    }


def conversations_section(sample: TokenSample, tokens: TokenSource, readout: CalibratedReadout,
                          hidden_layers: Sequence[int],
                          evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's ``conversations`` section (JSON-ready) for the labelled conversations of ``sample``,
    each emotion at its best held-out layer in ``evaluation``."""
    scores = sample_scores(sample, tokens, readout, hidden_layers)
    settings = evaluation.get("settings") or {}
    section = evaluate_conversations(scores, [e.emotions for e in sample.entries], readout,
                                     layer_for=best_layers(evaluation), source=sample.source.partition(":")[2] or None,
                                     bootstrap=int(settings.get("bootstrap", 200)), seed=int(settings.get("seed", 0)))
    section["sample"] = sample.summary()
    return cast("dict[str, Any]", jsonable(section, nonfinite_as_null=True))


def best_layers(evaluation: Mapping[str, Any]) -> dict[str, int | None]:
    """Each emotion's best held-out layer from an :func:`~amygdala_dagster.evaluation.core.evaluate` result."""
    return {e: r.get("best_layer") for e, r in (evaluation.get("emotions") or {}).items()}
