"""Content-addressed cache of pooled activations, keyed by text SHA-256.

Layout (``root`` is a local directory or any fsspec URL, e.g. ``s3://bucket/cache``)::

    root/<fingerprint_id>/fingerprint.json     the engine fingerprint (model, revision,
                                               dtype, layers, pooling, max tokens ...)
    root/<fingerprint_id>/shard-<digest>.safetensors

Each shard (:mod:`.shard_store`) holds one float32 tensor ``activations`` of shape ``[N, L, H]`` (one
pooled activation per text and hooked layer) and, in the safetensors metadata,
the N text SHA-256s in row order and the SHA-256 of the tensor bytes. The
shard's name is derived from both (content-addressed), so every shard is
written once under a name no other content can have: shards are immutable,
written atomically (local: temporary file, fsync, rename; object stores: one
PUT), and several writers -- processes or pods forwarding different texts --
can fill one cache at once. There is no shared index file that two writers
could clobber: the index (sha -> shard, row) is built from the shard headers
alone (no tensor data is read) and :meth:`ActivationCache.refresh` picks up
shards written by others since.

A shard's bytes are checked against its checksum the first time they are
read (:meth:`ActivationCache.verify`, called by :func:`ensure_cached` before it
decides what to forward): a damaged shard is moved aside with a warning and
its texts are forwarded again, never read as silently wrong vectors. Never
pickle: safetensors and JSON only.

A text is forwarded through the model at most once per fingerprint;
:func:`amygdala_dagster.engine.forward.ensure_cached` forwards only the texts the cache does not hold yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from amygdala_dagster.engine.shard_store import (
    DAMAGED_PREFIX,
    CacheError,
    DamagedShardError,
    FsspecShardStore,
    LocalShardStore,
    decode_shard,
    encode_shard,
)
from amygdala_dagster.files.storage import is_local

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 256


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 text: the cache key of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    """A short stable id for a fingerprint dict (hash of its canonical JSON)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def layer_positions(cache: ActivationCache, layers: Sequence[int], what: str = "") -> list[int]:
    """Index of each of ``layers`` in the cache rows; ValueError (prefixed with ``what``) names missing layers."""
    prefix = f"{what}: " if what else ""
    cache_layers = cache.layers
    if cache_layers is None:
        raise ValueError(f"{prefix}activation cache {cache.directory}: its fingerprint records no layers")
    missing = [int(x) for x in layers if int(x) not in cache_layers]
    if missing:
        raise ValueError(f"{prefix}layers {missing} are not in the activation cache (it holds {cache_layers})")
    return [cache_layers.index(int(x)) for x in layers]


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an fsspec URL of a non-local filesystem (``s3://...``, ``memory://...``)."""
    return not is_local(location)


def cache_location(location: str | os.PathLike[str]) -> Path | str:
    """A cache root as given by a user: an fsspec URL stays a string (``Path`` would fold ``s3://`` into
    ``s3:/``); a path (or ``file://`` URL) becomes an expanded ``Path``."""
    text = os.fspath(location)
    if is_url(text):
        return text
    return Path(text.removeprefix("file://")).expanduser()


def reject_empty_texts(texts: Sequence[str], keys: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming ``keys[i]`` (or the index) for the first empty or blank text."""
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            who = f"example {keys[i]!r}" if keys is not None else f"text #{i}"
            raise ValueError(f"{who}: empty text (blank or whitespace only); nothing to forward through the model")


class ActivationCache:
    """Pooled activations ``[L, H]`` per text for one engine fingerprint.

    ``root`` is a local directory or an fsspec URL (``s3://bucket/cache``;
    credentials and endpoint from the filesystem's usual environment variables,
    e.g. ``AWS_ENDPOINT_URL``). ``add`` buffers rows in memory and writes a
    shard each time ``shard_size`` rows are pending; call ``flush`` (or use the
    cache as a context manager) to write the remainder. Reads (``get``/
    ``iter_chunks``) see both the shards and the pending buffer; a shard is
    checked against its checksum the first time its bytes are read.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fingerprint: Mapping[str, Any],
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.fingerprint = dict(fingerprint)
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self._store: LocalShardStore | FsspecShardStore
        if is_url(root):
            self.root: Path | str = os.fspath(root).rstrip("/")
            self._store = FsspecShardStore(f"{self.root}/{self.fingerprint_id}")
        else:
            self.root = Path(os.fspath(root).removeprefix("file://")).expanduser()
            self._store = LocalShardStore(self.root / self.fingerprint_id)
        #: The fingerprint's directory: a local Path, or a URL string on a remote filesystem.
        self.directory: Path | str = self._store.location
        self.shard_size = int(shard_size)
        self._index: dict[str, tuple[str, int]] = {}  # sha -> (shard name, row)
        self._shard_shas: dict[str, list[str]] = {}  # shard name -> its shas (indexed shards)
        self._seen: set[str] = set()  # shard names looked at (indexed, damaged or foreign)
        self._verified: set[str] = set()
        self._shape: tuple[int, int] | None = None  # (L, H)
        self._pending_shas: list[str] = []
        self._pending_rows: list[np.ndarray] = []
        self._pending_pos: dict[str, int] = {}
        self.shards_written = 0
        #: Shards found damaged (and set aside) by this cache object.
        self.damaged_shards: list[str] = []
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        self._store.makedirs()
        where = f"{self.directory}/fingerprint.json"
        canonical = json.loads(json.dumps(self.fingerprint, sort_keys=True, default=str))
        try:
            text = self._store.read_text("fingerprint.json")
            stored = json.loads(text) if text is not None else None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CacheError(f"{where}: unreadable fingerprint ({exc})") from exc
        if stored is None:
            # Concurrent writers of a new fingerprint write the same bytes; either rename/PUT wins.
            self._store.write_text("fingerprint.json", json.dumps(canonical, sort_keys=True, indent=2) + "\n")
        elif stored != canonical:
            raise CacheError(
                f"{where}: stored fingerprint differs from this engine's fingerprint "
                f"(same id {self.fingerprint_id}); refusing to mix activations"
            )
        self.refresh()

    def refresh(self) -> int:
        """Index the shards that appeared since the last look (written by other processes); returns how many."""
        added = 0
        for name in self._store.list_shards():
            if name in self._seen:
                continue
            self._seen.add(name)
            try:
                header = self._store.read_header(name)
            except Exception as exc:  # noqa: BLE001 - a damaged shard only costs a re-forward
                log.warning("activation cache: ignoring unreadable shard %s/%s (%s)", self.directory, name, exc)
                continue
            lh = (header.shape[1], header.shape[2])
            if self._shape is None:
                self._shape = lh
            elif lh != self._shape:
                log.warning("activation cache: ignoring shard %s with shape %s != %s", name, lh, self._shape)
                continue
            self._shard_shas[name] = header.shas
            for row, sha in enumerate(header.shas):
                self._index.setdefault(sha, (name, row))
            added += 1
        return added

    # ------------------------------------------------------------------ queries
    @property
    def layers(self) -> list[int] | None:
        """The hooked layers of the fingerprint, when it records them."""
        layers = self.fingerprint.get("layers")
        return [int(x) for x in layers] if layers is not None else None

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(n_layers, hidden_size)`` of a row, once anything is stored."""
        return self._shape

    def __len__(self) -> int:
        return len(self._index) + len(self._pending_pos)

    def __contains__(self, sha: object) -> bool:
        return sha in self._index or sha in self._pending_pos

    def missing(self, shas: Sequence[str]) -> list[str]:
        """The distinct ``shas`` not stored yet, in first-seen order."""
        seen: set[str] = set()
        out = []
        for sha in shas:
            if sha not in seen and sha not in self:
                out.append(sha)
            seen.add(sha)
        return out

    # ------------------------------------------------------------------ checking
    def verify(self, shas: Sequence[str] | None = None) -> list[str]:
        """Check the shards holding ``shas`` (all shards when None) against their checksums, once each.

        A damaged shard is set aside (renamed ``damaged-...``) with a warning
        and its texts leave the index, so :func:`ensure_cached` forwards them
        again. Returns the names of the damaged shards found.
        """
        if shas is None:
            names = list(self._shard_shas)
        else:
            names = list(dict.fromkeys(self._index[s][0] for s in shas if s in self._index))
        damaged = []
        for name in names:
            if name in self._verified or name not in self._shard_shas:
                continue
            try:
                _, rows = decode_shard(name, self._store.read_all(name))
                if isinstance(self._store, FsspecShardStore):
                    self._store.remember(name, rows)
            except DamagedShardError as exc:
                self._drop(name, str(exc))
                damaged.append(name)
                continue
            except FileNotFoundError:
                self._drop(name, "removed by someone else", set_aside=False)
                continue
            self._verified.add(name)
        return damaged

    def _drop(self, name: str, reason: str, *, set_aside: bool = True) -> None:
        shas = self._shard_shas.pop(name, [])
        for sha in shas:
            if self._index.get(sha, ("",))[0] == name:
                del self._index[sha]
        if set_aside:
            self.damaged_shards.append(name)
            log.warning("activation cache: shard %s/%s is damaged (%s); set aside as %s%s, its %d texts will be "
                        "forwarded again", self.directory, name, reason, DAMAGED_PREFIX, name, len(shas))
            self._store.set_aside(name)

    # ------------------------------------------------------------------ writing
    def add(self, shas: Sequence[str], acts: np.ndarray | torch.Tensor) -> None:
        """Store rows ``acts[i]`` (``[N, L, H]``, numpy or torch) under ``shas[i]``.

        Rows already stored are ignored. Writes a shard whenever ``shard_size``
        rows are pending.
        """
        if hasattr(acts, "detach"):  # torch tensor (torch is not imported here: the CPU steps never load it)
            acts = acts.detach().to("cpu").float().numpy()
        acts = np.asarray(acts, dtype=np.float32)
        if acts.ndim != 3 or acts.shape[0] != len(shas):
            raise ValueError(f"add: expected [{len(shas)}, L, H] activations, got shape {acts.shape}")
        lh = (int(acts.shape[1]), int(acts.shape[2]))
        if self._shape is None:
            self._shape = lh
        elif lh != self._shape:
            raise CacheError(f"add: rows of shape {lh} do not match the cache's {self._shape}")
        if not np.all(np.isfinite(acts)):
            bad = [s for s, a in zip(shas, acts) if not np.all(np.isfinite(a))]
            raise CacheError(f"add: non-finite activations for text sha {bad[0]} ({len(bad)} rows)")
        for sha, row in zip(shas, acts):
            if sha in self:
                continue
            self._pending_pos[sha] = len(self._pending_shas)
            self._pending_shas.append(sha)
            self._pending_rows.append(np.array(row, dtype=np.float32, copy=True))
            if len(self._pending_shas) >= self.shard_size:
                self._write_shard()

    def flush(self) -> None:
        """Write the pending rows (if any) as a shard."""
        if self._pending_shas:
            self._write_shard()

    def _write_shard(self) -> None:
        shas = self._pending_shas
        name, payload = encode_shard(shas, np.stack(self._pending_rows), self.fingerprint_id)
        self._store.write(name, payload)
        self._seen.add(name)
        self._verified.add(name)
        self._shard_shas[name] = list(shas)
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (name, row))
        self._pending_shas, self._pending_rows, self._pending_pos = [], [], {}
        self.shards_written += 1
        log.debug("activation cache: wrote %s (%d rows)", name, len(shas))

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    # ------------------------------------------------------------------ reading
    def get(self, shas: Sequence[str]) -> np.ndarray:
        """Activations ``[N, L, H]`` float32 for ``shas`` (in that order).

        Reads only the shards that hold the requested rows (local shards
        memory-mapped, and from each only the row range it needs, once it has
        been checked). A shard not checked yet is checked first; a damaged one
        raises :class:`DamagedShardError` (it is set aside: run
        :func:`ensure_cached` again to recompute its texts). Raises
        ``KeyError`` naming the first sha not in the cache.
        """
        if self._shape is None:
            if shas:
                raise KeyError(f"text sha {shas[0]} is not in the activation cache (cache is empty)")
            return np.zeros((0, 0, 0), dtype=np.float32)
        out = np.empty((len(shas), *self._shape), dtype=np.float32)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, sha in enumerate(shas):
            pos = self._pending_pos.get(sha)
            if pos is not None:
                out[i] = self._pending_rows[pos]
                continue
            try:
                shard, row = self._index[sha]
            except KeyError:
                raise KeyError(f"text sha {sha} is not in the activation cache {self.directory}") from None
            by_shard.setdefault(shard, []).append((i, row))
        if any(name not in self._verified for name in by_shard):
            damaged = self.verify([shas[wanted[0][0]] for wanted in by_shard.values()])
            if damaged:
                raise DamagedShardError(
                    f"activation cache {self.directory}: shard(s) {', '.join(damaged)} damaged (checksum mismatch); "
                    f"set aside -- run the activation step again to forward their texts"
                )
        for shard, wanted in by_shard.items():
            rows = [r for _, r in wanted]
            lo, hi = min(rows), max(rows) + 1
            block = self._store.read_rows(shard, lo, hi)
            for i, row in wanted:
                out[i] = block[row - lo]
        return out

    def iter_chunks(self, shas: Sequence[str], chunk_size: int = DEFAULT_SHARD_SIZE) -> Iterator[np.ndarray]:
        """``get`` in successive chunks of at most ``chunk_size`` rows (bounded memory)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        for start in range(0, len(shas), chunk_size):
            yield self.get(shas[start : start + chunk_size])
