"""The evaluation report: one self-contained HTML file (PNG plots embedded) plus evaluation.json.

The page is ``templates/report.html.j2`` (rendered by :mod:`.html`); this module builds what it shows.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no
global backend state), so this is safe inside a Dagster process or a thread.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from amygdala_dagster.files.atomic import atomic_write_bytes, atomic_write_text
from amygdala_dagster.evaluation.verdicts import attention_order
from amygdala_dagster.evaluation.html import number, png_data_uri, render
from amygdala_dagster.evaluation.runtime_report import runtime_plots, runtime_view

_DPI = 90


# ----------------------------------------------------------------------------- plotting


def _figure(w: float, h: float):  # noqa: ANN202 - matplotlib types
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, tight: bool = True) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    if tight:  # a layout pass costs about one extra draw; the small per-emotion figures use fixed margins
        fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def report_layer(evaluation: Mapping[str, Any]) -> int:
    """The layer the cross-talk figure shows: the best shipped layer by mean held-out AUROC."""
    means = evaluation["summary"]["mean_auroc_by_layer"]
    layers = evaluation["layers"]
    scored = [l for l in layers if means.get(str(l)) is not None]
    return max(scored, key=lambda l: (means[str(l)], -l)) if scored else layers[-1]


def plot_auroc_by_layer(evaluation: Mapping[str, Any]) -> bytes:
    """Held-out AUROC by layer, one line per emotion (the sweep's layers when a sweep ran)."""
    sweep = evaluation.get("layer_sweep")
    if sweep:
        layers = [int(l) for l in sweep["layers"]]
        table = {e: [_nan(row.get(str(l))) for l in layers] for e, row in sweep["auroc"].items()}
        mean = [_nan(sweep["mean_auroc"].get(str(l))) for l in layers]
        title = f"Held-out AUROC by layer (sweep, {sweep['estimator']})"
    else:
        layers = [int(l) for l in evaluation["layers"]]
        table = {e: [_nan(r["layers"][str(l)]["auroc"]) for l in layers] for e, r in evaluation["emotions"].items()}
        mean = [_nan(evaluation["summary"]["mean_auroc_by_layer"].get(str(l))) for l in layers]
        title = "Held-out AUROC by layer (shipped vectors)"
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    many = len(table) > 20  # beyond that, thin unlabelled lines: the mean and the tables carry the detail
    # tab10 colours, then the same colours dashed with another marker: up to 20 lines stay distinguishable
    # (tab20's light/dark pairs do not at this line width).
    colours = list(__import__("matplotlib").colormaps["tab10"].colors)
    styles = [("-", "o"), ("--", "s")]
    for k, (emotion, vals) in enumerate(table.items()):
        ls, mk = styles[(k // len(colours)) % len(styles)]
        ax.plot(layers, vals, marker="" if many else mk, ms=4, lw=0.8 if many else 1.4, ls=ls,
                alpha=0.35 if many else 0.9, color=colours[k % len(colours)], label=None if many else emotion)
    ax.plot(layers, mean, color="black", lw=2.5, marker="s", label="mean")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("layer (0-based; activation after that layer)")
    ax.set_ylabel("held-out AUROC")
    ax.set_ylim(min(0.0, np.nanmin([*mean, *[v for vs in table.values() for v in vs], 0.5]) - 0.02), 1.02)
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def _heat(ax, mat: np.ndarray, labels: Sequence[str], title: str, vmin: float, vmax: float, fig) -> None:  # noqa: ANN001
    im = ax.imshow(mat, cmap="RdBu_r", vmin=vmin, vmax=vmax)
    small = len(labels) <= 30
    ax.set_xticks(range(len(labels)) if small else [])
    ax.set_yticks(range(len(labels)) if small else [])
    if small:
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        if len(labels) <= 12:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    if math.isfinite(mat[i, j]):
                        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_crosstalk(evaluation: Mapping[str, Any], layer: int | None = None) -> bytes:
    """Cosine between emotion vectors at ``layer`` beside the tags' co-occurrence correlation."""
    ct = evaluation["crosstalk"]
    layer = report_layer(evaluation) if layer is None else int(layer)
    labels = ct["concepts"]
    cos = np.array([[_nan(x) for x in row] for row in ct["cosine"][str(layer)]], dtype=np.float64).reshape(len(labels), len(labels))
    has_co = ct.get("cooccurrence") is not None
    side = max(3.5, min(0.32 * len(labels) + 2.0, 9.0))
    fig = _figure(side * (2 if has_co else 1) + 0.5, side)
    ax = fig.add_subplot(1, 2 if has_co else 1, 1)
    _heat(ax, cos, labels, f"vector cosine, layer {layer}", -1.0, 1.0, fig)
    if has_co:
        co = np.array([[_nan(x) for x in row] for row in ct["cooccurrence"]], dtype=np.float64).reshape(len(labels), len(labels))
        _heat(fig.add_subplot(1, 2, 2), co, labels, "tag co-occurrence (score correlation)", -1.0, 1.0, fig)
    return _png(fig)


def plot_histogram(evaluation: Mapping[str, Any], emotion: str, layer: int | None = None) -> bytes:
    """Held-out projections of positives vs negatives at ``layer`` (default: the emotion's best layer)."""
    res = evaluation["emotions"][emotion]
    layer = res["best_layer"] if layer is None else layer
    if layer is None:
        layer = evaluation["layers"][-1]
    proj = res["projections"][str(layer)]
    entry = res["layers"][str(layer)]
    pos = np.array([_nan(x) for x in proj["positive"]], dtype=np.float64)
    neg = np.array([_nan(x) for x in proj["negative"]], dtype=np.float64)
    fig = _figure(5.0, 3.0)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.16)
    ax = fig.add_subplot(1, 1, 1)
    both = np.concatenate([pos, neg])
    bins = np.histogram_bin_edges(both, bins=min(30, max(5, len(both) // 3))) if len(both) else 10
    if len(neg):
        ax.hist(neg, bins=bins, alpha=0.55, color="tab:blue", label=f"negatives (n={len(neg)})")
    if len(pos):
        ax.hist(pos, bins=bins, alpha=0.55, color="tab:red", label=f"positives (n={len(pos)})")
    cal = entry.get("calibration")
    if cal:
        ax.axvline(cal["threshold"], color="black", ls="--", lw=1, label="threshold")
    auc = entry.get("auroc")
    ax.set_title(f"{emotion}, layer {layer}: AUROC {auc:.3f}" if auc is not None else f"{emotion}, layer {layer}",
                 fontsize=9)
    ax.set_xlabel("projection on the vector (held-out)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=7)
    return _png(fig, tight=False)


def plot_estimators(evaluation: Mapping[str, Any]) -> bytes:
    """Held-out AUROC of each estimator per emotion, at the emotion's best layer."""
    emotions = list(evaluation["emotions"])
    names = list(evaluation["settings"]["estimators"])
    fig = _figure(min(max(5.0, 0.45 * len(emotions) * max(len(names), 1) / 2 + 2.5), 16.0), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(emotions))
    for k, name in enumerate(names):
        vals = []
        for e in emotions:
            layer = evaluation["emotions"][e]["best_layer"] or evaluation["layers"][-1]
            vals.append(_nan(evaluation["emotions"][e]["estimators"][name].get(str(layer))))
        ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, label=name)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set_xticks(x if len(emotions) <= 60 else [])
    if len(emotions) <= 60:
        ax.set_xticklabels(emotions, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out AUROC")
    ax.set_title("Estimators compared (each emotion's best layer)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


_VERDICT_STYLE = {"use": ("tab:green", "use"), "weak": ("tab:orange", "weak"), "do_not_use": ("tab:red", "do not use")}


def plot_verdicts(evaluation: Mapping[str, Any]) -> bytes:
    """One point per emotion: best-layer held-out AUROC (95% interval as a bar) against the number of
    held-out positives, coloured by verdict. Small holdouts and wide intervals show at a glance."""
    crit = evaluation["settings"].get("criteria") or {}
    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    jitter = np.random.default_rng(0)
    for verdict, (colour, label) in _VERDICT_STYLE.items():
        xs, ys, lo, hi = [], [], [], []
        for e, v in evaluation["verdicts"].items():
            r = evaluation["emotions"][e]
            if v["verdict"] != verdict or r["best_auroc"] is None:
                continue
            entry = r["layers"][str(r["best_layer"])]
            ci = entry.get("auroc_ci") or (r["best_auroc"], r["best_auroc"])
            xs.append(entry["n_pos"] * (1 + 0.04 * jitter.standard_normal()))
            ys.append(r["best_auroc"])
            lo.append(r["best_auroc"] - ci[0])
            hi.append(ci[1] - r["best_auroc"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=3.5, lw=0.7, alpha=0.75, color=colour,
                        label=f"{label} ({len(xs)})")
    if crit.get("min_auroc") is not None:
        ax.axhline(crit["min_auroc"], color="black", ls="--", lw=0.8)
    if crit.get("min_holdout_positives"):
        ax.axvline(crit["min_holdout_positives"], color="black", ls=":", lw=0.8)
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("held-out positives (log scale)")
    ax.set_ylabel("held-out AUROC, best layer")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Which vectors can I trust? (bars: 95% bootstrap interval)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def histogram_emotions(evaluation: Mapping[str, Any], histograms: int | None) -> list[str]:
    """The emotions that get a projection histogram: the first ``histograms`` in attention order
    (every emotion when None)."""
    order = attention_order(evaluation)
    return order if histograms is None else order[: max(int(histograms), 0)]


def all_plots(evaluation: Mapping[str, Any], histograms: int | None = None) -> dict[str, bytes]:
    """File name -> PNG bytes: the summary figures, and the histograms of :func:`histogram_emotions`."""
    plots = {
        "verdicts.png": plot_verdicts(evaluation),
        "auroc_by_layer.png": plot_auroc_by_layer(evaluation),
        "crosstalk.png": plot_crosstalk(evaluation),
    }
    if len(evaluation["settings"]["estimators"]) > 1:
        plots["estimators.png"] = plot_estimators(evaluation)
    for emotion in histogram_emotions(evaluation, histograms):
        plots[f"hist_{emotion}.png"] = plot_histogram(evaluation, emotion)
    plots.update(runtime_plots(evaluation))
    return plots


def png_markdown(png: bytes, alt: str) -> str:
    """An inline Markdown image (data URI) for Dagster metadata."""
    return f"![{alt}]({png_data_uri(png)})"


# ----------------------------------------------------------------------------- text


_f = number


def _ci(entry: Mapping[str, Any]) -> str:
    ci = entry.get("auroc_ci")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


VERDICT_LABEL = {"use": "use", "weak": "weak", "do_not_use": "do not use"}


def _row(evaluation: Mapping[str, Any], emotion: str) -> dict[str, str]:
    res = evaluation["emotions"][emotion]
    verdict = evaluation["verdicts"][emotion]
    best = res["best_layer"]
    entry = res["layers"].get(str(best), {}) if best is not None else {}
    counts = res["counts"]
    base = res["confounds"]["baseline_auroc"]
    return {
        "verdict": VERDICT_LABEL[verdict["verdict"]],
        "emotion": emotion,
        "best layer": _f(best),
        "AUROC [95% CI]": _f(entry.get("auroc")) + _ci(entry),
        "holdout +/-": f"{counts.get('holdout_positives', 0)}/{counts.get('holdout_negatives', 0)}",
        "baseline": _f(max((b for b in base.values() if b is not None), default=None)),
        "why": "; ".join(verdict["reasons"]),
    }


def _counts_line(evaluation: Mapping[str, Any]) -> str:
    s = evaluation["summary"]
    c = s["verdict_counts"]
    worst = s.get("worst_emotion")
    return (f"{len(evaluation['emotions'])} emotions: {c['use']} use, {c['weak']} weak, {c['do_not_use']} do not use. "
            f"Held-out AUROC at the best layer: mean {_f(s.get('mean_best_auroc'))}, worst {_f(s.get('worst_best_auroc'))}"
            + (f" ({worst})" if worst else "")
            + (f"; {s['n_not_evaluable']} not evaluable" if s.get("n_not_evaluable") else "") + ".")


def summary_markdown(evaluation: Mapping[str, Any], max_rows: int = 50) -> str:
    """A Markdown summary for Dagster metadata and the terminal: verdict counts, the per-emotion verdicts
    (most attention first), layer means and recommendations. Paragraphs are separated by blank lines."""
    order = list(evaluation["verdicts"])
    rows = [_row(evaluation, e) for e in order[:max_rows]]
    blocks = [_counts_line(evaluation)]
    if rows:
        head = list(rows[0])
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        table += ["| " + " | ".join(r[h].replace("|", "\\|") for h in head) + " |" for r in rows]
        if len(order) > max_rows:
            table.append(f"\n(+{len(order) - max_rows} more emotions, each with verdict "
                         f"{VERDICT_LABEL[evaluation['verdicts'][order[max_rows]]['verdict']]} or better; see the report)")
        blocks.append("\n".join(table))
    s = evaluation["summary"]
    blocks.append("Mean held-out AUROC by layer: " + ", ".join(
        f"{l}: {_f(v)}" for l, v in s["mean_auroc_by_layer"].items()))
    if s.get("mean_auroc_by_estimator") and len(s["mean_auroc_by_estimator"]) > 1:
        blocks.append("Mean held-out AUROC by estimator: " + ", ".join(
            f"{k}: {_f(v)}" for k, v in s["mean_auroc_by_estimator"].items()))
    blocks.append(f"Recommended layers: {', '.join(map(str, s['recommended_layers'])) or '–'}")
    pairs = evaluation["crosstalk"]["pairs"]
    if pairs:
        blocks.append(f"Cross-talk pairs (cosine ≥ {evaluation['crosstalk']['threshold']}): " + ", ".join(
            f"{p['a']}/{p['b']} L{p['layer']} {p['cosine']:.2f}" for p in pairs[:10])
            + (f" (+{len(pairs) - 10} more)" if len(pairs) > 10 else ""))
    return "\n\n".join(blocks) + "\n"


def emotion_markdown(evaluation: Mapping[str, Any], emotion: str) -> str:
    """Markdown for one emotion (a Dagster partition): verdict, per-layer table, confounds, snippets."""
    res = evaluation["emotions"][emotion]
    verdict = evaluation["verdicts"][emotion]
    lines = [f"**{emotion}**: {VERDICT_LABEL[verdict['verdict']]} (best layer {_f(res['best_layer'])})", ""]
    lines += [f"- {r}" for r in verdict["reasons"]] + [""]
    lines += ["| layer | AUROC | Cohen's d | accuracy | threshold | pos mean±sd | neg mean±sd |", "|---|---|---|---|---|---|---|"]
    for layer in evaluation["layers"]:
        e = res["layers"][str(layer)]
        cal = e.get("calibration") or {}
        lines.append(
            f"| {layer} | {_f(e.get('auroc'))}{_ci(e)} | {_f(e.get('cohens_d'), 2)} | {_f(e.get('accuracy'))} | "
            f"{_f(cal.get('threshold'))} | {_f(cal.get('pos_mean'))}±{_f(cal.get('pos_std'))} | "
            f"{_f(cal.get('neg_mean'))}±{_f(cal.get('neg_std'))} |")
    base = res["confounds"]["baseline_auroc"]
    lines += ["", f"Trivial baselines: length {_f(base.get('length'))}, node type {_f(base.get('node_type'))}"]
    gen = (evaluation.get("generalisation") or {}).get("emotions", {}).get(emotion)
    if gen and gen["top"]:
        lines += ["", f"Top snippets (layer {gen['layer']}): " + "; ".join(
            f"{t['id']} (z {_f(t['z'], 2)})" for t in gen["top"][:3])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HTML

_NUMERIC = re.compile(r"^(–|-?[\d.,]+(e-?\d+)?%?( \[[\d., -]+\])?|[\d]+/[\d]+)$")


def table_view(head: Sequence[str], rows: Sequence[Sequence[Any]], *, row_class: Sequence[str] | None = None,
               cell_class: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A table for the ``table`` macro of ``_report.html.j2``: a column whose cells are all numbers is
    right-aligned (class ``n``), every other left-aligned. ``cell_class`` adds a class to one column's
    cells (e.g. ``snip``)."""
    cell_class = dict(cell_class or {})
    numeric = [bool(rows) and all(_NUMERIC.match(str(r[i])) for r in rows) for i in range(len(head))]

    def cls(i: int, extra: str = "") -> str:
        return " ".join(c for c in ("n" if numeric[i] else "", extra) if c)

    return {"head": [{"text": str(h), "cls": cls(i)} for i, h in enumerate(head)],
            "rows": [{"cls": row_class[k] if row_class else "",
                      "cells": [{"text": str(c), "cls": cls(i, cell_class.get(i, ""))} for i, c in enumerate(r)]}
                     for k, r in enumerate(rows)]}


def _clip(text: str, n: int = 300) -> str:
    return text[:n] + ("…" if len(text) > n else "")


def _layer_table(ev: Mapping[str, Any], emotion: str) -> dict[str, Any]:
    res = ev["emotions"][emotion]
    head = ["layer", "AUROC", "95% CI", "Cohen's d", "accuracy", "F1", "threshold", "pos mean", "pos sd",
            "neg mean", "neg sd", "n pos", "n neg", "calibrated on"]
    body = []
    for layer in ev["layers"]:
        x = res["layers"][str(layer)]
        cal = x.get("calibration") or {}
        ci = x.get("auroc_ci")
        body.append([layer, _f(x.get("auroc")), f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–",
                     _f(x.get("cohens_d"), 2), _f(x.get("accuracy")), _f(x.get("f1")), _f(cal.get("threshold")),
                     _f(cal.get("pos_mean")), _f(cal.get("pos_std")), _f(cal.get("neg_mean")), _f(cal.get("neg_std")),
                     x.get("n_pos"), x.get("n_neg"), cal.get("split", "–")])
    return table_view(head, body)


def _projection_summary(ev: Mapping[str, Any], emotion: str) -> dict[str, Any] | None:
    """Quartiles of the held-out projections at the best layer (in place of a histogram)."""
    res = ev["emotions"][emotion]
    layer = res["best_layer"] if res["best_layer"] is not None else ev["layers"][-1]
    proj = (res.get("projections") or {}).get(str(layer))
    if not proj:
        return None
    rows = []
    for label in ("positive", "negative"):
        x = np.array([_nan(v) for v in proj[label]], dtype=np.float64)
        q = np.quantile(x, [0, 0.25, 0.5, 0.75, 1]) if len(x) else [math.nan] * 5
        rows.append([label + "s", len(x), *[_f(float(v)) for v in q]])
    return {"layer": layer, "table": table_view(["", "n", "min", "25%", "median", "75%", "max"], rows)}


def emotion_view(ev: Mapping[str, Any], emotion: str, plots: Mapping[str, bytes]) -> dict[str, Any]:
    """One emotion's folded detail, for the ``emotion_detail`` macro of ``_report.html.j2``."""
    res = ev["emotions"][emotion]
    verdict = ev["verdicts"][emotion]
    hist = plots.get(f"hist_{emotion}.png")
    c = res["confounds"]
    mix = lambda d: ", ".join(f"{k}:{v}" for k, v in d.items()) or "–"  # noqa: E731
    confounds = table_view(
        ["", "node types", "median length", "trivial baseline AUROC"],
        [["positives", mix(c["node_type_mix"]["positive"]), _f(c["text_length"]["positive"]["median"], 0),
          f"length {_f(c['baseline_auroc']['length'])}"],
         ["negatives", mix(c["node_type_mix"]["negative"]), _f(c["text_length"]["negative"]["median"], 0),
          f"node type {_f(c['baseline_auroc']['node_type'])}"]])
    names = list(ev["settings"]["estimators"])
    estimators = table_view(["estimator", *[f"layer {l}" for l in ev["layers"]]],
                            [[n, *[_f(res["estimators"][n].get(str(l))) for l in ev["layers"]]] for n in names]) \
        if len(names) > 1 else None
    texts = (ev.get("generalisation") or {}).get("texts", {})
    gen = (ev.get("generalisation") or {}).get("emotions", {}).get(emotion)
    snippets = None
    if gen and gen["top"]:
        snippets = {"layer": gen["layer"], "fraction": gen.get("fraction_above_threshold"), "tables": [
            table_view([label, "z", "probability", "raw", "text"], [
                [t["id"], _f(t["z"], 2), _f(t["probability"], 2), _f(t["raw"]), _clip(texts.get(t["id"], ""))]
                for t in items], cell_class={4: "snip"})
            for label, items in (("highest", gen["top"]), ("lowest", gen["bottom"]))]}
    return {"emotion": emotion, "verdict": verdict["verdict"], "label": VERDICT_LABEL[verdict["verdict"]],
            "auroc": res.get("best_auroc"), "layer": res["best_layer"], "reasons": list(verdict["reasons"]),
            "layers": _layer_table(ev, emotion), "histogram": hist,
            "projections": None if hist else _projection_summary(ev, emotion), "confounds": confounds,
            "estimators": estimators, "snippets": snippets}


def report_view(evaluation: Mapping[str, Any], plots: Mapping[str, bytes]) -> dict[str, Any]:
    """What the report shows, for ``report.html.j2``: summary and the per-emotion verdicts first (most
    attention first), then each emotion's detail, then layers, cross-talk and estimators."""
    ev = evaluation
    s = ev["summary"]
    st = ev["settings"]
    crit = st.get("criteria") or {}
    meta = ev.get("meta") or {}
    order = list(ev["verdicts"])
    rows = [_row(ev, e) for e in order]
    sweep = ev.get("layer_sweep")
    sweep_view = None
    if sweep:
        body = [[e, *[_f(row.get(str(l))) for l in sweep["layers"]]] for e, row in sweep["auroc"].items()]
        body.append(["mean", *[_f(sweep["mean_auroc"].get(str(l))) for l in sweep["layers"]]])
        if sweep.get("depth_fraction"):
            body.append(["depth", *[f"{sweep['depth_fraction'][str(l)]:.0%}" for l in sweep["layers"]]])
        sweep_view = {"n_layers": len(sweep["layers"]), "estimator": sweep["estimator"],
                      "recommended": ", ".join(map(str, sweep["recommended_layers"])),
                      "n_model_layers": sweep.get("n_model_layers"),
                      "table": table_view(["emotion", *[str(l) for l in sweep["layers"]]], body)}
    ct = ev["crosstalk"]
    names = list(st["estimators"])
    return {
        "info": [("created", ev.get("created_at")),
                 *((k, v) for k, v in meta.items() if not isinstance(v, (dict, list)))],
        "counts": [(v, VERDICT_LABEL[v], s["verdict_counts"][v]) for v in ("use", "weak", "do_not_use")],
        "counts_line": _counts_line(ev),
        "criteria": {k: crit.get(k) for k in ("min_auroc", "min_holdout_positives", "max_crosstalk_cosine",
                                              "max_fire_rate_without")},
        "has_conversations": bool(ev.get("conversations")),
        "threshold_method": st["threshold_method"], "fixed_fpr": st["threshold_method"] == "fixed_fpr",
        "target_fpr": st.get("target_fpr"), "bootstrap": st["bootstrap"],
        "plots": plots,
        "verdict_table": table_view(list(rows[0]), [list(r.values()) for r in rows],
                                    row_class=[f"v-{ev['verdicts'][e]['verdict']}" for e in order]) if rows else None,
        "details": [emotion_view(ev, e, plots) for e in order],
        "mean_by_layer": ", ".join(f"{l}: {_f(v)}" for l, v in s["mean_auroc_by_layer"].items()),
        "recommended_layers": ", ".join(map(str, s["recommended_layers"])) or "–",
        "sweep": sweep_view,
        "crosstalk": {"threshold": ct["threshold"], "n_pairs": len(ct["pairs"]), "open": len(ct["pairs"]) <= 20,
                      "pairs": table_view(["a", "b", "layer", "cosine", "co-occurrence"], [
                          [p["a"], p["b"], p["layer"], _f(p["cosine"]), _f(p["cooccurrence"])] for p in ct["pairs"]])
                      if ct["pairs"] else None},
        "estimators": table_view(["estimator", "mean held-out AUROC"],
                                 [[n, _f(s["mean_auroc_by_estimator"].get(n))] for n in names])
        if len(names) > 1 else None,
        "has_generalisation": bool(ev.get("generalisation")),
        "n_snippets": (ev.get("generalisation") or {}).get("n_snippets"),
    }


def render_html(evaluation: Mapping[str, Any], plots: Mapping[str, bytes], title: str = "Readout evaluation") -> str:
    """The report as one HTML string (``templates/report.html.j2``); every text is escaped, every plot embedded."""
    return render("report.html.j2", title=title, r=report_view(evaluation, plots),
                  runtime=runtime_view(evaluation, plots))


def write_projections(evaluation: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Every emotion's held-out projections, one row per (emotion, layer, example), as Parquet
    (``emotion, layer, label, key, score``)."""
    cols: dict[str, list[Any]] = {"emotion": [], "layer": [], "label": [], "key": [], "score": []}
    for e, res in evaluation["emotions"].items():
        for layer, proj in (res.get("projections") or {}).items():
            for label in ("positive", "negative"):
                scores, keys = proj[label], proj[f"{label}_keys"]
                cols["emotion"] += [e] * len(scores)
                cols["layer"] += [int(layer)] * len(scores)
                cols["label"] += [label] * len(scores)
                cols["key"] += list(keys)
                cols["score"] += [_nan(x) for x in scores]
    df = pl.DataFrame(cols, schema={"emotion": pl.String, "layer": pl.Int32, "label": pl.String,
                                    "key": pl.String, "score": pl.Float64})
    buf = io.BytesIO()
    df.write_parquet(buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def evaluation_json(evaluation: Mapping[str, Any]) -> str:
    """``evaluation.json``: the evaluation without the raw projections (those go to Parquet).

    Compact separators: the cosine and co-occurrence matrices would otherwise
    put every number on a line of its own.
    """
    slim = {**evaluation, "emotions": {e: {k: v for k, v in r.items() if k != "projections"}
                                       for e, r in evaluation["emotions"].items()}}
    return json.dumps(slim, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def write_report(
    evaluation: Mapping[str, Any], out_dir: str | os.PathLike[str], *, title: str = "Readout evaluation",
    html_name: str = "evaluation.html", json_name: str = "evaluation.json", histograms: int | None = None,
) -> tuple[Path, Path, dict[str, Path]]:
    """Write ``evaluation.json``, ``projections.parquet``, the PNG plots (``plots/``) and the
    self-contained HTML, each atomically. ``histograms``: how many emotions (most attention first)
    get a projection histogram; None: all. Plots of an earlier report that this one does not
    draw are removed, so ``plots/`` always matches the HTML.

    Returns ``(html_path, json_path, {plot name: png path})``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / json_name
    atomic_write_text(json_path, evaluation_json(evaluation))
    write_projections(evaluation, out / "projections.parquet")
    plots = all_plots(evaluation, histograms)
    png_paths = {}
    for name, data in plots.items():
        p = out / "plots" / name
        atomic_write_bytes(p, data)
        png_paths[name] = p
    for stale in (out / "plots").glob("*.png"):
        if stale.name not in plots:
            stale.unlink()
    html_path = out / html_name
    atomic_write_text(html_path, render_html(evaluation, plots, title=title))
    return html_path, json_path, png_paths
