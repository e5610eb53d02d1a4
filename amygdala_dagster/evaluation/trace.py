"""Per-token traces of the readout over conversations: JSON records and a self-contained HTML page.

A trace record holds, for one input and one layer, every concept's raw and
calibrated per-token scores, where each concept fired (a scored token whose
raw projection reaches the token threshold, as the runtime decides), the
episode rule over the input (its statistic at every token, ``score`` at the
end and where it first fired; manifests of format 3) and a top-k of the
concepts most active in it (the episode rule fired first, then the token
threshold, then by the highest short moving average of the calibrated
score), which is all the page shows so that it stays legible with hundreds
of concepts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from amygdala_dagster.engine.inputs import Encoded
from amygdala_dagster.evaluation.html import number, render
from amygdala_dagster.readout.manifest import calibration_entry
from amygdala_dagster.readout.metrics import z_score
from amygdala_dagster.readout.runtime import TokenScores, calibrated_scores

TRACE_FORMAT = "amygdala-trace/1"
DEFAULT_TOP_K = 5
#: Tokens in the moving average that ranks concepts (and gives the conversations' token-level score).
SMOOTH_WINDOW = 5


def moving_average(values: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Trailing moving average over ``window`` values (fewer at the start); empty stays empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return cast(np.ndarray, (c[idx] - c[lo]) / (idx - lo))


def thresholds(manifest: Mapping[str, Any], layer: int) -> tuple[str, dict[str, dict[str, float | None] | None]]:
    """``(kind, {concept: {"raw", "z", "neg_mean", "neg_std"}})``: the token calibration's thresholds, or
    for a format-1 manifest (no token calibration) the text-level ones (``kind`` says which)."""
    kind = "token"
    if all(calibration_entry(manifest, c, layer, "token") is None for c in manifest["concepts"]):
        kind = "text"
    out: dict[str, dict[str, float | None] | None] = {}
    for c in manifest["concepts"]:
        cal = calibration_entry(manifest, c, layer, kind)
        if not cal or cal.get("threshold") is None or cal.get("neg_mean") is None:
            out[c] = None
            continue
        z = float(z_score(cal["threshold"], cal["neg_mean"], cal["neg_std"]))  # NaN for a zero spread
        out[c] = {"raw": float(cal["threshold"]), "z": z if math.isfinite(z) else None,
                  "neg_mean": float(cal["neg_mean"]), "neg_std": float(cal["neg_std"])}
    return kind, out


def _runs(mask: np.ndarray) -> int:
    best = cur = 0
    for m in mask:
        cur = cur + 1 if m else 0
        best = max(best, cur)
    return best


def concept_summary(raw: np.ndarray, z: np.ndarray, scored: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Where one concept fired in one input: first position, how many tokens, longest run, peaks."""
    zs = np.where(scored, z, np.nan)
    smooth = moving_average(z[scored]) if scored.any() else np.zeros(0)
    fired = scored & (raw >= threshold) if threshold is not None else np.zeros_like(scored)
    pos = np.flatnonzero(fired)
    return {
        "fired": bool(pos.size),
        "first": int(pos[0]) if pos.size else None,
        "n_fired": int(pos.size),
        "longest_run": _runs(fired),
        "max_z": float(np.nanmax(zs)) if scored.any() and np.isfinite(zs).any() else None,
        "max_smoothed_z": float(smooth.max()) if smooth.size and np.isfinite(smooth).any() else None,
        "max_raw": float(raw[scored].max()) if scored.any() else None,
    }


def _rank_key(s: Mapping[str, Any], episode: Mapping[str, Any] | None) -> tuple[Any, ...]:
    sm = s["max_smoothed_z"]
    return (not (episode or {}).get("fired"), not s["fired"], -(s["n_fired"]),
            -(sm if sm is not None and math.isfinite(sm) else -1e9))


def episode_rules(manifest: Mapping[str, Any], layer: int) -> dict[str, dict[str, Any] | None]:
    """``{concept: {"threshold", "threshold_z", "false_alarm_rate", "half_life_tokens", "min_tokens"} | None}``:
    the manifest's episode rules at ``layer`` (None for a concept without one, every concept before format 3)."""
    out: dict[str, dict[str, Any] | None] = {}
    for c in manifest["concepts"]:
        e = calibration_entry(manifest, c, layer, "episode")
        out[c] = None if not e or e.get("threshold") is None else {
            k: e.get(k) for k in ("threshold", "threshold_z", "false_alarm_rate", "half_life_tokens", "min_tokens")}
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _episode(scores: Any, layer: int, manifest: Mapping[str, Any]) -> tuple[dict[str, Any], np.ndarray | None]:
    """Per concept ``{"score", "score_z", "fired", "first", "peak"}`` (None without a rule; ``score`` null
    when no token was scored) and the statistic in z units ``[T, C]`` (None without any rule at ``layer``)."""
    trace = (getattr(scores, "episode", None) or {}).get(int(layer))
    if trace is None:
        return {c: None for c in scores.concepts}, None
    rules = episode_rules(manifest, layer)
    stat_z = calibrated_scores(trace.stat, manifest, layer, "token")
    end_z = calibrated_scores(trace.score[None, :], manifest, layer, "token")[0]
    out: dict[str, Any] = {}
    for ci, c in enumerate(scores.concepts):
        out[c] = None if rules[c] is None else {
            "score": _finite_or_none(trace.score[ci]), "score_z": _finite_or_none(end_z[ci]),
            "fired": bool(trace.fired[ci]), "first": int(trace.first[ci]) if trace.fired[ci] else None,
            "peak": _finite_or_none(trace.peak[ci])}
    return out, stat_z


def trace_record(scores: TokenScores, layer: int, manifest: Mapping[str, Any], *, top_k: int = DEFAULT_TOP_K,
                 concepts: Sequence[str] | None = None, digits: int = 4) -> dict[str, Any]:
    """The JSON record of one :class:`~amygdala_dagster.readout.runtime.TokenScores` at ``layer``."""
    kind, thr = thresholds(manifest, layer)
    raw = scores.raw[layer]
    z = scores.calibrated[layer] if kind == "token" else _text_z(raw, manifest, layer)
    scored = scores.scored
    summary = {}
    for ci, c in enumerate(scores.concepts):
        t = thr.get(c)
        summary[c] = concept_summary(raw[:, ci], z[:, ci], scored, t["raw"] if t else None)
    episode, stat_z = _episode(scores, layer, manifest)
    if concepts:
        unknown = [c for c in concepts if c not in scores.concepts]
        if unknown:
            raise ValueError(f"unknown concept(s) {', '.join(unknown)}; the manifest has {', '.join(scores.concepts)}")
        top = list(concepts)
    else:
        top = sorted(scores.concepts, key=lambda c: (_rank_key(summary[c], episode[c]), c))[:top_k]

    def arr(x: np.ndarray) -> list[float | None]:
        return [round(float(v), digits) if math.isfinite(v) else None for v in x]

    return {
        "id": scores.id,
        "layer": int(layer),
        "calibration": kind,
        "tokens": list(scores.encoded.pieces or scores.encoded.tokens),
        "token_ids": list(scores.encoded.ids),
        "special": [bool(x) for x in scores.encoded.special],
        "scored": [bool(x) for x in scored],
        "top": top,
        "fired": [c for c in scores.concepts if summary[c]["fired"]],
        "summary": summary,
        "raw": {c: arr(raw[:, ci]) for ci, c in enumerate(scores.concepts)},
        "z": {c: arr(z[:, ci]) for ci, c in enumerate(scores.concepts)},
        "episode": episode,
        "episode_fired": [c for c in scores.concepts if (episode[c] or {}).get("fired")],
        "episode_z": ({c: arr(stat_z[:, ci]) for ci, c in enumerate(scores.concepts)} if stat_z is not None
                      else None),
    }


def _text_z(raw: np.ndarray, manifest: Mapping[str, Any], layer: int) -> np.ndarray:
    return calibrated_scores(raw, manifest, layer, "text")


# ----------------------------------------------------------------------------- HTML
_PALETTE = ["#c0392b", "#2471a3", "#229954", "#8e44ad", "#d68910", "#17a589", "#7f8c8d", "#a04000"]


def plot_view(z: Sequence[float | None], scored: Sequence[bool], thr: float | None, name: str, color: str,
              fired: Sequence[int], episode: Sequence[float | None] | None = None, episode_thr: float | None = None,
              episode_first: int | None = None) -> dict[str, Any]:
    """Geometry of one concept's SVG line plot (calibrated z over token position) with, when the manifest
    has an episode rule, its statistic, its threshold and where it first fired; for ``_conversation.html.j2``."""
    w, h, pad, top = 360, 120, 26, 22  # the title sits above the plotted range, never over the line
    pts = [(i, v) for i, (v, ok) in enumerate(zip(z, scored)) if ok and v is not None]
    ep = [(i, v) for i, v in enumerate(episode or []) if v is not None]
    n = max(len(z) - 1, 1)
    vals = [v for _, v in pts] + [v for _, v in ep] + ([thr] if thr is not None else []) + \
        ([episode_thr] if episode_thr is not None else []) + [0.0]
    lo, hi = min(vals), max(vals)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def x(i: float) -> float:
        return pad + (w - pad - 6) * i / n

    def y(v: float) -> float:
        return top + (h - top - 18) * (hi - v) / (hi - lo)

    return {
        "w": w, "h": h, "pad": pad, "right": w - 6, "name": name, "color": color, "y_zero": f"{y(0):.1f}",
        "threshold": {"y": f"{y(thr):.1f}", "z": f"{thr:.2f}"} if thr is not None else None,
        "points": " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts),
        "dots": [(f"{x(i):.1f}", f"{y(zi):.1f}") for i in fired[:200] if (zi := z[i]) is not None],
        "episode": " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in ep),
        "episode_threshold": {"y": f"{y(episode_thr):.1f}", "z": f"{episode_thr:.2f}"}
        if episode_thr is not None else None,
        "episode_first": {"x": f"{x(episode_first):.1f}", "at": episode_first} if episode_first is not None else None,
        "y_top": top, "y_bottom": h - 18,
        "last": len(z) - 1, "hi": f"{hi:.1f}", "lo": f"{lo:.1f}", "y_hi_label": f"{y(hi) + 8:.1f}",
        "y_lo": f"{y(lo):.1f}",
    }


def conversation_view(record: Mapping[str, Any], thr: Mapping[str, Mapping[str, float] | None], uid: str,
                      title: str | None = None, heading: str = "h2",
                      rules: Mapping[str, Mapping[str, Any] | None] | None = None) -> dict[str, Any]:
    """What one conversation's section shows (fired-concepts summary, token heatmap with a tooltip per
    token, per-concept plots), for the ``conversation`` macro of ``_conversation.html.j2``; ``rules`` are the
    episode rules (:func:`episode_rules`) of the record's layer."""
    top = list(record["top"])
    summ = record["summary"]
    episode = record.get("episode") or {}
    episode_z = record.get("episode_z") or {}
    rules = rules or {}
    rows = []
    for c in top:
        s, t, ep = summ[c], thr.get(c), episode.get(c)
        rows.append({"concept": c, "fired": s["fired"], "first": s["first"], "n_fired": s["n_fired"],
                     "longest_run": s["longest_run"], "max_z": s["max_z"], "max_smoothed_z": s["max_smoothed_z"],
                     "threshold_z": t["z"] if t else None, "has_rule": ep is not None,
                     "episode_fired": bool(ep and ep["fired"]), "episode_first": (ep or {}).get("first"),
                     "episode_score_z": (ep or {}).get("score_z"),
                     "episode_threshold_z": (rules.get(c) or {}).get("threshold_z")})
    tokens = []
    for i, piece in enumerate(record["tokens"]):
        tip = [f"#{i} {piece!r}" + ("" if record["scored"][i] else " (not scored)")]
        tip += [f"{c}: z={number(record['z'][c][i], 2)} raw={number(record['raw'][c][i], 3)}"
                + (f" episode z={number(episode_z[c][i], 2)}" if episode_z.get(c) else "") for c in top]
        cls = "sp" if record["special"][i] else ("un" if not record["scored"][i] else "")
        tokens.append({"piece": piece, "cls": cls, "tip": "\n".join(tip)})
    plots = []
    for k, c in enumerate(top):
        t = thr.get(c)
        hits = [i for i, (r, ok) in enumerate(zip(record["raw"][c], record["scored"]))
                if ok and t and r is not None and r >= t["raw"]]
        plots.append(plot_view(record["z"][c], record["scored"], t["z"] if t else None, c,
                               _PALETTE[k % len(_PALETTE)], hits, episode_z.get(c),
                               (rules.get(c) or {}).get("threshold_z"), (episode.get(c) or {}).get("first")))
    data = {"z": {c: record["z"][c] for c in top}, "raw": {c: record["raw"][c] for c in top},
            "scored": record["scored"], "thr": {c: (tc["z"] if (tc := thr.get(c)) else None) for c in top},
            "thrRaw": {c: (tc["raw"] if (tc := thr.get(c)) else None) for c in top}}
    return {"uid": uid, "title": title or record["id"], "heading": heading, "n_tokens": len(record["tokens"]),
            "n_scored": sum(record["scored"]), "layer": record["layer"], "fired": list(record["fired"]),
            "episode_fired": list(record.get("episode_fired") or []), "has_rules": bool(episode_z),
            "truncated": record.get("truncated"),
            "top": top, "rows": rows, "tokens": tokens, "plots": plots, "data": data}


def trace_page_view(trace: Mapping[str, Any]) -> dict[str, Any]:
    """What the trace page shows for a :func:`build_trace` result, for ``trace.html.j2``."""
    thr = trace["thresholds"]
    rules = trace.get("episode_rules") or {}
    fired_counts: dict[str, int] = {}
    episode_counts: dict[str, int] = {}
    for conv in trace["conversations"]:
        for c in conv["fired"]:
            fired_counts[c] = fired_counts.get(c, 0) + 1
        for c in conv.get("episode_fired") or []:
            episode_counts[c] = episode_counts.get(c, 0) + 1
    return {
        "model": trace.get("model"), "layer": trace["layer"], "n_concepts": len(trace["concepts"]),
        "n_inputs": len(trace["conversations"]),
        "n_truncated": sum(1 for conv in trace["conversations"] if conv.get("truncated")),
        "calibration": "per-token" if trace["calibration"] == "token"
        else "text-level (format 1 manifest: no token calibration)",
        "skip_first_tokens": trace.get("skip_first_tokens"),
        "fired_counts": sorted(fired_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40],
        "more_fired": len(fired_counts) > 40,
        "has_rules": any(r is not None for r in rules.values()),
        "episode_counts": sorted(episode_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40],
        "more_episodes": len(episode_counts) > 40,
        "conversations": [conversation_view(conv, thr, f"c{i}", rules=rules)
                          for i, conv in enumerate(trace["conversations"])],
    }


def render_trace_html(trace: Mapping[str, Any], title: str = "Readout trace") -> str:
    """The whole page for a :func:`build_trace` result (self-contained: inline CSS, JS, SVG)."""
    return render("trace.html.j2", title=title, page=trace_page_view(trace))


def build_trace(scores: Sequence[Any], layer: int, manifest: Mapping[str, Any], *, top_k: int = DEFAULT_TOP_K,
                concepts: Sequence[str] | None = None, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``trace.json`` content for several inputs' :class:`~amygdala_dagster.readout.runtime.TokenScores`:
    each input's :func:`trace_record` plus ``truncated`` (:func:`truncation`)."""
    kind, thr = thresholds(manifest, layer)
    skip = scores[0].skip_first_tokens if scores else None
    return {
        "format": TRACE_FORMAT, **dict(meta or {}), "layer": int(layer), "calibration": kind,
        "skip_first_tokens": skip, "concepts": list(manifest["concepts"]), "thresholds": thr,
        "episode_rules": episode_rules(manifest, layer),
        "conversations": [{**trace_record(s, layer, manifest, top_k=top_k, concepts=concepts),
                           "truncated": truncation(s.encoded)} for s in scores],
    }


def truncation(encoded: Encoded) -> dict[str, int] | None:
    """``{"tokens_total", "tokens_kept"}`` when ``max_tokens`` cut an input's
    :class:`~amygdala_dagster.readout.runtime.Encoded` (the trace shows only the kept tokens), else None."""
    if not encoded.truncated:
        return None
    return {"tokens_total": int(cast(int, encoded.n_tokens_total)), "tokens_kept": len(encoded.ids)}
