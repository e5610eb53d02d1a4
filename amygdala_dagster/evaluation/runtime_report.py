"""The report's runtime section: how the readout behaves per token on labelled conversations.

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
    nan = lambda v: float("nan") if v is None else v  # noqa: E731
    if len(names) > MAX_BARS:
        return {PLOT: _scatter_png(plt, per, nan)}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8.0, 0.55 * len(names) + 3), 3.6), dpi=100)
    xs = range(len(names))
    a1.bar([x - 0.2 for x in xs], [nan(per[n]["text_auroc"]) for n in names], width=0.4, label="text level")
    a1.bar([x + 0.2 for x in xs], [nan(per[n]["token_auroc"]) for n in names], width=0.4, label="per token (max MA)")
    a1.axhline(0.5, color="#999", lw=0.8, ls="--")
    # Head-room above 1 for the legends, which otherwise cover the first bars.
    a1.set_ylim(0, 1.25)
    a1.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a1.set_title("AUROC on labelled conversations", fontsize=10)
    a1.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    a1.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    a2.bar(list(xs), [nan(per[n]["fire_rate_without"]) for n in names], color="#c0392b", label="without the emotion")
    a2.plot(list(xs), [nan(per[n]["fire_rate_with"]) for n in names], "o", color="#229954", label="with it")
    a2.set_ylim(0, 1.25)
    a2.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    a2.set_title("conversations where the token threshold fires", fontsize=10)
    a2.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
    a2.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
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


def _rows(conv: Mapping[str, Any]) -> list[list[str]]:
    return [[e, str(v["layer"]), str(v["n_with"]), str(v["n_without"]), _fmt(v["text_auroc"]),
             _fmt(v["token_auroc"]), _fmt(v["fire_rate_without"]), _fmt(v.get("fire_rate_with")),
             _fmt(v["first_fire_median"], 0)] for e, v in conv["per_emotion"].items()]


_HEAD = ["emotion", "layer", "n with", "n without", "text AUROC", "token AUROC", "fire rate without",
         "fire rate with", "first fire (median token)"]


def _intro(conv: Mapping[str, Any]) -> str:
    s = conv.get("summary") or {}
    return (f"{conv['n_conversations']} labelled conversations ({conv.get('source') or 'bundled snippets'}), "
            f"read per token as the runtime does. Token AUROC ranks by the maximum {conv['window']}-token moving "
            f"average of the calibrated score; a conversation 'fires' when one scored token reaches the manifest's "
            f"token threshold (special tokens and the first {conv['skip_first_tokens']} position(s) are not scored). "
            f"Mean text AUROC {_fmt(s.get('mean_text_auroc'))}, mean token AUROC {_fmt(s.get('mean_token_auroc'))}, "
            f"mean firing rate without the emotion {_fmt(s.get('mean_fire_rate_without'))}.")


def runtime_view(evaluation: Mapping[str, Any], plots: Mapping[str, bytes]) -> dict[str, Any] | None:
    """What the section shows, for the ``runtime_section`` macro of ``_runtime.html.j2`` (None when the
    evaluation has no conversations)."""
    conv = evaluation.get("conversations")
    if not conv:
        return None
    traces = []
    for i, rec in enumerate(conv.get("traces") or []):
        thr = (conv.get("thresholds") or {}).get(str(rec["layer"]), {})
        traces.append(conversation_view(
            rec, thr, f"rt{i}", title=f"{rec['id']} (labelled: {', '.join(rec.get('labels') or []) or 'none'})",
            heading="h3"))
    return {"intro": _intro(conv), "unknown_labels": list(conv.get("unknown_labels") or []), "head": _HEAD,
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
    lines = [_intro(conv), "", "| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(conv)]
    return "\n".join(lines) + "\n"
