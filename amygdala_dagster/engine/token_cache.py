"""Per-token activations of a bounded sample of token sequences, per activation fingerprint.

The pooled cache (:mod:`.cache`) holds one ``[L, H]`` row per text; per-token
data is 40 KB per token at the seed's setting (27B, 4 layers, bf16), so it is
kept only for a bounded sample: the calibration texts (a token budget) and the
evaluation conversations. With it a new or retrained vector is calibrated and
evaluated per token without loading the model.

One safetensors file per sequence, ``root/tokens/<fingerprint id>/<key[:2]>/<key>.safetensors``
(``key``: the SHA-256 of the token ids, :attr:`~amygdala_dagster.engine.inputs.Encoded.key`),
tensor ``h`` ``[T, L, H]`` in 16 bits: the model's own dtype for a bf16/fp16 model (exact),
float16 for a float32 one. Files are written atomically and never changed. :meth:`TokenCache.prune`
removes the files no current sample uses once they are older than a day, so the store stays
near the size of the samples in use while a concurrent run's fresh files are never removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from amygdala_dagster.engine.cache import cache_location, fingerprint_id
from amygdala_dagster.files.atomic import atomic_write_bytes
from amygdala_dagster.files.storage import Store

log = logging.getLogger(__name__)

TOKEN_CACHE_FORMAT = "amygdala-token-activations/2"
#: Unused files younger than this are kept: they may belong to a run still going on.
PRUNE_MIN_AGE_S = 24 * 3600
_TORCH_16 = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def bytes_per_token(n_layers: int, hidden_size: int) -> int:
    """What one token of one sequence costs here: 16-bit values at every hooked layer."""
    return 2 * int(n_layers) * int(hidden_size)


class TokenCache:
    """Per-token activations ``[T, L, H]`` of token sequences for one activation fingerprint (see the module)."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: Mapping[str, Any], dtype: str = "float32") -> None:
        self.fingerprint_id = fingerprint_id(fingerprint)
        # A path or an fsspec URL (s3://...), like the pooled cache beside it.
        self.store = Store(f"{cache_location(root)}/tokens/{self.fingerprint_id}")
        self.dtype = _TORCH_16.get(str(dtype), torch.float16)

    @staticmethod
    def _rel(key: str) -> str:
        return f"{key[:2]}/{key}.safetensors"

    @property
    def location(self) -> str:
        return self.store.uri("")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.store.exists(self._rel(key))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The distinct ``keys`` not stored yet, in first-seen order."""
        return [k for k in dict.fromkeys(keys) if k not in self]

    def get(self, key: str) -> np.ndarray:
        """``[T, L, H]`` float32 of the sequence ``key``; KeyError naming it when absent."""
        try:
            data = self.store.read_bytes(self._rel(key))
        except FileNotFoundError:
            raise KeyError(f"per-token activations of sequence {key[:16]}... are not in {self.location}: "
                           "materialize activation_stats again to forward it") from None
        return st_load(data)["h"].float().numpy()

    def put(self, key: str, hidden: torch.Tensor | np.ndarray) -> None:
        """Store ``hidden`` ``[T, L, H]`` under ``key`` (16 bits; written once, atomically)."""
        tensor = torch.as_tensor(hidden).detach().to("cpu", self.dtype).contiguous()
        if tensor.ndim != 3:
            raise ValueError(f"per-token activations must be [T, L, H], got shape {tuple(tensor.shape)}")
        data = st_save({"h": tensor}, metadata={"format": TOKEN_CACHE_FORMAT, "key": key})
        with self.store.local_for_write(self._rel(key)) as path:  # local: the file itself; remote: uploaded
            atomic_write_bytes(path, data)

    def keys(self) -> dict[str, tuple[int, float]]:
        """``{key: (bytes, modified time)}`` of every stored sequence."""
        out: dict[str, tuple[int, float]] = {}
        root = self.store.root
        if not root.exists():
            return out
        for path in root.rglob("*.safetensors"):
            info = path.stat()
            out[path.name.removesuffix(".safetensors")] = (int(info.st_size), float(info.st_mtime))
        return out

    def nbytes(self) -> int:
        return sum(size for size, _ in self.keys().values())

    def prune(self, keep: Iterable[str], *, min_age_s: float = PRUNE_MIN_AGE_S, now: float | None = None) -> int:
        """Remove stored sequences not in ``keep`` and older than ``min_age_s``; returns the bytes freed."""
        keep = set(keep)
        now = time.time() if now is None else now
        freed = 0
        for key, (size, mtime) in self.keys().items():
            if key in keep or now - mtime < min_age_s:
                continue
            with contextlib.suppress(FileNotFoundError):
                self.store.path(self._rel(key)).unlink()
                freed += size
        if freed:
            log.info("per-token cache %s: removed %d bytes of sequences no sample uses", self.location, freed)
        return freed

