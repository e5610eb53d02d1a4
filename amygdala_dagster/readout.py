"""Reference for what a runtime (vLLM's ReadoutManager) does with a readout pair.

At each hooked layer ``idx`` the runtime takes the residual stream after that
layer, ``[T, H]`` for T tokens, and projects it on the concept rows:
``scores = activation @ vectors.T`` -> ``[T, C]``. A raw projection becomes a
calibrated score with the manifest's per-concept calibration: a z-score
relative to the negatives (0 = typical text without the emotion, 1 = one
standard deviation above it) -- per token against ``token_calibration``, per
mean-pooled text against ``calibration``. :mod:`amygdala_dagster.runtime`
runs this on a Hugging Face model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from amygdala_dagster.evaluation.metrics import z_score
from amygdala_dagster.manifest import calibration_entry

def _matrix(readout: Any, layer: int) -> np.ndarray:
    vectors = readout.vectors if hasattr(readout, "vectors") else readout
    return np.asarray(vectors[int(layer)], dtype=np.float32)


def project(activations: Mapping[int, Any], readout: Any) -> dict[int, torch.Tensor]:
    """Per layer ``activation [T, H] @ vectors.T`` -> ``[T, C]`` float32.

    ``readout`` is a :class:`~amygdala_dagster.manifest.Readout`, a
    :class:`~amygdala_dagster.vectors.ReadoutVectors` or a plain
    ``{layer: [C, H]}`` mapping. Layers of ``activations`` that the readout
    does not hook are ignored.
    """
    layers = readout.layers if hasattr(readout, "layers") else list(readout)
    out: dict[int, torch.Tensor] = {}
    for layer, act in activations.items():
        if int(layer) not in layers:
            continue
        a = act if isinstance(act, torch.Tensor) else torch.as_tensor(np.asarray(act))
        a = a.detach().to("cpu", torch.float32)
        if a.ndim == 1:
            a = a[None, :]
        w = torch.from_numpy(_matrix(readout, layer))
        if a.shape[-1] != w.shape[1]:
            raise ValueError(f"layer {layer}: activations have width {a.shape[-1]}, vectors {w.shape[1]}")
        out[int(layer)] = a @ w.T
    return out


def calibrated_scores(raw: Any, manifest: Mapping[str, Any], layer: int, kind: str = "text") -> np.ndarray:
    """Calibrated scores ``[..., C]`` for raw projections ``[..., C]`` at ``layer``: per concept the
    z-score (:func:`amygdala_dagster.evaluation.metrics.z_score`) against the manifest's ``kind``
    calibration (``text``: held-out mean-pooled texts; ``token``: per-token projections of the
    calibration text). NaN for a concept without that calibration."""
    raw_arr = raw.detach().cpu().double().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, np.float64)
    concepts = list(manifest["concepts"])
    if raw_arr.shape[-1] != len(concepts):
        raise ValueError(f"raw scores have {raw_arr.shape[-1]} concepts, manifest lists {len(concepts)}")
    out = np.full(raw_arr.shape, np.nan, dtype=np.float64)
    for i, concept in enumerate(concepts):
        cal = calibration_entry(manifest, concept, layer, kind)
        if cal and cal.get("neg_mean") is not None and cal.get("neg_std") is not None:
            out[..., i] = z_score(raw_arr[..., i], cal["neg_mean"], cal["neg_std"])
    return out
