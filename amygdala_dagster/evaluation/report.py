"""The evaluation report: one self-contained HTML file (PNG plots embedded) plus evaluation.json.

The page is ``templates/report.html.j2`` (rendered by :mod:`.html`); this module builds what it shows.

The plots are drawn by :mod:`.plots`.
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

from amygdala_dagster.evaluation.html import number, render
from amygdala_dagster.evaluation.plots import all_plots
from amygdala_dagster.evaluation.runtime_report import runtime_view
from amygdala_dagster.files.atomic import atomic_write_bytes, atomic_write_text

# ----------------------------------------------------------------------------- text


_f = number


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


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
    source = ((evaluation.get("catalog") or {}).get("emotions") or {}).get(emotion, {}).get("source")
    return {
        "verdict": VERDICT_LABEL[verdict["verdict"]],
        "emotion": emotion,
        **({"source": source} if evaluation.get("catalog") else {}),
        "best layer": _f(best),
        "AUROC [95% CI]": _f(entry.get("auroc")) + _ci(entry),
        "holdout +/-": f"{counts.get('holdout_positives', 0)}/{counts.get('holdout_negatives', 0)}",
        "baseline": _f(max((b for b in base.values() if b is not None), default=None)),
        "why": "; ".join(verdict["reasons"]),
    }


def _sources_line(evaluation: Mapping[str, Any]) -> str | None:
    """Where the emotions come from (the catalog's ``source``), when the evaluation has the catalog."""
    counts = (evaluation.get("catalog") or {}).get("source_counts")
    if not counts:
        return None
    return ("Where the emotions come from: " + ", ".join(f"{n} {src}" for src, n in counts.items() if n)
            + " (tags: tagged, never by a core-personality or pattern node nor named in one; core/pattern: only "
              "tagged on or named by such nodes; both: named or tagged by such nodes and tagged on others; curated: "
              "named with --emotions). Those from core/pattern nodes take the max_emotions slots before the "
              "most-tagged ones.")


def _counts_line(evaluation: Mapping[str, Any]) -> str:
    s = evaluation["summary"]
    c = s["verdict_counts"]
    worst = s.get("worst_emotion")
    return (f"{len(evaluation['emotions'])} emotions: {c['use']} use, {c['weak']} weak, {c['do_not_use']} do not use. "
            f"Held-out AUROC at the best layer: mean {_f(s.get('mean_best_auroc'))}, "
            f"worst {_f(s.get('worst_best_auroc'))}"
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
            worst_shown = VERDICT_LABEL[evaluation["verdicts"][order[max_rows]]["verdict"]]
            table.append(f"\n(+{len(order) - max_rows} more emotions, each with verdict "
                         f"{worst_shown} or better; see the report)")
        blocks.append("\n".join(table))
    s = evaluation["summary"]
    blocks.append("Mean held-out AUROC by layer: " + ", ".join(
        f"{layer}: {_f(v)}" for layer, v in s["mean_auroc_by_layer"].items()))
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
    lines += ["| layer | AUROC | Cohen's d | accuracy | threshold | pos mean±sd | neg mean±sd |",
              "|---|---|---|---|---|---|---|"]
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
    def mix(d: Mapping[str, int]) -> str:
        return ", ".join(f"{k}:{v}" for k, v in d.items()) or "–"

    confounds = table_view(
        ["", "node types", "median length", "trivial baseline AUROC"],
        [["positives", mix(c["node_type_mix"]["positive"]), _f(c["text_length"]["positive"]["median"], 0),
          f"length {_f(c['baseline_auroc']['length'])}"],
         ["negatives", mix(c["node_type_mix"]["negative"]), _f(c["text_length"]["negative"]["median"], 0),
          f"node type {_f(c['baseline_auroc']['node_type'])}"]])
    names = list(ev["settings"]["estimators"])
    estimators = table_view(
        ["estimator", *[f"layer {layer}" for layer in ev["layers"]]],
        [[n, *[_f(res["estimators"][n].get(str(layer))) for layer in ev["layers"]]] for n in names],
    ) if len(names) > 1 else None
    texts = (ev.get("generalisation") or {}).get("texts", {})
    gen = (ev.get("generalisation") or {}).get("emotions", {}).get(emotion)
    snippets = None
    if gen and gen["top"]:
        snippets = {"layer": gen["layer"], "fraction": gen.get("fraction_above_threshold"), "tables": [
            table_view([label, "z", "probability", "raw", "text"], [
                [t["id"], _f(t["z"], 2), _f(t["probability"], 2), _f(t["raw"]), _clip(texts.get(t["id"], ""))]
                for t in items], cell_class={4: "snip"})
            for label, items in (("highest", gen["top"]), ("lowest", gen["bottom"]))]}
    source = ((ev.get("catalog") or {}).get("emotions") or {}).get(emotion)
    return {"emotion": emotion, "verdict": verdict["verdict"], "label": VERDICT_LABEL[verdict["verdict"]],
            "source": source,
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
        body = [[e, *[_f(row.get(str(layer))) for layer in sweep["layers"]]] for e, row in sweep["auroc"].items()]
        body.append(["mean", *[_f(sweep["mean_auroc"].get(str(layer))) for layer in sweep["layers"]]])
        if sweep.get("depth_fraction"):
            body.append(["depth", *[f"{sweep['depth_fraction'][str(layer)]:.0%}" for layer in sweep["layers"]]])
        sweep_view = {"n_layers": len(sweep["layers"]), "estimator": sweep["estimator"],
                      "recommended": ", ".join(map(str, sweep["recommended_layers"])),
                      "n_model_layers": sweep.get("n_model_layers"),
                      "table": table_view(["emotion", *[str(layer) for layer in sweep["layers"]]], body)}
    ct = ev["crosstalk"]
    names = list(st["estimators"])
    return {
        "info": [("created", ev.get("created_at")),
                 *((k, v) for k, v in meta.items() if not isinstance(v, (dict, list)))],
        "counts": [(v, VERDICT_LABEL[v], s["verdict_counts"][v]) for v in ("use", "weak", "do_not_use")],
        "counts_line": _counts_line(ev),
        "criteria": {k: crit.get(k) for k in ("min_auroc", "min_holdout_positives", "max_crosstalk_cosine",
                                              "max_fire_rate_without", "min_episode_auroc",
                                              "max_episode_false_alarm_rate", "min_episode_hit_rate")},
        "has_episodes": any((v or {}).get("episode") for v in
                            ((ev.get("conversations") or {}).get("per_emotion") or {}).values()),
        "has_conversations": bool(ev.get("conversations")),
        "threshold_method": st["threshold_method"], "fixed_fpr": st["threshold_method"] == "fixed_fpr",
        "target_fpr": st.get("target_fpr"), "bootstrap": st["bootstrap"],
        "plots": plots,
        "verdict_table": table_view(list(rows[0]), [list(r.values()) for r in rows],
                                    row_class=[f"v-{ev['verdicts'][e]['verdict']}" for e in order]) if rows else None,
        "details": [emotion_view(ev, e, plots) for e in order],
        "mean_by_layer": ", ".join(f"{layer}: {_f(v)}" for layer, v in s["mean_auroc_by_layer"].items()),
        "recommended_layers": ", ".join(map(str, s["recommended_layers"])) or "–",
        "sweep": sweep_view,
        "crosstalk": {"threshold": ct["threshold"], "n_pairs": len(ct["pairs"]), "open": len(ct["pairs"]) <= 20,
                      "pairs": table_view(["a", "b", "layer", "cosine", "co-occurrence"], [
                          [p["a"], p["b"], p["layer"], _f(p["cosine"]), _f(p["cooccurrence"])] for p in ct["pairs"]])
                      if ct["pairs"] else None},
        "estimators": table_view(["estimator", "mean held-out AUROC"],
                                 [[n, _f(s["mean_auroc_by_estimator"].get(n))] for n in names])
        if len(names) > 1 else None,
        "sources": _sources_line(ev),
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
