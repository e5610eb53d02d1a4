"""Reference for what a runtime (vLLM's ReadoutManager) does with a readout pair.

At each hooked layer ``idx`` the runtime takes the residual stream after that
layer, ``[T, H]`` for T tokens, and projects it on the concept rows:
``scores = activation @ vectors.T`` -> ``[T, C]``. A raw projection becomes a
calibrated score with the manifest's per-concept calibration: a z-score
relative to the held-out *negatives* (0 = typical text without the emotion,
1 = one standard deviation above it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# A calibration with zero spread (one held-out example) would divide by zero.
_MIN_STD = 1e-6


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


def calibration_arrays(manifest: Mapping[str, Any], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``(neg_mean [C], neg_std [C])`` of ``layer`` from the manifest (NaN where a concept has none)."""
    means, stds = [], []
    for concept in manifest["concepts"]:
        entry = manifest["per_concept"][concept]["layers"].get(str(int(layer)))
        cal = entry.get("calibration") if entry else None
        if not cal or cal.get("neg_mean") is None:
            means.append(np.nan)
            stds.append(np.nan)
            continue
        means.append(float(cal["neg_mean"]))
        stds.append(max(float(cal["neg_std"] or 0.0), _MIN_STD))
    return np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)


def calibrated_scores(raw: Any, manifest: Mapping[str, Any], layer: int) -> np.ndarray:
    """z-scores ``(raw - neg_mean) / neg_std`` per concept for raw projections ``[..., C]`` at ``layer``."""
    raw_arr = raw.detach().cpu().double().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, np.float64)
    means, stds = calibration_arrays(manifest, layer)
    if raw_arr.shape[-1] != means.shape[0]:
        raise ValueError(f"raw scores have {raw_arr.shape[-1]} concepts, manifest lists {means.shape[0]}")
    return (raw_arr - means) / stds
