"""The report's PNG plots, drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state), so this is safe inside a Dagster process or a thread."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from amygdala_dagster.evaluation.html import png_data_uri
from amygdala_dagster.evaluation.runtime_report import runtime_plots
from amygdala_dagster.evaluation.verdicts import attention_order

if TYPE_CHECKING:  # matplotlib itself is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_DPI = 90


# ----------------------------------------------------------------------------- plotting


def _figure(w: float, h: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure, tight: bool = True) -> bytes:
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
    scored = [layer for layer in layers if means.get(str(layer)) is not None]
    return cast(int, max(scored, key=lambda layer: (means[str(layer)], -layer)) if scored else layers[-1])


def plot_auroc_by_layer(evaluation: Mapping[str, Any]) -> bytes:
    """Held-out AUROC by layer, one line per emotion (the sweep's layers when a sweep ran)."""
    sweep = evaluation.get("layer_sweep")
    if sweep:
        layers = [int(layer) for layer in sweep["layers"]]
        table = {e: [_nan(row.get(str(layer))) for layer in layers] for e, row in sweep["auroc"].items()}
        mean = [_nan(sweep["mean_auroc"].get(str(layer))) for layer in layers]
        title = f"Held-out AUROC by layer (sweep, {sweep['estimator']})"
    else:
        layers = [int(layer) for layer in evaluation["layers"]]
        table = {e: [_nan(r["layers"][str(layer)]["auroc"]) for layer in layers]
                 for e, r in evaluation["emotions"].items()}
        mean = [_nan(evaluation["summary"]["mean_auroc_by_layer"].get(str(layer))) for layer in layers]
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


def _heat(ax: Axes, mat: np.ndarray, labels: Sequence[str], title: str, vmin: float, vmax: float,
          fig: Figure) -> None:
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
    cos = np.array([[_nan(x) for x in row] for row in ct["cosine"][str(layer)]],
                   dtype=np.float64).reshape(len(labels), len(labels))
    has_co = ct.get("cooccurrence") is not None
    side = max(3.5, min(0.32 * len(labels) + 2.0, 9.0))
    fig = _figure(side * (2 if has_co else 1) + 0.5, side)
    ax = fig.add_subplot(1, 2 if has_co else 1, 1)
    _heat(ax, cos, labels, f"vector cosine, layer {layer}", -1.0, 1.0, fig)
    if has_co:
        co = np.array([[_nan(x) for x in row] for row in ct["cooccurrence"]],
                      dtype=np.float64).reshape(len(labels), len(labels))
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
    bins: Any = np.histogram_bin_edges(both, bins=min(30, max(5, len(both) // 3))) if len(both) else 10
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
