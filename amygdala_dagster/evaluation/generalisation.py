"""Generalisation: the out-of-distribution snippets each emotion's vector scores highest and lowest."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from amygdala_dagster.engine.cache import ActivationCache, layer_positions, text_sha256
from amygdala_dagster.files.jsonio import jsonl_values
from amygdala_dagster.readout import metrics as M
from amygdala_dagster.readout.manifest import ReadoutMatrix


def read_snippets(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Conversation snippets from a JSONL file of ``{"id", "text"}`` (errors name the line)."""
    path = Path(path)
    out, seen = [], set()
    for where, obj in jsonl_values(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "id" not in obj:
            raise ValueError(f'{where}: expected an object with "id" and "text"')
        if not obj["text"].strip():
            raise ValueError(f"{where}: snippet {obj['id']!r} has empty text")
        sid = str(obj["id"])
        if sid in seen:
            raise ValueError(f"{where}: duplicate snippet id {sid!r}")
        seen.add(sid)
        out.append({"id": sid, "text": obj["text"]})
    return out


def generalisation(
    cache: ActivationCache,
    readout: ReadoutMatrix,
    snippets: Sequence[Mapping[str, str]],
    layer_for: Mapping[str, int | None],
    calibration_for: Mapping[str, Mapping[int, Mapping[str, Any] | None]],
    *,
    top_k: int = 5,
) -> dict[str, Any]:
    """Top and bottom snippets per emotion by calibrated score at the emotion's chosen layer.

    ``{"n_snippets", "texts": {id: text}, "emotions": {emotion: {"layer", "top", "bottom",
    "fraction_above_threshold"}}}``; the rows of ``top``/``bottom`` name snippets by id. Every snippet
    must be in the cache (the GPU step forwards them with the examples).
    """
    texts = [s["text"] for s in snippets]
    ids = [str(s["id"]) for s in snippets]
    missing = [i for i, t in zip(ids, texts) if text_sha256(t) not in cache]
    if missing:
        raise ValueError(
            f"{len(missing)} conversation snippet(s) (first {missing[0]!r}) are not in the activation cache "
            f"{cache.directory}: forward them first (materialize activation_stats)"
        )
    acts = cache.get([text_sha256(t) for t in texts]).astype(np.float64) if texts else None
    # Each snippet's text once (rows name it by id): 200 emotions x top/bottom would repeat them.
    out: dict[str, Any] = {"n_snippets": len(snippets), "texts": dict(zip(ids, texts)), "emotions": {}}
    for ci, emotion in enumerate(readout.concepts):
        layer = layer_for.get(emotion)
        if layer is None:
            layer = int(readout.layers[-1])
        cal = (calibration_for.get(emotion) or {}).get(layer)
        if acts is None:
            out["emotions"][emotion] = {"layer": layer, "top": [], "bottom": []}
            continue
        li = layer_positions(cache, [layer], f"snippets for {emotion!r}")[0]
        raw = acts[:, li, :] @ np.asarray(readout.vectors[layer][ci], dtype=np.float64)
        z = M.z_score(raw, cal["neg_mean"], cal["neg_std"]) if cal else np.full_like(raw, np.nan)
        prob = M.probability(raw, cal) if cal else np.full_like(raw, np.nan)
        order = np.argsort(-raw, kind="mergesort")
        k = min(top_k, len(order))
        out["emotions"][emotion] = {
            "layer": layer,
            "top": [_snippet_row(ids, raw, z, prob, cal, int(i)) for i in order[:k]],
            "bottom": [_snippet_row(ids, raw, z, prob, cal, int(i)) for i in order[::-1][:k]],
            "fraction_above_threshold": float(np.mean(raw >= cal["threshold"])) if cal else None,
        }
    return out


def _snippet_row(ids: Sequence[str], raw: np.ndarray, z: np.ndarray, prob: np.ndarray,
                 cal: Mapping[str, Any] | None, i: int) -> dict[str, Any]:
    """Snippet ``i``'s scores for one emotion: raw projection, z-score, probability, above the threshold."""
    return {"id": ids[i], "raw": float(raw[i]), "z": float(z[i]), "probability": float(prob[i]),
            "above_threshold": bool(cal and raw[i] >= cal["threshold"])}
