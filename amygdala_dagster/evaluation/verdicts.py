"""Verdicts: which readout vectors can be trusted (use / weak / do not use), and why.

:func:`judge` is the one source of flags: the report, the Dagster checks and
the metadata read its result, stored in the evaluation by
:func:`apply_verdicts`. It reads an :func:`~amygdala_dagster.evaluation.core.evaluate`
result: held-out AUROC and interval, holdout size, trivial baselines,
cross-talk and, when present, the runtime section on labelled conversations
(per token, and the episode rule).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VERDICTS = ("do_not_use", "weak", "use")  # most attention first


@dataclass(frozen=True)
class Criteria:
    """What makes a vector usable: the thresholds of :func:`judge` (and of the Dagster checks)."""

    min_auroc: float = 0.7
    min_holdout_positives: int = 10
    confound_margin: float = 0.0
    max_crosstalk_cosine: float = 0.8
    max_fire_rate_without: float = 0.5
    #: The episode rule on labelled conversations: its score's AUROC below this is 'weak';
    min_episode_auroc: float = 0.7
    #: its false-alarm rate above this (None: the rule's own target rate), beyond the 95% interval, is 'weak';
    max_episode_false_alarm_rate: float | None = None
    #: its hit rate below this, beyond the 95% interval, is 'weak'.
    min_episode_hit_rate: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


#: Every kind of flag :func:`judge` raises (each is shown by one Dagster check).
FLAG_KINDS = ("not_evaluable", "below_min_auroc", "small_holdout", "wide_interval", "confound", "crosstalk",
              "conversation_auroc", "conversation_fires", "episode_auroc", "episode_false_alarms", "episode_hits")


def _flag(emotion: str, kind: str, severity: str, message: str) -> dict[str, str]:
    assert kind in FLAG_KINDS, kind
    return {"emotion": emotion, "kind": kind, "severity": severity, "message": f"{emotion}: {message}"}


def _emotion_flags(evaluation: Mapping[str, Any], emotion: str, criteria: Criteria,
                   partners: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    res = evaluation["emotions"][emotion]
    best = res.get("best_layer")
    auc = _num(res.get("best_auroc"))
    flags = []
    if not math.isfinite(auc):
        flags.append(_flag(emotion, "not_evaluable", "do_not_use",
                           "the holdout lacks positives or negatives; no held-out AUROC"))
        entry: Mapping[str, Any] = {}
    else:
        entry = res["layers"][str(best)]
        ci = entry.get("auroc_ci")
        ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        n_pos = int(entry.get("n_pos") or 0)
        if auc < criteria.min_auroc:
            flags.append(_flag(emotion, "below_min_auroc", "do_not_use",
                               f"best held-out AUROC {auc:.3f}{ci_text} (layer {best}) below {criteria.min_auroc}"))
        base = res["confounds"]["baseline_auroc"]
        scored = {k: _num(v) for k, v in base.items() if math.isfinite(_num(v))}
        if scored:
            which = max(scored, key=lambda k: scored[k])
            if auc <= scored[which] + criteria.confound_margin:
                flags.append(_flag(
                    emotion, "confound", "do_not_use",
                    f"best held-out AUROC {auc:.3f} (layer {best}) is no better than the trivial "
                    f"{which.replace('_', ' ')} baseline ({scored[which]:.3f})"))
        if n_pos < criteria.min_holdout_positives:
            flags.append(_flag(emotion, "small_holdout", "weak",
                               f"only {n_pos} held-out positive(s) (fewer than {criteria.min_holdout_positives}): "
                               + (f"AUROC {auc:.3f}{ci_text} is not reliable" if auc >= criteria.min_auroc
                                  else "the AUROC is not reliable")))
        elif ci and auc >= criteria.min_auroc and ci[0] < criteria.min_auroc:
            flags.append(_flag(emotion, "wide_interval", "weak",
                               f"the 95% interval of the held-out AUROC{ci_text} reaches below {criteria.min_auroc}"))
    for p in partners:
        co = p.get("cooccurrence")
        flags.append(_flag(
            emotion, "crosstalk", "weak",
            f"its vector is close to {p['other']}'s (cosine {p['cosine']:.2f} at layer {p['layer']}"
            + (f"; their tags co-occur, r = {co:.2f}" if co is not None and math.isfinite(co) else "")
            + "): it may read both"))
    conv = ((evaluation.get("conversations") or {}).get("per_emotion") or {}).get(emotion)
    if conv:
        for key, label in (("text_auroc", "text-level"), ("token_auroc", "per-token")):
            v = _num(conv.get(key))
            if math.isfinite(v) and v < criteria.min_auroc:
                flags.append(_flag(emotion, "conversation_auroc", "weak",
                                   f"{label} AUROC on conversations {v:.3f} below {criteria.min_auroc} "
                                   f"({conv.get('n_with', '?')} with / {conv.get('n_without', '?')} without)"))
        rate = _num(conv.get("fire_rate_without"))
        if math.isfinite(rate) and rate > criteria.max_fire_rate_without:
            flags.append(_flag(emotion, "conversation_fires", "do_not_use",
                               f"fires on {rate:.0%} of conversations without it "
                               f"(more than {criteria.max_fire_rate_without:.0%})"))
        flags += _episode_flags(emotion, conv.get("episode") or {}, criteria)
    return flags


def _interval(ci: Sequence[float] | None, digits: int = 0) -> str:
    return f" [{ci[0]:.{digits}%}, {ci[1]:.{digits}%}]" if ci else ""


def _episode_flags(emotion: str, ep: Mapping[str, Any], criteria: Criteria) -> list[dict[str, str]]:
    """Flags of the episode rule on labelled conversations. The rates are flagged only when their 95% interval
    lies beyond the criterion, so that a handful of conversations cannot flag a rule by chance."""
    flags = []
    auc = _num(ep.get("auroc"))
    if math.isfinite(auc) and auc < criteria.min_episode_auroc:
        ci = ep.get("auroc_ci")
        flags.append(_flag(emotion, "episode_auroc", "weak",
                           f"episode rule's score has AUROC {auc:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                           + f" on conversations, below {criteria.min_episode_auroc}"))
    far, ci = _num(ep.get("false_alarm_rate")), ep.get("false_alarm_ci")
    limit = criteria.max_episode_false_alarm_rate
    limit = _num(ep.get("target_rate")) if limit is None else float(limit)
    if math.isfinite(far) and math.isfinite(limit) and ci and ci[0] > limit:
        flags.append(_flag(emotion, "episode_false_alarms", "weak",
                           f"episode rule fires on {ep.get('n_fired_without')} of {ep.get('n_without')} conversations "
                           f"without it ({far:.0%}{_interval(ci)}), above {limit:.0%}"))
    hit, ci = _num(ep.get("hit_rate")), ep.get("hit_ci")
    if math.isfinite(hit) and ci and ci[1] < criteria.min_episode_hit_rate:
        flags.append(_flag(emotion, "episode_hits", "weak",
                           f"episode rule fires on only {ep.get('n_fired_with')} of {ep.get('n_with')} conversations "
                           f"with it ({hit:.0%}{_interval(ci)}), below {criteria.min_episode_hit_rate:.0%}"))
    return flags


def _crosstalk_partners(evaluation: Mapping[str, Any], criteria: Criteria) -> dict[str, list[dict[str, Any]]]:
    """Per emotion, the other emotions whose vector is within ``max_crosstalk_cosine`` at its best layer."""
    ct = evaluation.get("crosstalk") or {}
    concepts = list(ct.get("concepts") or [])
    out: dict[str, list[dict[str, Any]]] = {e: [] for e in evaluation["emotions"]}
    if not concepts:
        return out
    co = ct.get("cooccurrence")
    for i, e in enumerate(concepts):
        if e not in out:
            continue
        layer = evaluation["emotions"][e].get("best_layer")
        if layer is None:
            continue
        row = np.array([_num(x) for x in ct["cosine"][str(layer)][i]])
        row[i] = -np.inf
        for j in np.flatnonzero(row >= criteria.max_crosstalk_cosine):
            out[e].append({"other": concepts[j], "layer": int(layer), "cosine": float(row[j]),
                           "cooccurrence": _num(co[i][j]) if co is not None else None})
        out[e].sort(key=lambda p: -p["cosine"])
    return out


def attention_order(evaluation: Mapping[str, Any]) -> list[str]:
    """Emotions ordered by what needs attention: verdict (do not use, weak, use), then lowest AUROC."""
    verdicts = evaluation["verdicts"]

    def key(e: str) -> tuple[int, float, str]:
        auc = _num(evaluation["emotions"][e].get("best_auroc"))
        return VERDICTS.index(verdicts[e]["verdict"]), auc if math.isfinite(auc) else -1.0, e

    return sorted(evaluation["emotions"], key=key)


def judge(evaluation: Mapping[str, Any], criteria: Criteria | None = None) -> dict[str, Any]:
    """Verdict per emotion (``use`` / ``weak`` / ``do_not_use``) with its reasons, and every flag.

    The one source of truth for flags: the report, the Dagster checks and the
    metadata read its result (stored in the evaluation by :func:`apply_verdicts`).
    Uses held-out AUROC and interval, holdout size, the trivial baselines,
    cross-talk at the emotion's best layer, and, when present,
    ``evaluation["conversations"]["per_emotion"][emotion]`` (``text_auroc``,
    ``token_auroc``, ``fire_rate_without``, ``n_with``, ``n_without``, and the
    episode rule's ``episode``: ``auroc``, ``false_alarm_rate``, ``hit_rate`` with
    their intervals).
    Returns ``{"verdicts": {emotion: {"verdict", "reasons", "flags"}}, "flags": [...]}``.
    """
    if criteria is None:
        stored = (evaluation.get("settings") or {}).get("criteria")
        criteria = Criteria(**stored) if stored else Criteria()
    partners = _crosstalk_partners(evaluation, criteria)
    verdicts: dict[str, Any] = {}
    flags_of: dict[str, list[dict[str, str]]] = {}
    for emotion, res in evaluation["emotions"].items():
        flags = flags_of[emotion] = _emotion_flags(evaluation, emotion, criteria, partners[emotion])
        severities = {f["severity"] for f in flags}
        verdict = next((v for v in VERDICTS if v in severities), "use")
        if flags:
            reasons = [f["message"].split(": ", 1)[1] for f in flags]
        else:
            entry = res["layers"][str(res["best_layer"])]
            ci = entry.get("auroc_ci")
            reasons = [f"held-out AUROC {res['best_auroc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                       + f" at layer {res['best_layer']} on {entry['n_pos']} positives / {entry['n_neg']} negatives"]
        verdicts[emotion] = {"verdict": verdict, "reasons": reasons, "flags": sorted({f["kind"] for f in flags})}
    order = attention_order({"emotions": evaluation["emotions"], "verdicts": verdicts})
    return {"verdicts": {e: verdicts[e] for e in order}, "flags": [f for e in order for f in flags_of[e]],
            "criteria": criteria.to_dict()}


def apply_verdicts(evaluation: dict[str, Any], criteria: Criteria | None = None) -> dict[str, Any]:
    """Store :func:`judge`'s verdicts, flags and their counts in ``evaluation`` (in place; returned).

    Call it again after adding ``evaluation["conversations"]``.
    """
    j = judge(evaluation, criteria)
    evaluation.setdefault("settings", {})["criteria"] = j["criteria"]
    evaluation["verdicts"] = j["verdicts"]
    evaluation["flags"] = j["flags"]
    counts = Counter(v["verdict"] for v in j["verdicts"].values())
    aucs = {e: _num(r.get("best_auroc")) for e, r in evaluation["emotions"].items()}
    scored = {e: a for e, a in aucs.items() if math.isfinite(a)}
    worst = min(scored, key=lambda e: scored[e]) if scored else None
    evaluation.setdefault("summary", {}).update({
        "verdict_counts": {v: counts.get(v, 0) for v in VERDICTS},
        "n_flagged": sum(1 for v in j["verdicts"].values() if v["flags"]),
        "mean_best_auroc": float(np.mean(list(scored.values()))) if scored else None,
        "worst_best_auroc": scored[worst] if worst else None,
        "worst_emotion": worst,
        "n_not_evaluable": len(aucs) - len(scored),
    })
    return evaluation


def log_unusable(evaluation: Mapping[str, Any]) -> None:
    """One warning per emotion whose verdict is "do not use", with its reasons (call it once, after the
    last :func:`apply_verdicts`, so the log says what the report and the checks say)."""
    for emotion, v in evaluation["verdicts"].items():
        if v["verdict"] == "do_not_use":
            log.warning("evaluation: %s: do not use: %s", emotion, "; ".join(v["reasons"]))
