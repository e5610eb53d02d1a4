"""The activation cache's shards: their bytes and where they live.

A shard is one safetensors file holding a float32 tensor ``activations`` ``[N, L, H]`` and, in its
metadata, the N text SHA-256s in row order and the SHA-256 of the tensor bytes; its name is derived
from both (:func:`shard_name`), so a shard is immutable and checked against its name and checksum
(:func:`decode_shard`). :class:`LocalShardStore` keeps shards in a local directory (memory-mapped reads,
temporary file + fsync + rename writes), :class:`FsspecShardStore` under any fsspec URL (one PUT per
shard). :class:`~amygdala_dagster.engine.cache.ActivationCache` indexes and reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from amygdala_dagster.files.atomic import atomic_write_bytes, atomic_write_text

#: Shards of format /1 carry no checksum: they are not read (their texts are forwarded again once).
CACHE_FORMAT = "amygdala-activation-cache/2"
TENSOR_NAME = "activations"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
DAMAGED_PREFIX = "damaged-"
#: Bytes of decoded shards kept in memory per cache on an object store (local shards are memory-mapped).
REMOTE_SHARD_MEMORY = 512 * 1024 * 1024
_HEADER_PROBE = 64 * 1024


class CacheError(RuntimeError):
    """The cache directory is inconsistent with what was asked of it."""


class DamagedShardError(CacheError):
    """A shard's bytes do not match its checksum (or its name)."""


# --------------------------------------------------------------------------- shard bytes


def shard_name(shas: Sequence[str], data_sha256: str) -> str:
    """The content-addressed file name of a shard holding ``shas`` with tensor bytes hashing to ``data_sha256``."""
    digest = hashlib.sha256((json.dumps(list(shas)) + data_sha256).encode("ascii")).hexdigest()[:32]
    return f"{SHARD_PREFIX}{digest}{SHARD_SUFFIX}"


def encode_shard(shas: Sequence[str], rows: np.ndarray, fingerprint_id_: str) -> tuple[str, bytes]:
    """``(name, safetensors bytes)`` of a shard holding ``rows`` ``[N, L, H]`` float32 under ``shas``."""
    data = np.ascontiguousarray(rows, dtype=np.float32)
    data_sha = hashlib.sha256(data.tobytes()).hexdigest()
    payload = st_save(
        {TENSOR_NAME: data},
        metadata={"format": CACHE_FORMAT, "fingerprint_id": fingerprint_id_, "shas": json.dumps(list(shas)),
                  "data_sha256": data_sha},
    )
    return shard_name(shas, data_sha), payload


@dataclass(frozen=True)
class _Header:
    shas: list[str]
    shape: tuple[int, int, int]
    data_sha256: str
    data_start: int  # offset of the tensor bytes in the file
    data_end: int


def _parse_header(prefix: bytes, name: str) -> _Header | int:
    """The shard header from the file's first bytes, or how many bytes are needed when ``prefix`` is short."""
    if len(prefix) < 8:
        return 8
    n: int = struct.unpack("<Q", prefix[:8])[0]
    if n > 256 * 1024 * 1024:
        raise ValueError(f"header length {n} is not plausible")
    if len(prefix) < 8 + n:
        return 8 + n
    header = json.loads(prefix[8:8 + n])
    meta = header.get("__metadata__") or {}
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {CACHE_FORMAT!r} (older shards carry no checksum)")
    tensor = header[TENSOR_NAME]
    shape = tuple(int(x) for x in tensor["shape"])
    shas = json.loads(meta["shas"])
    start, end = (int(x) for x in tensor["data_offsets"])
    if tensor.get("dtype") != "F32" or len(shape) != 3 or len(shas) != shape[0]:
        raise ValueError("not an activation-cache shard")
    if end - start != 4 * shape[0] * shape[1] * shape[2]:
        raise ValueError("tensor size does not match its shape")
    data_sha = str(meta["data_sha256"])
    if shard_name(shas, data_sha) != name:
        raise ValueError("its header does not match its content-addressed name")
    return _Header(shas=shas, shape=shape, data_sha256=data_sha, data_start=8 + n + start, data_end=8 + n + end)


def decode_shard(name: str, payload: bytes) -> tuple[list[str], np.ndarray]:
    """Check a whole shard file against its name and checksum; return ``(shas, rows [N, L, H])``.

    Raises :class:`DamagedShardError` saying what does not match.
    """
    try:
        header = _parse_header(payload, name)
        if isinstance(header, int):
            raise ValueError(f"{len(payload)} bytes, shorter than its header")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedShardError(str(exc)) from None
    data = payload[header.data_start:header.data_end]
    if len(payload) != header.data_end or len(data) != header.data_end - header.data_start:
        raise DamagedShardError(f"{len(payload)} bytes, expected {header.data_end}")
    if hashlib.sha256(data).hexdigest() != header.data_sha256:
        raise DamagedShardError(f"tensor bytes do not match their SHA-256 {header.data_sha256[:16]}...")
    rows = np.frombuffer(data, dtype="<f4").reshape(header.shape)
    return header.shas, rows


# --------------------------------------------------------------------------- where shards live


class LocalShardStore:
    """A cache directory on a local filesystem: memory-mapped reads, temp-file + fsync + rename writes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.location: Path | str = directory

    def makedirs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.directory / name, text)

    def list_shards(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"))

    def read_header(self, name: str) -> _Header:
        with open(self.directory / name, "rb") as fh:
            prefix = fh.read(_HEADER_PROBE)
            need = _parse_header(prefix, name)
            if isinstance(need, int):
                prefix += fh.read(need - len(prefix))
                need = _parse_header(prefix, name)
        if isinstance(need, int):
            raise ValueError("file shorter than its header")
        return need

    def read_all(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        with safe_open(str(self.directory / name), framework="numpy") as f:
            rows: np.ndarray = f.get_slice(TENSOR_NAME)[lo:hi]
            return rows

    def write(self, name: str, payload: bytes) -> None:
        atomic_write_bytes(self.directory / name, payload)

    def set_aside(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.directory / name, self.directory / f"{DAMAGED_PREFIX}{name}")


class FsspecShardStore:
    """A cache prefix on any fsspec filesystem (object stores: one PUT per shard is atomic)."""

    def __init__(self, url: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.location = self.fs.unstrip_protocol(self.root)
        self._decoded: OrderedDict[str, np.ndarray] = OrderedDict()
        self._decoded_bytes = 0

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        try:
            data: bytes = self.fs.cat_file(self._path(name))
            return data.decode("utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.fs.pipe_file(self._path(name), text.encode("utf-8"))

    def list_shards(self) -> list[str]:
        self.fs.invalidate_cache(self.root)  # see shards that other writers added since the last listing
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if n.startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX))

    def read_header(self, name: str) -> _Header:
        prefix = self.fs.cat_file(self._path(name), start=0, end=_HEADER_PROBE)
        need = _parse_header(prefix, name)
        if isinstance(need, int):
            prefix = self.fs.cat_file(self._path(name), start=0, end=need)
            need = _parse_header(prefix, name)
        if isinstance(need, int):
            raise ValueError("file shorter than its header")
        return need

    def read_all(self, name: str) -> bytes:
        data: bytes = self.fs.cat_file(self._path(name))
        return data

    def remember(self, name: str, rows: np.ndarray) -> None:
        self._decoded[name] = rows
        self._decoded_bytes += rows.nbytes
        while self._decoded_bytes > REMOTE_SHARD_MEMORY and len(self._decoded) > 1:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= old.nbytes

    def read_rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        rows = self._decoded.get(name)
        if rows is None:
            _, rows = decode_shard(name, self.read_all(name))
            self.remember(name, rows)
        else:
            self._decoded.move_to_end(name)
        return rows[lo:hi]

    def write(self, name: str, payload: bytes) -> None:
        self.fs.pipe_file(self._path(name), payload)

    def set_aside(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.mv(self._path(name), self._path(f"{DAMAGED_PREFIX}{name}"))
