"""Settings -> engine: :class:`EngineSettings` -> :func:`build_engine`.

The model (weight-less until a text must be forwarded), the hooked layers (:func:`default_target_layers`
when none are given) and the activation engine; :func:`engine_report` says what ran (fast path, device map).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import cache_location
from amygdala_dagster.engine.layers import check_layer_indices, parse_layers
from amygdala_dagster.engine.models import LoadedModel, load_model
from amygdala_dagster.workflow.settings import current_settings

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
# Fractions of depth for the default target layers: middle-to-late (the seed's ~60-80%).
DEFAULT_DEPTH_FRACTIONS = (0.6, 0.7, 0.8)


# ----------------------------------------------------------------------------- settings -> engine
class SettingsError(ValueError):
    """A setting that does not fit the model (layers, dtype, device, pooling); the message names it."""


def default_target_layers(num_layers: int, fractions: Sequence[float] = DEFAULT_DEPTH_FRACTIONS) -> list[int]:
    """Middle-to-late layers: for each fraction f, the layer after which f of the depth is done.

    Layer ``idx`` is the residual stream after block ``idx + 1`` of ``num_layers``,
    so ``idx = round(f * num_layers) - 1`` (clamped, deduplicated). For 64 layers:
    37, 44, 50; for MiniLM's 6: 3, 4.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return sorted({min(num_layers - 1, max(0, round(f * num_layers) - 1)) for f in fractions})


def resolve_target_layers(spec: str | Sequence[int] | None, num_layers: int, model_id: str) -> list[int]:
    """``spec`` (``"3,18,-1"``, a list, or None for :func:`default_target_layers`) checked against the depth."""
    try:
        if spec is None:
            layers = default_target_layers(num_layers)
        elif isinstance(spec, str):
            layers = parse_layers(spec, num_layers)
        else:
            layers = list(spec)
        return check_layer_indices(layers, num_layers, model_id)
    except ValueError as exc:
        raise SettingsError(f"target layers: {exc}") from None


@dataclass(frozen=True)
class EngineSettings:
    """Everything that decides which model runs and how its activations are captured and cached."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    layers: str | tuple[int, ...] | None = None
    pooling: str = "mean"
    #: Texts per forward batch; None batches by the token budget (``max_batch_tokens``) alone.
    batch_size: int | None = None
    max_tokens: int = 512
    #: Padded-token budget per batch; None lets the engine choose (see ActivationEngine).
    max_batch_tokens: int | None = None
    layer_path: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    #: Spread one model over several devices: ``"auto"`` or a ``{module: device}`` map (see load_model).
    device_map: str | Mapping[str, Any] | None = None

    def cache_root(self) -> Path | str:
        """The activation cache root: ``cache_dir``, else ``$AMYGDALA_CACHE_DIR`` or the user cache.

        An fsspec URL (``s3://bucket/cache``) is returned as given: ``Path`` would fold its ``//``.
        """
        return cache_location(self.cache_dir) if self.cache_dir else current_settings().cache_location()

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], **overrides: Any) -> EngineSettings:
        """The settings that reproduce a manifest's activation fingerprint (``overrides``: device, batch size ...)."""
        fp = manifest.get("fingerprint") or {}
        model = manifest.get("model") or fp.get("model")
        if not model:
            raise SettingsError("the manifest records no model")
        base = cls(
            model=str(model), revision=manifest.get("model_revision") or fp.get("revision"),
            dtype=str(manifest.get("dtype") or fp.get("dtype") or "auto"),
            layers=tuple(int(x) for x in manifest.get("layers") or fp.get("layers") or ()) or None,
            pooling=str(fp.get("pooling") or manifest.get("pooling") or "mean"),
            max_tokens=int(fp.get("max_tokens", 512)), layer_path=fp.get("layer_path"),
        )
        return replace(base, **overrides)


def build_engine(settings: EngineSettings, *, loaded: LoadedModel | None = None,
                 on_weights_loaded: Callable[[LoadedModel], None] | None = None) -> ActivationEngine:
    """The activation engine for ``settings``, its model prepared without the weights.

    The weights are read by the first forward pass that has texts, so a fully
    cached run reads none. ``loaded`` reuses an already prepared model (same
    model, dtype and device) for another set of layers. Raises
    :class:`SettingsError` for a setting the model cannot take and lets
    ``ModelLoadError`` through.
    """
    if loaded is None:
        try:
            loaded = load_model(settings.model, dtype=settings.dtype, device=settings.device,
                                revision=settings.revision, trust_remote_code=settings.trust_remote_code,
                                weights=False, device_map=settings.device_map)
        except ValueError as exc:  # device or dtype not usable here (ModelLoadError is not a ValueError)
            raise SettingsError(str(exc)) from None
    layers = resolve_target_layers(settings.layers, loaded.num_layers, loaded.model_id)
    try:
        return ActivationEngine(loaded, layers, pooling=settings.pooling, max_tokens=settings.max_tokens,
                                batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens,
                                layer_path=settings.layer_path, on_weights_loaded=on_weights_loaded)
    except ValueError as exc:  # a layer path that does not resolve, an unknown pooling
        raise SettingsError(str(exc)) from None


def engine_report(engine: ActivationEngine) -> dict[str, Any]:
    """What ran: the linear-attention fast path (``yes`` / ``no`` / ``not-applicable``), the kernels found
    and missing, and the device map a spread model was placed with (None: one device)."""
    fast = engine.fast_path
    return {"fast_path": fast.fast_path, "kernels_found": list(fast.kernels_found),
            "kernels_missing": list(fast.kernels_missing),
            "linear_attention_layers": int(fast.linear_attention_layers),
            "device_map": dict(engine.loaded.device_map) if engine.loaded.device_map else None}


def fast_path_line(report: Mapping[str, Any]) -> str:
    """``fast_path: yes (kernels: fla)`` -- the one-line form the summaries print."""
    line = f"fast_path: {report.get('fast_path', 'not-applicable')}"
    found, missing = report.get("kernels_found") or [], report.get("kernels_missing") or []
    if found or missing:
        line += f" (kernels found: {', '.join(found) or 'none'}; missing: {', '.join(missing) or 'none'})"
    return line
