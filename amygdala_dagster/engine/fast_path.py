"""Which implementation a model's linear-attention layers really run: the fast kernels or the reference loop.

Hybrid models (Qwen3.5, Qwen3-Next) have gated-delta-rule layers. With
flash-linear-attention (and causal-conv1d) on a supported accelerator they run
fused kernels; otherwise transformers runs its reference PyTorch loop, correct
but about 12x slower for a 27B model on an H200 (benchmarks/RESULTS.md).

How transformers picks the implementation changes between releases (a
module-level binding decided at import time, then a wrapper that also looks at
the device of the inputs, then the ``kernels`` hub...). So the status is not
read from module attributes: :func:`linear_attention_fast_path` runs one
linear-attention layer on a few tokens, on the device the model runs on, and
records which Python functions the call enters (``sys.setprofile``). A
gated-delta-rule function defined outside transformers means the fast path;
only transformers' own means the reference path. A meta-device skeleton is
probed through a copy of one layer materialised on the target device (zeros,
no checkpoint read).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Substrings of the function names that implement each part of a linear-attention layer, and the
#: distribution that provides its fast kernel. The gated delta rule decides the speed.
_KERNELS: dict[str, str] = {
    "gated_delta_rule": "flash-linear-attention",
    "causal_conv1d": "causal-conv1d",
}
_DECISIVE = "gated_delta_rule"
#: Import name -> distribution, for the packages known to provide these kernels.
_DISTRIBUTIONS = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}
#: Where the reference implementations live: anything else that implements a part is a kernel package.
_REFERENCE_PACKAGES = ("transformers", "torch")
_PROBE_TOKENS = 4
_PROFILE_LOCK = threading.Lock()


@dataclass
class FastPath:
    """Which path a model's linear-attention layers take: ``fast_path`` is ``yes``, ``no``, ``unknown`` or
    ``not-applicable``.

    ``yes``: the gated-delta-rule call went to a kernel package's function
    (causal-conv1d adds a smaller gain); ``no``: it went to transformers'
    reference loop; ``unknown``: the probe could not run (the reason is
    logged); ``not-applicable``: no linear-attention layer. ``kernels_found``
    names the packages whose functions ran, ``kernels_missing`` the parts
    that ran their reference implementation (by the distribution that would
    replace it). ``implementations`` lists ``module.function`` of what ran.
    """

    fast_path: str
    kernels_found: list[str] = field(default_factory=list)
    kernels_missing: list[str] = field(default_factory=list)
    linear_attention_layers: int = 0
    implementations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"fast_path": self.fast_path, "kernels_found": list(self.kernels_found),
                "kernels_missing": list(self.kernels_missing),
                "linear_attention_layers": self.linear_attention_layers,
                "implementations": list(self.implementations)}


def linear_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The gated-delta-rule (linear-attention) layers of ``model``, in module order."""
    return [m for m in model.modules() if "GatedDeltaNet" in type(m).__name__]


@contextlib.contextmanager
def _recorded_calls() -> Iterator[list[tuple[str, str]]]:
    """``(module, function)`` of every Python and C function entered in this thread within the block."""
    calls: list[tuple[str, str]] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            calls.append((str(frame.f_globals.get("__name__", "")), frame.f_code.co_name))
        elif event == "c_call":
            calls.append((str(getattr(arg, "__module__", None) or ""), str(getattr(arg, "__name__", ""))))

    with _PROFILE_LOCK:
        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            yield calls
        finally:
            sys.setprofile(previous)


def _is_reference(module: str) -> bool:
    return module.split(".", 1)[0] in _REFERENCE_PACKAGES


def _probe_layer(layer: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``layer`` itself when its weights are real, else a copy on ``device`` with zero weights."""
    params = list(layer.parameters()) + list(layer.buffers())
    if params and not any(p.device.type == "meta" for p in params):
        return layer
    probe = copy.deepcopy(layer)
    hook = getattr(probe, "_hf_hook", None)
    if hook is not None:  # an offloaded block of a device-mapped model: probe the plain module
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(probe, recurse=True)
    probe = probe.to_empty(device=device)
    with torch.no_grad():
        for tensor in [*probe.parameters(), *probe.buffers()]:
            tensor.zero_()
    return probe


def _hidden_size(layer: torch.nn.Module) -> int:
    size = getattr(layer, "hidden_size", None)
    if isinstance(size, int):
        return size
    first = next((m for m in layer.modules() if isinstance(m, torch.nn.Linear)), None)
    if first is None:
        raise ValueError(f"{type(layer).__name__}: cannot tell its input width")
    return int(first.in_features)


def linear_attention_fast_path(model: torch.nn.Module, device: str | torch.device = "cpu") -> FastPath:
    """Run one linear-attention layer of ``model`` on a few tokens and report which implementations ran.

    ``device`` is where the model runs (used for a weight-less skeleton, whose
    layer is probed as a zero-weight copy there; a loaded layer is probed where
    it is). Works on any architecture whose linear-attention layer class
    name contains ``GatedDeltaNet``.
    """
    layers = linear_attention_layers(model)
    if not layers:
        return FastPath(fast_path="not-applicable")
    layer = layers[0]
    try:
        probe = _probe_layer(layer, device)
        param = next(probe.parameters())
        hidden = torch.zeros(1, _PROBE_TOKENS, _hidden_size(probe), dtype=param.dtype, device=param.device)
        with torch.inference_mode(), _recorded_calls() as calls:
            probe(hidden)
    except Exception as exc:  # noqa: BLE001 - the status says it could not tell; the forward reports its own error
        log.warning("linear-attention fast path: the probe of %s failed (%s: %s)",
                    type(layer).__name__, type(exc).__name__, exc)
        return FastPath(fast_path="unknown", linear_attention_layers=len(layers))

    external: dict[str, set[str]] = {part: set() for part in _KERNELS}
    reference = {part: False for part in _KERNELS}
    ran: dict[str, None] = {}
    for module, name in calls:
        for part in _KERNELS:
            if part in name:
                ran[f"{module}.{name}"] = None
                if _is_reference(module):
                    reference[part] = True
                else:
                    root = module.split(".", 1)[0]
                    external[part].add(_DISTRIBUTIONS.get(root, root))
    found = sorted(set().union(*external.values()))
    # A part whose call reached a kernel package is not missing, though transformers' wrapper ran first.
    missing = sorted(dist for part, dist in _KERNELS.items() if reference[part] and not external[part])
    if external[_DECISIVE]:
        status = "yes"
    elif reference[_DECISIVE]:
        status = "no"
    else:
        log.warning("linear-attention fast path: %s called no gated-delta-rule function this probe recognises",
                    type(layer).__name__)
        status = "unknown"
    return FastPath(fast_path=status, kernels_found=found, kernels_missing=missing,
                    linear_attention_layers=len(layers), implementations=list(ran))
