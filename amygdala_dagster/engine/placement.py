"""Device maps: one model spread over several devices (accelerate), as a user writes the map and as it is used.

No torch here: the settings check a map when it is given.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str | Mapping[str, Any] | None) -> str | dict[str, Any] | None:
    """A device map as a user writes it: None or ``""`` (one device), a strategy (``auto``,
    ``balanced``, ``balanced_low_0``, ``sequential``) or a JSON object ``{"module": device}``.

    Raises ``ValueError`` naming the setting for anything else.
    """
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    text = str(value).strip()
    if not text:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"device_map {text!r}: give one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object "
                         '{"module.path": device} (e.g. {"": "cuda:0"})')
    return parsed


def map_offloads_to_disk(device_map: str | Mapping[str, Any]) -> bool:
    return isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}


def offload_folder() -> str:
    folder = tempfile.mkdtemp(prefix="amygdala-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def map_device(value: object) -> str:
    """A device-map value as a device string (accelerate writes GPU indices as ints)."""
    return f"cuda:{value}" if isinstance(value, int) else str(value)
