"""The evaluation report: one self-contained HTML file (PNG plots embedded) plus evaluation.json.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no
global backend state), so this is safe inside a Dagster process or a thread.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amygdala_dagster.atomic import atomic_write_bytes, atomic_write_text
from amygdala_dagster.evaluation.runtime_report import runtime_html, runtime_plots

_DPI = 90


# ----------------------------------------------------------------------------- plotting


def _figure(w: float, h: float):  # noqa: ANN202 - matplotlib types
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
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
    return _png(fig)


def plot_estimators(evaluation: Mapping[str, Any]) -> bytes:
    """Held-out AUROC of each estimator per emotion, at the emotion's best layer."""
    emotions = list(evaluation["emotions"])
    names = list(evaluation["settings"]["estimators"])
    fig = _figure(max(5.0, 0.45 * len(emotions) * max(len(names), 1) / 2 + 2.5), 3.5)
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
    ax.set_xticks(x)
    ax.set_xticklabels(emotions, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out AUROC")
    ax.set_title("Estimators compared (each emotion's best layer)", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def all_plots(evaluation: Mapping[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot of the report."""
    plots = {
        "auroc_by_layer.png": plot_auroc_by_layer(evaluation),
        "crosstalk.png": plot_crosstalk(evaluation),
        "estimators.png": plot_estimators(evaluation),
    }
    for emotion in evaluation["emotions"]:
        plots[f"hist_{emotion}.png"] = plot_histogram(evaluation, emotion)
    plots.update(runtime_plots(evaluation))
    return plots


def png_markdown(png: bytes, alt: str) -> str:
    """An inline Markdown image (data URI) for Dagster metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


# ----------------------------------------------------------------------------- text


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "–"
    return str(x)


def _ci(entry: Mapping[str, Any]) -> str:
    ci = entry.get("auroc_ci")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _row(evaluation: Mapping[str, Any], emotion: str) -> dict[str, str]:
    res = evaluation["emotions"][emotion]
    best = res["best_layer"]
    entry = res["layers"].get(str(best), {}) if best is not None else {}
    counts = res["counts"]
    base = res["confounds"]["baseline_auroc"]
    return {
        "emotion": emotion,
        "best layer": _f(best),
        "AUROC": _f(entry.get("auroc")) + _ci(entry),
        "Cohen's d": _f(entry.get("cohens_d"), 2),
        "accuracy": _f(entry.get("accuracy")),
        "holdout +/-": f"{counts.get('holdout_positives', 0)}/{counts.get('holdout_negatives', 0)}",
        "length base": _f(base.get("length")),
        "type base": _f(base.get("node_type")),
        "flag": "⚠ confound" if res["confounds"].get("flagged") else ("no holdout" if best is None else ""),
    }


def summary_markdown(evaluation: Mapping[str, Any]) -> str:
    """A Markdown summary (per-emotion table, layer means, recommendations, flags) for Dagster metadata."""
    rows = [_row(evaluation, e) for e in evaluation["emotions"]]
    lines = []
    if rows:
        head = list(rows[0])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            lines.append("| " + " | ".join(r[h].replace("|", "\\|") for h in head) + " |")
    s = evaluation["summary"]
    lines.append("")
    lines.append("Mean held-out AUROC by layer: " + ", ".join(
        f"{l}: {_f(v)}" for l, v in s["mean_auroc_by_layer"].items()))
    lines.append("Mean held-out AUROC by estimator: " + ", ".join(
        f"{k}: {_f(v)}" for k, v in s["mean_auroc_by_estimator"].items()))
    lines.append(f"Recommended layers: {', '.join(map(str, s['recommended_layers'])) or '–'}")
    pairs = evaluation["crosstalk"]["pairs"]
    if pairs:
        lines.append(f"Cross-talk pairs (cosine ≥ {evaluation['crosstalk']['threshold']}): " + ", ".join(
            f"{p['a']}/{p['b']} L{p['layer']} {p['cosine']:.2f}" for p in pairs[:10])
            + (f" (+{len(pairs) - 10} more)" if len(pairs) > 10 else ""))
    for f in evaluation["flags"]:
        lines.append(f"- ⚠ {f['message']}")
    return "\n".join(lines) + "\n"


def emotion_markdown(evaluation: Mapping[str, Any], emotion: str) -> str:
    """Markdown for one emotion (a Dagster partition): per-layer table, confounds, snippets."""
    res = evaluation["emotions"][emotion]
    lines = [f"**{emotion}** — best layer {_f(res['best_layer'])}", "",
             "| layer | AUROC | Cohen's d | accuracy | threshold | pos mean±sd | neg mean±sd |", "|---|---|---|---|---|---|---|"]
    for layer in evaluation["layers"]:
        e = res["layers"][str(layer)]
        cal = e.get("calibration") or {}
        lines.append(
            f"| {layer} | {_f(e.get('auroc'))}{_ci(e)} | {_f(e.get('cohens_d'), 2)} | {_f(e.get('accuracy'))} | "
            f"{_f(cal.get('threshold'))} | {_f(cal.get('pos_mean'))}±{_f(cal.get('pos_std'))} | "
            f"{_f(cal.get('neg_mean'))}±{_f(cal.get('neg_std'))} |")
    base = res["confounds"]["baseline_auroc"]
    lines += ["", f"Trivial baselines: length {_f(base.get('length'))}, node type {_f(base.get('node_type'))}"
              + (" — ⚠ flagged" if res["confounds"].get("flagged") else "")]
    gen = (evaluation.get("generalisation") or {}).get("emotions", {}).get(emotion)
    if gen and gen["top"]:
        lines.append(f"Top snippets (layer {gen['layer']}): " + "; ".join(
            f"{t['id']} (z {_f(t['z'], 2)})" for t in gen["top"][:3]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left}
.flag{color:#b00;font-weight:bold} img{max-width:100%} .snip{max-width:520px;text-align:left}
section{margin-bottom:2em} h2{border-bottom:1px solid #ddd}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(head)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(evaluation: Mapping[str, Any], plots: Mapping[str, bytes], title: str = "Readout evaluation") -> str:
    """The report as one HTML string; every text is escaped, every plot embedded."""
    ev = evaluation
    s = ev["summary"]
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    meta = ev.get("meta") or {}
    info = [("created", ev.get("created_at")), *((k, v) for k, v in meta.items() if not isinstance(v, (dict, list)))]
    parts.append("<p>" + " · ".join(f"{_e(k)}: {_e(v)}" for k, v in info) + "</p>")
    st = ev["settings"]
    parts.append(f"<p>Threshold: {_e(st['threshold_method'])}"
                 + (f" (target FPR {_e(st['target_fpr'])})" if st["threshold_method"] == "fixed_fpr" else "")
                 + f" · bootstrap {_e(st['bootstrap'])} resamples · cross-talk cosine ≥ {_e(st['crosstalk_cosine'])}</p>")

    if ev["flags"]:
        parts.append("<section><h2>Flags</h2><ul>" + "".join(
            f'<li class="flag">{_e(f["message"])}</li>' for f in ev["flags"]) + "</ul></section>")

    rows = [_row(ev, e) for e in ev["emotions"]]
    parts.append("<section><h2>Held-out separation (best layer per emotion)</h2>")
    if rows:
        parts.append(_table(list(rows[0]), [list(r.values()) for r in rows]))
    parts.append("<p>Mean held-out AUROC by layer: " + _e(", ".join(
        f"{l}: {_f(v)}" for l, v in s["mean_auroc_by_layer"].items())) + "</p>")
    parts.append(f"<p><b>Recommended layers</b>: {_e(', '.join(map(str, s['recommended_layers'])) or '–')}</p>")
    parts.append(_img(plots["auroc_by_layer.png"], "AUROC by layer"))
    parts.append("</section>")

    parts.append("<section><h2>Per emotion and layer</h2>")
    head = ["emotion", "layer", "AUROC", "95% CI", "Cohen's d", "accuracy", "F1", "threshold",
            "pos mean", "pos sd", "neg mean", "neg sd", "n pos", "n neg", "calibrated on"]
    body = []
    for e, res in ev["emotions"].items():
        for layer in ev["layers"]:
            x = res["layers"][str(layer)]
            cal = x.get("calibration") or {}
            ci = x.get("auroc_ci")
            body.append([e, layer, _f(x.get("auroc")), f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–",
                         _f(x.get("cohens_d"), 2), _f(x.get("accuracy")), _f(x.get("f1")), _f(cal.get("threshold")),
                         _f(cal.get("pos_mean")), _f(cal.get("pos_std")), _f(cal.get("neg_mean")), _f(cal.get("neg_std")),
                         x.get("n_pos"), x.get("n_neg"), cal.get("split", "–")])
    parts.append(_table(head, body))
    parts.append("</section>")

    sweep = ev.get("layer_sweep")
    if sweep:
        parts.append("<section><h2>Layer sweep</h2>")
        parts.append(f"<p>{len(sweep['layers'])} layers, estimator {_e(sweep['estimator'])}; recommended: "
                     f"{_e(', '.join(map(str, sweep['recommended_layers'])))}"
                     + (f" of {_e(sweep['n_model_layers'])} layers" if sweep.get("n_model_layers") else "") + "</p>")
        head = ["emotion", *[str(l) for l in sweep["layers"]]]
        body = [[e, *[_f(row.get(str(l))) for l in sweep["layers"]]] for e, row in sweep["auroc"].items()]
        body.append(["mean", *[_f(sweep["mean_auroc"].get(str(l))) for l in sweep["layers"]]])
        if sweep.get("depth_fraction"):
            body.append(["depth", *[f"{sweep['depth_fraction'][str(l)]:.0%}" for l in sweep["layers"]]])
        parts.append(_table(head, body))
        parts.append("</section>")

    parts.append("<section><h2>Estimators compared (held-out AUROC, fitted on train)</h2>")
    names = list(st["estimators"])
    head = ["emotion", "layer", *names]
    body = [[e, layer, *[_f(res["estimators"][n].get(str(layer))) for n in names]]
            for e, res in ev["emotions"].items() for layer in ev["layers"]]
    body.append(["mean", "all", *[_f(s["mean_auroc_by_estimator"].get(n)) for n in names]])
    parts.append(_table(head, body))
    parts.append(_img(plots["estimators.png"], "estimators compared"))
    parts.append("</section>")

    ct = ev["crosstalk"]
    parts.append("<section><h2>Cross-talk</h2>")
    parts.append(_img(plots["crosstalk.png"], "cross-talk and co-occurrence"))
    if ct["pairs"]:
        parts.append(_table(["a", "b", "layer", "cosine", "co-occurrence"], [
            [p["a"], p["b"], p["layer"], _f(p["cosine"]), _f(p["cooccurrence"])] for p in ct["pairs"]], left=2))
    else:
        parts.append(f"<p>No pair of vectors has cosine ≥ {_e(ct['threshold'])}.</p>")
    parts.append("</section>")

    parts.append("<section><h2>Confounds</h2>")
    head = ["emotion", "pos node types", "neg node types", "pos median len", "neg median len",
            "length AUROC", "node-type AUROC", "vector AUROC", "flagged"]
    body = []
    for e, res in ev["emotions"].items():
        c = res["confounds"]
        mix = lambda d: ", ".join(f"{k}:{v}" for k, v in d.items())  # noqa: E731
        body.append([e, mix(c["node_type_mix"]["positive"]), mix(c["node_type_mix"]["negative"]),
                     _f(c["text_length"]["positive"]["median"], 0), _f(c["text_length"]["negative"]["median"], 0),
                     _f(c["baseline_auroc"]["length"]), _f(c["baseline_auroc"]["node_type"]),
                     _f(c.get("vector_auroc")), "YES" if c.get("flagged") else ""])
    parts.append(_table(head, body, left=3))
    parts.append("</section>")

    parts.append("<section><h2>Held-out projections (best layer)</h2>")
    for e in ev["emotions"]:
        parts.append(_img(plots[f"hist_{e}.png"], f"projection histogram {e}"))
    parts.append("</section>")

    gen = ev.get("generalisation")
    if gen:
        parts.append(f"<section><h2>Generalisation: {_e(gen['n_snippets'])} conversation snippets</h2>")
        for e, g in gen["emotions"].items():
            parts.append(f"<h3>{_e(e)} (layer {_e(g['layer'])}; above threshold: "
                         f"{_e(_f(g.get('fraction_above_threshold'), 2))})</h3>")
            for label, items in (("top", g["top"]), ("bottom", g["bottom"])):
                parts.append(f"<p>{label}</p>")
                parts.append(_table(["id", "z", "probability", "raw", "text"], [
                    [t["id"], _f(t["z"], 2), _f(t["probability"], 2), _f(t["raw"]),
                     t["text"][:300] + ("…" if len(t["text"]) > 300 else "")] for t in items]))
        parts.append("</section>")
    parts.append(runtime_html(ev, plots))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    evaluation: Mapping[str, Any], out_dir: str | os.PathLike[str], *, title: str = "Readout evaluation",
    html_name: str = "evaluation.html", json_name: str = "evaluation.json",
) -> tuple[Path, Path, dict[str, Path]]:
    """Write ``evaluation.json``, the PNG plots (``plots/``) and the self-contained HTML, each atomically.

    Returns ``(html_path, json_path, {plot name: png path})``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / json_name
    atomic_write_text(json_path, json.dumps(evaluation, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    plots = all_plots(evaluation)
    png_paths = {}
    for name, data in plots.items():
        p = out / "plots" / name
        atomic_write_bytes(p, data)
        png_paths[name] = p
    html_path = out / html_name
    atomic_write_text(html_path, render_html(evaluation, plots, title=title))
    return html_path, json_path, png_paths
