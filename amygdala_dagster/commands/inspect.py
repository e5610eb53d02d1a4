"""``amygdala inspect VECTORS [--manifest M]``: what a readout pair holds, and whether it is valid."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.readout.manifest import ReadoutFileError, calibration_entry, load_readout, read_vectors_file
from amygdala_dagster.readout.releases import PublishError, open_pair
from amygdala_dagster.workflow.settings import current_settings

HELP = "show the concepts, layers, norms and cosines of a readout vectors file and check its manifest"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vectors", metavar="VECTORS", nargs="?", default=None,
                        help="vectors.safetensors, or an output directory (a path or a URL such as "
                             "s3://bucket/prefix); default: $AMYGDALA_OUTPUT_DIR, else ./amygdala_output")
    parser.add_argument("--manifest", default=None, metavar="FILE",
                        help="manifest.json (default: manifest.json next to VECTORS)")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="with more than 8 concepts, show only the N most similar pairs per layer")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    v = vectors.astype(np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms == 0, 1.0, norms)
    return v @ v.T


def top_pairs(concepts: list[str], cos: np.ndarray, n: int) -> list[tuple[str, str, float]]:
    iu = np.triu_indices(len(concepts), k=1)
    vals = cos[iu]
    order = np.argsort(-vals, kind="stable")[:n]
    return [(concepts[iu[0][i]], concepts[iu[1][i]], float(vals[i])) for i in order]


def inspect_pair(vectors: str | Path, manifest: str | Path | None, top: int = 10) -> dict[str, Any]:
    """The inspection report; ``report["ok"]`` is False (with ``error``) for an invalid pair.

    The pair is read as published (:func:`amygdala_dagster.readout.releases.open_pair`):
    one release through ``current`` locally, the ``current.json`` pointer on object storage.
    """
    try:
        with open_pair(vectors, manifest) as files:
            report = _inspect_files(files.vectors, files.manifest, top)
            report.update(vectors=files.source_vectors, manifest=files.source_manifest, source=files.where)
            return report
    except (PublishError, FileNotFoundError) as exc:
        return {"vectors": str(vectors), "manifest": str(manifest), "ok": False, "error": str(exc)}


def _inspect_files(vectors: Path, manifest_path: Path, top: int) -> dict[str, Any]:
    report: dict[str, Any] = {"vectors": str(vectors), "manifest": str(manifest_path), "ok": True}
    try:
        tensors, meta, dtype = read_vectors_file(vectors)
    except ReadoutFileError as exc:
        return {**report, "ok": False, "error": str(exc)}
    report["sha256"] = sha256_file(vectors)
    manifest_data: dict[str, Any] | None = None
    try:
        readout = load_readout(vectors, manifest_path)
        manifest_data = readout.manifest
        report["sha256_check"] = "ok"
    except ReadoutFileError as exc:
        report["ok"] = False
        report["error"] = str(exc)
        report["sha256_check"] = "mismatch" if "SHA-256" in str(exc) else "not checked"
        try:
            manifest_data = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest_data, dict):
                manifest_data = None
        except (OSError, ValueError):
            manifest_data = None
    if manifest_data is not None and isinstance(manifest_data.get("concepts"), list):
        concepts = [str(c) for c in manifest_data["concepts"]]
    else:
        concepts = [str(c) for c in meta.get("concepts", [])]
    report["dtype"] = dtype
    report["concepts"] = concepts
    if manifest_data is not None:
        report["model"] = manifest_data.get("model")
        report["created_at"] = manifest_data.get("created_at")
        report["format_version"] = manifest_data.get("format_version")
        report["token_calibration"] = token_calibration_summary(manifest_data)
        report["episode"] = episode_rule_summary(manifest_data)
    layers: list[dict[str, Any]] = []
    for key in sorted(tensors, key=lambda k: (len(k), k)):
        arr = tensors[key]
        entry: dict[str, Any] = {"key": key, "shape": list(arr.shape)}
        if arr.ndim == 2 and arr.shape[0] > 0:
            norms = np.linalg.norm(arr.astype(np.float64), axis=1)
            entry["norm_min"] = float(norms.min())
            entry["norm_max"] = float(norms.max())
            names = concepts if len(concepts) == arr.shape[0] else [f"#{i}" for i in range(arr.shape[0])]
            cos = cosine_matrix(arr)
            if arr.shape[0] <= 8:
                entry["cosines"] = {"concepts": names, "matrix": np.round(cos, 4).tolist()}
            else:
                entry["top_pairs"] = [[a, b, round(c, 4)] for a, b, c in top_pairs(names, cos, top)]
        layers.append(entry)
    report["layers"] = layers
    return report


def _concepts_and_layers(manifest: dict[str, Any]) -> tuple[list[str], list[int]] | None:
    """The manifest's concepts and layers, or None when it lists them badly (the summaries then say nothing)."""
    try:
        return list(manifest["concepts"]), [int(x) for x in manifest["layers"]]
    except (KeyError, TypeError, ValueError):
        return None


def token_calibration_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Per layer: how many concepts carry a token calibration, its source, target rate and the range of
    held-out firing rates relative to the target (None for a format-1 manifest)."""
    listed = _concepts_and_layers(manifest)
    if listed is None:
        return None
    concepts, layers = listed
    out: dict[str, Any] = {}
    for layer in layers:
        cals = [calibration_entry(manifest, c, layer, "token") for c in concepts]
        have = [c for c in cals if c]
        ratios = [c["heldout"]["ratio_to_target"] for c in have if c.get("heldout")]
        out[str(layer)] = {
            "n_concepts": len(have), "sources": sorted({str(c.get("source")) for c in have}),
            "target_rates": sorted({c.get("target_rate") for c in have}),
            "heldout_ratio_min": min(ratios) if ratios else None, "heldout_ratio_max": max(ratios) if ratios else None,
        }
    return out if any(v["n_concepts"] for v in out.values()) else None


_LISTED = 40  # concept names printed; 200 on one line are a wall of text


def episode_rule_summary(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Per layer: how many concepts carry an episode rule, its statistic, target false-alarm rate and the
    range of held-out false-alarm rates (None before format 3)."""
    listed = _concepts_and_layers(manifest)
    if listed is None:
        return None
    concepts, layers = listed
    out: dict[str, Any] = {}
    for layer in layers:
        have = [e for e in (calibration_entry(manifest, c, layer, "episode") for c in concepts) if e]
        rates = [e["heldout"]["false_alarm_rate"] for e in have if e.get("heldout")]
        out[str(layer)] = {
            "n_concepts": len(have), "sources": sorted({str(e.get("source")) for e in have}),
            "half_lives": sorted({e.get("half_life_tokens") for e in have}, key=str),
            "min_tokens": sorted({e.get("min_tokens") for e in have}, key=str),
            "target_rates": sorted({e.get("false_alarm_rate") for e in have}, key=str),
            "heldout_min": min(rates) if rates else None, "heldout_max": max(rates) if rates else None,
        }
    return out if any(v["n_concepts"] for v in out.values()) else None


def format_report(report: dict[str, Any]) -> str:
    lines = [f"vectors:  {report['vectors']}"]
    if "sha256" not in report:  # nothing was read: the error is all there is to say
        return "\n".join(lines + [f"INVALID: {report['error']}"])
    if report.get("source"):
        lines.append(f"release:  {report['source']}")
    if "sha256" in report:
        lines.append(f"sha256:   {report['sha256']} ({report.get('sha256_check', '?')} against {report['manifest']})")
    if report.get("model"):
        lines.append(f"model:    {report['model']}  created {report.get('created_at')}")
    if "dtype" in report:
        lines.append(f"dtype:    {report['dtype']}")
    if report.get("format_version") is not None:
        tok = report.get("token_calibration")
        lines.append(f"manifest: format {report['format_version']}; token calibration: "
                     + ("none (thresholds are text-level only)" if not tok else "per layer below"))
        for layer, v in (tok or {}).items():  # one line per layer: they read as a column
            lines.append(f"  layer {layer}: {v['n_concepts']} concepts, {', '.join(v['sources'])}, target "
                         f"{', '.join(map(str, v['target_rates']))}"
                         + (f", held-out firing {v['heldout_ratio_min']:.2f}-{v['heldout_ratio_max']:.2f}x target"
                            if v["heldout_ratio_min"] is not None else ""))
        ep = report.get("episode")
        lines.append("episode rule: " + ("none" if not ep else "per layer below"))
        for layer, v in (ep or {}).items():
            lines.append(f"  layer {layer}: {v['n_concepts']} concepts, {', '.join(v['sources'])}, half-life "
                         f"{', '.join(map(str, v['half_lives']))} tokens, decides from scored token "
                         f"{', '.join(map(str, v['min_tokens']))}, target {', '.join(map(str, v['target_rates']))}"
                         + (f", held-out false alarms {v['heldout_min']:.1%}-{v['heldout_max']:.1%}"
                            if v["heldout_min"] is not None else ""))
    concepts = report.get("concepts", [])
    shown = (concepts if len(concepts) <= _LISTED
             else concepts[:_LISTED] + [f"... {len(concepts) - _LISTED} more (--json lists all)"])
    lines.append(f"concepts: {len(concepts)}: {', '.join(shown)}")
    for entry in report.get("layers", []):
        shape = "x".join(map(str, entry["shape"]))
        norms = (f"  norms {entry['norm_min']:.6f}..{entry['norm_max']:.6f}" if "norm_min" in entry else "")
        lines.append(f"{entry['key']}: [{shape}]{norms}")
        if "cosines" in entry:
            names = entry["cosines"]["concepts"]
            width = max(6, *(len(n) for n in names))
            lines.append("  " + " " * width + " " + " ".join(f"{n[:7]:>7}" for n in names))
            for name, row in zip(names, entry["cosines"]["matrix"]):
                lines.append(f"  {name:>{width}} " + " ".join(f"{v:7.3f}" for v in row))
        elif "top_pairs" in entry:
            lines.append("  most similar pairs (cosine):")
            for a, b, c in entry["top_pairs"]:
                lines.append(f"    {c:7.3f}  {a} ~ {b}")
    if not report["ok"]:
        lines.append(f"INVALID: {report['error']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = inspect_pair(args.vectors or current_settings().output_location(), args.manifest, args.top)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if not report["ok"]:
        print(f"error: {report['error']}", file=sys.stderr)
        return 1
    return 0
