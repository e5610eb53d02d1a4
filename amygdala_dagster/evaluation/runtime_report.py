"""The report's runtime section: how the readout behaves per token, and its episode rule, on labelled conversations.

The section's data (rendered by ``templates/_runtime.html.j2``), Markdown and
PNG plots from ``evaluation["conversations"]``
(:func:`amygdala_dagster.evaluation.conversations.evaluate_conversations`); the
report embeds them with one call each, and shows nothing when the evaluation
has no conversations.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from amygdala_dagster.evaluation.html import render_macro
from amygdala_dagster.evaluation.trace import conversation_view

PLOT = "runtime_conversations.png"
#: Above this many emotions the plot is a scatter (one point each) instead of labelled bars.
MAX_BARS = 40


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def runtime_plots(evaluation: Mapping[str, Any]) -> dict[str, bytes]:
    """``{file name: PNG}``: per emotion, text vs token AUROC and the firing rate without the emotion."""
    conv = evaluation.get("conversations")
    if not conv or not conv.get("per_emotion"):
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = conv["per_emotion"]
    names = list(per)
    def nan(v: float | None) -> float:
        return float("nan") if v is None else v

    if len(names) > MAX_BARS:
        return {PLOT: _scatter_png(plt, per, nan)}
    episodes = any(per[n].get("episode") for n in names)
    width = max(8.0, 0.55 * len(names) + 3) * (1.5 if episodes else 1)
    fig, axes = plt.subplots(1, 3 if episodes else 2, figsize=(width, 3.6), dpi=100)
    a1, a2 = axes[0], axes[1]
    xs = range(len(names))
    bw = 0.27 if episodes else 0.4
    a1.bar([x - bw for x in xs] if episodes else [x - 0.2 for x in xs], [nan(per[n]["text_auroc"]) for n in names],
           width=bw, label="text level")
    a1.bar(list(xs) if episodes else [x + 0.2 for x in xs], [nan(per[n]["token_auroc"]) for n in names], width=bw,
           label="per token (max MA)")
    if episodes:
        a1.bar([x + bw for x in xs], [nan(_ep(per[n], "auroc")) for n in names], width=bw, label="episode score")
    a1.axhline(0.5, color="#999", lw=0.8, ls="--")
    # Head-room above 1 for the legends, which otherwise cover the first bars.
    a1.set_ylim(0, 1.25)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_title("AUROC on labelled conversations", fontsize=10)
    a1.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    a1.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    a2.bar(list(xs), [nan(per[n]["fire_rate_without"]) for n in names], color="#c0392b", label="without the emotion")
    a2.plot(list(xs), [nan(per[n]["fire_rate_with"]) for n in names], "o", color="#229954", label="with it")
    a2.set_ylim(0, 1.25)
    a2.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a2.set_title("conversations where the token threshold fires", fontsize=10)
    a2.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    a2.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    if episodes:
        a3 = axes[2]
        a3.bar([x - 0.2 for x in xs], [nan(_ep(per[n], "false_alarm_rate")) for n in names], width=0.4,
               color="#c0392b", label="false alarms (without it)")
        a3.bar([x + 0.2 for x in xs], [nan(_ep(per[n], "hit_rate")) for n in names], width=0.4, color="#229954",
               label="hits (with it)")
        targets = [_ep(per[n], "target_rate") for n in names if _ep(per[n], "target_rate") is not None]
        if targets:
            a3.axhline(max(targets), color="#999", lw=0.8, ls="--")
        a3.set_ylim(0, 1.25)
        a3.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        a3.set_title("conversations where the episode rule fires", fontsize=10)
        a3.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
        a3.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return {PLOT: buf.getvalue()}


def _scatter_png(plt: Any, per: Mapping[str, Any], nan: Any) -> bytes:
    """Many emotions: one point each (token AUROC against the firing rate without the emotion), the
    worst named; bars with a label each would make a plot thousands of pixels wide."""
    names = list(per)
    x = [nan(per[n]["token_auroc"]) for n in names]
    y = [nan(per[n]["fire_rate_without"]) for n in names]
    fig, ax = plt.subplots(figsize=(8.0, 4.4), dpi=100)
    ax.scatter(x, y, s=14, color="#2471a3", alpha=0.7)
    ax.axvline(0.5, color="#999", lw=0.8, ls="--")
    worst = sorted((i for i in range(len(names)) if math.isfinite(x[i]) and math.isfinite(y[i])),
                   key=lambda i: y[i] - x[i], reverse=True)[:8]
    for i in worst:
        ax.annotate(names[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("per-token AUROC on labelled conversations (max moving average)")
    ax.set_ylabel("conversations without it where it fires")
    ax.set_title(f"{len(names)} emotions (the 8 worst named; bottom right is good)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _ep(v: Mapping[str, Any], key: str) -> Any:
    return (v.get("episode") or {}).get(key)


def _with_ci(x: Any, ci: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    return _fmt(x, digits) + (f" [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else "")


def _rows(conv: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for e, v in conv["per_emotion"].items():
        row = [e, str(v["layer"]), str(v["n_with"]), str(v["n_without"]), _fmt(v["text_auroc"]),
               _fmt(v["token_auroc"]), _fmt(v["fire_rate_without"]), _fmt(v.get("fire_rate_with")),
               _fmt(v["first_fire_median"], 0)]
        if _has_episodes(conv):
            row += [_with_ci(_ep(v, "auroc"), _ep(v, "auroc_ci")),
                    _with_ci(_ep(v, "false_alarm_rate"), _ep(v, "false_alarm_ci")),
                    _with_ci(_ep(v, "hit_rate"), _ep(v, "hit_ci")), _fmt(_ep(v, "first_fire_median"), 0)]
        rows.append(row)
    return rows


def _has_episodes(conv: Mapping[str, Any]) -> bool:
    return any(v.get("episode") for v in conv["per_emotion"].values())


_HEAD = ["emotion", "layer", "n with", "n without", "text AUROC", "token AUROC", "fire rate without",
         "fire rate with", "first fire (median token)"]
_EPISODE_HEAD = ["episode AUROC [95% CI]", "episode false alarms [95% CI]", "episode hits [95% CI]",
                 "episode first fire (median token)"]


def _head(conv: Mapping[str, Any]) -> list[str]:
    return _HEAD + (_EPISODE_HEAD if _has_episodes(conv) else [])


def _intro(conv: Mapping[str, Any]) -> str:
    s = conv.get("summary") or {}
    return (f"{conv['n_conversations']} labelled conversations ({conv.get('source') or 'bundled snippets'}), "
            f"read per token as the runtime does. Token AUROC ranks by the maximum {conv['window']}-token moving "
            f"average of the calibrated score; a conversation 'fires' when one scored token reaches the manifest's "
            f"token threshold (special tokens and the first {conv['skip_first_tokens']} position(s) are not scored). "
            f"Mean text AUROC {_fmt(s.get('mean_text_auroc'))}, mean token AUROC {_fmt(s.get('mean_token_auroc'))}, "
            f"mean firing rate without the emotion {_fmt(s.get('mean_fire_rate_without'))}."
            + (_episode_intro(conv) if _has_episodes(conv) else ""))


def _episode_intro(conv: Mapping[str, Any]) -> str:
    s = conv.get("summary") or {}
    first = next(v["episode"] for v in conv["per_emotion"].values() if v.get("episode"))
    half = first.get("half_life_tokens")
    stat = (f"an exponentially weighted mean of the per-token projections (half-life {half:g} scored tokens)"
            if half is not None else "the cumulative mean of the per-token projections")
    src = str(first.get("source") or "")
    source = ("each emotion's held-out negatives of the graph" if src == "holdout_negatives"
              else src.partition(":")[2] or src or "calibration texts")
    return (f" The episode rule reads {stat}, decides from scored token {first.get('min_tokens')} on and fires "
            f"once the mean crosses its threshold, which was set on episodes without the emotion ({source}) to fire "
            f"on at most {_fmt(first.get('target_rate'))} of them; its score is the mean at the end of the "
            "conversation. "
            f"Mean false-alarm rate {_fmt(s.get('mean_episode_false_alarm_rate'))}, mean hit rate "
            f"{_fmt(s.get('mean_episode_hit_rate'))}, mean AUROC of the score {_fmt(s.get('mean_episode_auroc'))} "
            "(intervals: Wilson for the rates, bootstrap for the AUROC).")


def runtime_view(evaluation: Mapping[str, Any], plots: Mapping[str, bytes]) -> dict[str, Any] | None:
    """What the section shows, for the ``runtime_section`` macro of ``_runtime.html.j2`` (None when the
    evaluation has no conversations)."""
    conv = evaluation.get("conversations")
    if not conv:
        return None
    traces = []
    for i, rec in enumerate(conv.get("traces") or []):
        thr = (conv.get("thresholds") or {}).get(str(rec["layer"]), {})
        rules = (conv.get("episode_rules") or {}).get(str(rec["layer"]), {})
        traces.append(conversation_view(
            rec, thr, f"rt{i}", title=f"{rec['id']} (labelled: {', '.join(rec.get('labels') or []) or 'none'})",
            heading="h3", rules=rules))
    return {"intro": _intro(conv), "unknown_labels": list(conv.get("unknown_labels") or []), "head": _head(conv),
            "rows": _rows(conv), "plot": plots.get(PLOT), "traces": traces}


def runtime_html(evaluation: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """The section's HTML fragment (empty when the evaluation has no conversations); the page holding it
    needs conversation.css and conversation.js, which the report's head carries."""
    view = runtime_view(evaluation, plots)
    return render_macro("_runtime.html.j2", "runtime_section", view) if view else ""


def runtime_markdown(evaluation: Mapping[str, Any]) -> str:
    """The section as Markdown (Dagster metadata); empty when the evaluation has no conversations."""
    conv = evaluation.get("conversations")
    if not conv:
        return ""
    head = _head(conv)
    lines = [_intro(conv), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(conv)]
    return "\n".join(lines) + "\n"
