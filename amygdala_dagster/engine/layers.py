"""Finding a model's stack of transformer blocks and checking layer indices.

Layer ``idx`` is the 0-based block index; the activation read there is the
residual stream after that block (Hugging Face ``hidden_states[idx + 1]``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from torch import nn

#: Dotted paths (from the loaded model's root) tried after the model's own decoder accessor.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "layers",
    "model.layers",
    "language_model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "text_model.layers",
    "model.text_model.layers",
    "decoder.layers",
    "model.decoder.layers",
    "h",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
    "transformer.blocks",
    "blocks",
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layers",
    "model.encoder.layers",
    "transformer.layer",
)


class LayerResolutionError(ValueError):
    """The block stack could not be found (or an override path is wrong)."""


@dataclass
class ResolvedLayers:
    """The model's blocks in order and the dotted path they were found at."""

    modules: list[nn.Module]
    path: str


def _get_path(root: nn.Module, dotted: str) -> object | None:
    obj: object = root
    for part in dotted.split("."):
        if part == "":
            return None
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            idx = int(part)
            if idx >= len(obj):
                return None
            obj = obj[idx]
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _module_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return str(name)
    return None


def _describe(obj: object, num_layers: int) -> str:
    if obj is None:
        return "not found"
    if isinstance(obj, (nn.ModuleList, nn.Sequential)):
        return f"{type(obj).__name__} of length {len(obj)}, expected {num_layers}"
    return f"a {type(obj).__name__}, not a ModuleList"


def _fits(obj: object, num_layers: int) -> bool:
    return isinstance(obj, (nn.ModuleList, nn.Sequential)) and len(obj) == num_layers


def resolve_layers(model: nn.Module, num_layers: int, override: str | None = None) -> ResolvedLayers:
    """Locate the ``num_layers`` transformer blocks of ``model``.

    ``override`` is a dotted path from the model root (``--layer-path``) and
    is used as given. Otherwise the model's own decoder accessor
    (``get_decoder()``) is asked first, then :data:`KNOWN_LAYER_PATHS`; a
    candidate counts only when it is a ModuleList of exactly ``num_layers``.
    """
    if override:
        obj = _get_path(model, override)
        if not _fits(obj, num_layers):
            raise LayerResolutionError(
                f"--layer-path {override!r} on {type(model).__name__}: {_describe(obj, num_layers)}"
            )
        return ResolvedLayers(modules=list(cast(nn.ModuleList, obj)), path=override)

    tried: list[str] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception as exc:  # some models raise for encoder-only configs
            decoder = None
            tried.append(f"get_decoder() ({type(exc).__name__}: {exc})")
        if isinstance(decoder, nn.Module):
            for attr in ("layers", "layer", "h", "blocks"):
                obj = getattr(decoder, attr, None)
                if _fits(obj, num_layers):
                    path = _module_path(model, obj)  # type: ignore[arg-type]
                    if path is not None:
                        return ResolvedLayers(modules=list(cast(nn.ModuleList, obj)), path=path)
            tried.append(f"get_decoder() -> {type(decoder).__name__}.layers/.layer/.h/.blocks")
        elif decoder is None and not tried:
            tried.append("get_decoder() (returned None)")

    for path in KNOWN_LAYER_PATHS:
        obj = _get_path(model, path)
        if _fits(obj, num_layers):
            return ResolvedLayers(modules=list(cast(nn.ModuleList, obj)), path=path)
        tried.append(f"{path} ({_describe(obj, num_layers)})")

    raise LayerResolutionError(
        f"cannot find the {num_layers} transformer blocks of {type(model).__name__}; tried: "
        + "; ".join(tried)
        + ". Pass --layer-path with the dotted path of the block list from the model root "
        "(for example model.layers)."
    )


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """Parse ``"3,18,33,36"`` into indices; negative ones count from the end (needs ``num_layers``)."""
    if spec is None or not str(spec).strip():
        raise ValueError("no layers given: pass a comma-separated list such as 3,18,33,36")
    out: list[int] = []
    for raw in str(spec).split(","):
        part = raw.strip()
        if not part:
            raise ValueError(f"layer list {spec!r} has an empty entry")
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"layer list {spec!r}: {part!r} is not an integer") from None
        if value < 0:
            if num_layers is None:
                raise ValueError(f"layer {value} counts from the end; the model's depth is needed to resolve it")
            if value < -num_layers:
                raise ValueError(f"layer {value} out of range: the model has {num_layers} layers "
                                 f"(-{num_layers}..-1 from the end)")
            value += num_layers
        out.append(value)
    return out


def check_layer_indices(indices: Iterable[int], num_layers: int, model_id: str = "the model") -> list[int]:
    """Reject out-of-range or duplicate layer indices, naming the model's depth; return them as a list."""
    seen: set[int] = set()
    result: list[int] = []
    items = list(indices)
    if not items:
        raise ValueError(f"no layers given for {model_id}")
    for idx in items:
        if isinstance(idx, bool):
            raise ValueError(f"layer index {idx!r} is not an integer")
        try:
            idx = operator.index(idx)
        except TypeError:
            raise ValueError(f"layer index {idx!r} is not an integer") from None
        if idx < 0 or idx >= num_layers:
            raise ValueError(f"layer {idx} out of range: {model_id} has {num_layers} layers (0..{num_layers - 1})")
        if idx in seen:
            raise ValueError(f"layer {idx} given twice for {model_id}")
        seen.add(idx)
        result.append(idx)
    return result
