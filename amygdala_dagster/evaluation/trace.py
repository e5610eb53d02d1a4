"""Per-token traces of the readout over conversations: JSON records and a self-contained HTML page.

A trace record holds, for one input and one layer, every concept's raw and
calibrated per-token scores, where each concept fired (a scored token whose
raw projection reaches the token threshold, as the runtime decides) and a
top-k of the concepts most active in it (fired first, then by the highest
short moving average of the calibrated score), which is all the page shows
so that it stays legible with hundreds of concepts.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amygdala_dagster.readout.metrics import z_score
from amygdala_dagster.readout.manifest import calibration_entry
from amygdala_dagster.readout.runtime import calibrated_scores

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
    return (c[idx] - c[lo]) / (idx - lo)


def thresholds(manifest: Mapping[str, Any], layer: int) -> tuple[str, dict[str, dict[str, float] | None]]:
    """``(kind, {concept: {"raw", "z", "neg_mean", "neg_std"}})``: the token calibration's thresholds, or
    for a format-1 manifest (no token calibration) the text-level ones (``kind`` says which)."""
    kind = "token"
    if all(calibration_entry(manifest, c, layer, "token") is None for c in manifest["concepts"]):
        kind = "text"
    out: dict[str, dict[str, float] | None] = {}
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


def _rank_key(s: Mapping[str, Any]) -> tuple:
    sm = s["max_smoothed_z"]
    return (not s["fired"], -(s["n_fired"]), -(sm if sm is not None and math.isfinite(sm) else -1e9))


def trace_record(scores: Any, layer: int, manifest: Mapping[str, Any], *, top_k: int = DEFAULT_TOP_K,
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
    if concepts:
        unknown = [c for c in concepts if c not in scores.concepts]
        if unknown:
            raise ValueError(f"unknown concept(s) {', '.join(unknown)}; the manifest has {', '.join(scores.concepts)}")
        top = list(concepts)
    else:
        top = sorted(scores.concepts, key=lambda c: (_rank_key(summary[c]), c))[:top_k]

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
    }


def _text_z(raw: np.ndarray, manifest: Mapping[str, Any], layer: int) -> np.ndarray:
    return calibrated_scores(raw, manifest, layer, "text")


# ----------------------------------------------------------------------------- HTML
PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}
"""

#: Styles of a conversation section (scoped to its classes; embeddable in another page).
CSS = """
.conv h2,.conv h3{font-size:17px;margin:28px 0 6px;border-top:1px solid #ddd;padding-top:14px}
.meta{color:#555;font-size:13px}.legend span{padding:1px 6px;margin-right:4px;border-radius:3px}
table.sum{border-collapse:collapse;font-size:13px;margin:6px 0}table.sum td,table.sum th{padding:2px 10px;
border-bottom:1px solid #eee;text-align:right}table.sum td:first-child,table.sum th:first-child{text-align:left}
.fired{color:#b00;font-weight:600}.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px;
line-height:1.9;white-space:pre-wrap;border:1px solid #eee;padding:10px;border-radius:4px;background:#fff}
.tokens span{border-radius:2px}.tokens span.sp{color:#999;font-size:11px}.tokens span.un{color:#888}
.tokens span.hit{outline:1.5px solid #900}.ctl{font-size:13px;margin:8px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:6px}
.plots svg{background:#fafafa;border:1px solid #eee}.note{font-size:12px;color:#666}
"""

JS = """
function amyColor(z, thr){
  if(z===null||thr===null) return 'transparent';
  var f=Math.max(0,Math.min(1.5,z/Math.max(thr,1e-6)));
  if(z<=0) return 'transparent';
  var a=Math.min(0.85,0.08+0.5*f); var r=f>=1?'200,0,0':'255,120,0';
  return 'rgba('+r+','+a.toFixed(3)+')';
}
function amyPaint(id){
  var d=JSON.parse(document.getElementById('data-'+id).textContent);
  var sel=document.getElementById('sel-'+id); var c=sel.value;
  var spans=document.querySelectorAll('#tok-'+id+' span[data-i]');
  spans.forEach(function(s){var i=+s.dataset.i; var z=d.z[c][i]; var ok=d.scored[i];
    s.style.background=ok?amyColor(z,d.thr[c]):'transparent';
    s.classList.toggle('hit', ok&&d.raw[c][i]!==null&&d.thrRaw[c]!==null&&d.raw[c][i]>=d.thrRaw[c]);});
}
document.addEventListener('DOMContentLoaded',function(){
  document.querySelectorAll('select[data-conv]').forEach(function(s){amyPaint(s.dataset.conv);
    s.addEventListener('change',function(){amyPaint(s.dataset.conv);});});
});
"""

_PALETTE = ["#c0392b", "#2471a3", "#229954", "#8e44ad", "#d68910", "#17a589", "#7f8c8d", "#a04000"]


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _svg(z: Sequence[float | None], scored: Sequence[bool], thr: float | None, name: str, color: str,
         fired: Sequence[int]) -> str:
    w, h, pad, top = 360, 120, 26, 22  # the title sits above the plotted range, never over the line
    pts = [(i, v) for i, (v, ok) in enumerate(zip(z, scored)) if ok and v is not None]
    n = max(len(z) - 1, 1)
    vals = [v for _, v in pts] + ([thr] if thr is not None else []) + [0.0]
    lo, hi = min(vals), max(vals)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def x(i: float) -> float:
        return pad + (w - pad - 6) * i / n

    def y(v: float) -> float:
        return top + (h - top - 18) * (hi - v) / (hi - lo)

    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="{_e(name)} over token position">',
             f'<text x="{pad}" y="14" font-size="11" fill="#333">{_e(name)} (calibrated z)</text>',
             f'<line x1="{pad}" x2="{w - 6}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#ccc"/>']
    if thr is not None:
        parts.append(f'<line x1="{pad}" x2="{w - 6}" y1="{y(thr):.1f}" y2="{y(thr):.1f}" stroke="#b00" '
                     f'stroke-dasharray="4 3"><title>threshold z={thr:.2f}</title></line>')
    if pts:
        poly = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.3" points="{poly}"/>')
    for i in fired[:200]:
        v = z[i]
        if v is not None:
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.2" fill="#b00"/>')
    parts.append(f'<text x="{pad}" y="{h - 4}" font-size="10" fill="#666">0</text>'
                 f'<text x="{w - 30}" y="{h - 4}" font-size="10" fill="#666">{len(z) - 1}</text>'
                 f'<text x="2" y="{y(hi) + 8:.1f}" font-size="9" fill="#666">{hi:.1f}</text>'
                 f'<text x="2" y="{y(lo):.1f}" font-size="9" fill="#666">{lo:.1f}</text></svg>')
    return "".join(parts)


def conversation_html(record: Mapping[str, Any], thr: Mapping[str, Mapping[str, float] | None], uid: str,
                      title: str | None = None, heading: str = "h2") -> str:
    """One conversation's section: fired-concepts summary, token heatmap (hover: numbers), per-concept plots."""
    top = list(record["top"])
    summ = record["summary"]
    out = [f'<section class="conv"><{heading}>{_e(title or record["id"])}</{heading}>']
    n_scored = sum(record["scored"])
    fired = record["fired"]
    out.append(f'<p class="meta">{len(record["tokens"])} tokens ({n_scored} scored) · layer {record["layer"]} · '
               f'{len(fired)} concept(s) fired'
               + (f": {_e(', '.join(fired[:30]))}{' …' if len(fired) > 30 else ''}" if fired else "") + "</p>")
    rows = ['<table class="sum"><tr><th>concept</th><th>fired</th><th>first at token</th><th>tokens above</th>'
            '<th>longest run</th><th>max z</th><th>max smoothed z</th><th>threshold z</th></tr>']
    for c in top:
        s = summ[c]
        t = thr.get(c)
        rows.append(f'<tr><td>{_e(c)}</td><td class="{"fired" if s["fired"] else ""}">{"yes" if s["fired"] else "no"}'
                    f'</td><td>{_e(s["first"] if s["first"] is not None else "–")}</td><td>{s["n_fired"]}</td>'
                    f'<td>{s["longest_run"]}</td><td>{_f(s["max_z"])}</td><td>{_f(s["max_smoothed_z"])}</td>'
                    f'<td>{_f(t["z"] if t else None)}</td></tr>')
    rows.append("</table>")
    out += rows
    options = "".join(f'<option value="{_e(c)}">{_e(c)}</option>' for c in top)
    out.append(f'<div class="ctl">colour tokens by <select id="sel-{uid}" data-conv="{uid}">{options}</select> '
               '<span class="note">orange: above 0, red: at or above the token threshold (outlined); '
               'grey: special or skipped positions, not scored. Hover a token for its numbers.</span></div>')
    spans = []
    for i, piece in enumerate(record["tokens"]):
        tip = [f"#{i} {piece!r}" + ("" if record["scored"][i] else " (not scored)")]
        for c in top:
            z, r = record["z"][c][i], record["raw"][c][i]
            tip.append(f"{c}: z={_f(z)} raw={_f(r, 3)}")
        cls = "sp" if record["special"][i] else ("un" if not record["scored"][i] else "")
        spans.append(f'<span data-i="{i}" class="{cls}" title="{_e(chr(10).join(tip))}">{_e(piece)}</span>')
    out.append(f'<div class="tokens" id="tok-{uid}">{"".join(spans)}</div>')
    out.append('<div class="plots">')
    for k, c in enumerate(top):
        t = thr.get(c)
        hits = [i for i, (r, ok) in enumerate(zip(record["raw"][c], record["scored"]))
                if ok and t and r is not None and r >= t["raw"]]
        out.append(_svg(record["z"][c], record["scored"], t["z"] if t else None, c, _PALETTE[k % len(_PALETTE)], hits))
    out.append("</div>")
    data = {"z": {c: record["z"][c] for c in top}, "raw": {c: record["raw"][c] for c in top},
            "scored": record["scored"], "thr": {c: (thr[c]["z"] if thr.get(c) else None) for c in top},
            "thrRaw": {c: (thr[c]["raw"] if thr.get(c) else None) for c in top}}
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="data-{uid}">{payload}</script></section>')
    return "\n".join(out)


def render_trace_html(trace: Mapping[str, Any], title: str = "Readout trace") -> str:
    """The whole page for a :func:`build_trace` result (self-contained: inline CSS, JS, SVG)."""
    thr = trace["thresholds"]
    kind = trace["calibration"]
    parts = [f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_e(title)}</title>'
             f"<style>{PAGE_CSS}{CSS}</style><script>{JS}</script></head><body><h1>{_e(title)}</h1>"]
    parts.append(f'<p class="meta">model {_e(trace.get("model"))} · layer {_e(trace["layer"])} · '
                 f'{len(trace["concepts"])} concepts · {len(trace["conversations"])} input(s) · scores calibrated on '
                 f'the {"per-token" if kind == "token" else "text-level (format 1 manifest: no token calibration)"} '
                 f'calibration · first {_e(trace.get("skip_first_tokens"))} position(s) and special tokens not scored'
                 f'</p>')
    fired_counts: dict[str, int] = {}
    for conv in trace["conversations"]:
        for c in conv["fired"]:
            fired_counts[c] = fired_counts.get(c, 0) + 1
    if fired_counts:
        top = sorted(fired_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:40]
        parts.append('<p class="meta">inputs in which each concept fired: '
                     + ", ".join(f"{_e(c)} {n}" for c, n in top) + (" …" if len(fired_counts) > 40 else "") + "</p>")
    for i, conv in enumerate(trace["conversations"]):
        parts.append(conversation_html(conv, thr, f"c{i}"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_trace(scores: Sequence[Any], layer: int, manifest: Mapping[str, Any], *, top_k: int = DEFAULT_TOP_K,
                concepts: Sequence[str] | None = None, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``trace.json`` content for several inputs' :class:`~amygdala_dagster.readout.runtime.TokenScores`."""
    kind, thr = thresholds(manifest, layer)
    skip = scores[0].skip_first_tokens if scores else None
    return {
        "format": TRACE_FORMAT, **dict(meta or {}), "layer": int(layer), "calibration": kind,
        "skip_first_tokens": skip, "concepts": list(manifest["concepts"]), "thresholds": thr,
        "conversations": [trace_record(s, layer, manifest, top_k=top_k, concepts=concepts) for s in scores],
    }
