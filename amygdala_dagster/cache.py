"""Content-addressed cache of pooled activations, keyed by text SHA-256.

Layout::

    root/<fingerprint_id>/fingerprint.json     the engine fingerprint (model, revision,
                                               dtype, layers, pooling, max tokens ...)
    root/<fingerprint_id>/shard-<id>.safetensors

Each shard holds one float32 tensor ``activations`` of shape ``[N, L, H]`` (one
pooled activation per text and hooked layer) and, in the safetensors metadata,
the N text SHA-256s in row order. Shards are immutable and written atomically
(temporary file, fsync, rename), so a run killed at any moment leaves only
complete shards behind and the next run resumes from them: the index
(sha -> shard, row) is rebuilt on open from the shard headers alone (no tensor
data is read). There is no separate index file that could disagree with the
shards. Never pickle: safetensors and JSON only.

A text is forwarded through the model at most once per fingerprint;
:func:`ensure_cached` forwards only the texts the cache does not hold yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save

from amygdala_dagster.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = "amygdala-activation-cache/1"
DEFAULT_SHARD_SIZE = 256
TENSOR_NAME = "activations"


def text_sha256(text: str) -> str:
    """Hex SHA-256 of the UTF-8 text: the cache key of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    """A short stable id for a fingerprint dict (hash of its canonical JSON)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$AMYGDALA_CACHE_DIR`` or ``~/.cache/amygdala/activations``."""
    env = os.environ.get("AMYGDALA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "amygdala" / "activations"


def reject_empty_texts(texts: Sequence[str], keys: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming ``keys[i]`` (or the index) for the first empty or blank text."""
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            who = f"example {keys[i]!r}" if keys is not None else f"text #{i}"
            raise ValueError(f"{who}: empty text (blank or whitespace only); nothing to forward through the model")


class CacheError(RuntimeError):
    """The cache directory is inconsistent with what was asked of it."""


class ActivationCache:
    """Pooled activations ``[L, H]`` per text for one engine fingerprint.

    ``add`` buffers rows in memory and writes a shard each time ``shard_size``
    rows are pending; call ``flush`` (or use the cache as a context manager) to
    write the remainder. Reads (``get``/``iter_chunks``) see both the shards and
    the pending buffer.
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
        self.root = Path(root).expanduser()
        self.fingerprint = dict(fingerprint)
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self.directory = self.root / self.fingerprint_id
        self.shard_size = int(shard_size)
        self._index: dict[str, tuple[Path, int]] = {}
        self._shape: tuple[int, int] | None = None  # (L, H)
        self._pending_shas: list[str] = []
        self._pending_rows: list[np.ndarray] = []
        self._pending_pos: dict[str, int] = {}
        self.shards_written = 0
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fp_file = self.directory / "fingerprint.json"
        canonical = json.loads(json.dumps(self.fingerprint, sort_keys=True, default=str))
        if fp_file.exists():
            try:
                stored = json.loads(fp_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise CacheError(f"{fp_file}: unreadable fingerprint ({exc})") from exc
            if stored != canonical:
                raise CacheError(
                    f"{fp_file}: stored fingerprint differs from this engine's fingerprint "
                    f"(same id {self.fingerprint_id}); refusing to mix activations"
                )
        else:
            atomic_write_text(fp_file, json.dumps(canonical, sort_keys=True, indent=2) + "\n")
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="numpy") as f:
                    meta = f.metadata() or {}
                    shape = f.get_slice(TENSOR_NAME).get_shape()
                shas = json.loads(meta["shas"])
                if meta.get("format") != CACHE_FORMAT or len(shape) != 3 or len(shas) != shape[0]:
                    raise ValueError("not an activation-cache shard")
            except Exception as exc:  # noqa: BLE001 - a damaged shard only costs a re-forward
                log.warning("activation cache: ignoring unreadable shard %s (%s)", shard, exc)
                continue
            lh = (int(shape[1]), int(shape[2]))
            if self._shape is None:
                self._shape = lh
            elif lh != self._shape:
                log.warning("activation cache: ignoring shard %s with shape %s != %s", shard, lh, self._shape)
                continue
            for row, sha in enumerate(shas):
                self._index.setdefault(sha, (shard, row))

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

    # ------------------------------------------------------------------ writing
    def add(self, shas: Sequence[str], acts: Any) -> None:
        """Store rows ``acts[i]`` (``[N, L, H]``, numpy or torch) under ``shas[i]``.

        Rows already stored are ignored. Writes a shard whenever ``shard_size``
        rows are pending.
        """
        if hasattr(acts, "detach"):  # torch tensor
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
        data = np.ascontiguousarray(np.stack(self._pending_rows).astype(np.float32, copy=False))
        name_hash = hashlib.sha256("\n".join(shas).encode("ascii")).hexdigest()[:24]
        path = self.directory / f"shard-{name_hash}.safetensors"
        payload = st_save(
            {TENSOR_NAME: data},
            metadata={"format": CACHE_FORMAT, "fingerprint_id": self.fingerprint_id, "shas": json.dumps(shas)},
        )
        atomic_write_bytes(path, payload)
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (path, row))
        self._pending_shas, self._pending_rows, self._pending_pos = [], [], {}
        self.shards_written += 1
        log.debug("activation cache: wrote %s (%d rows)", path.name, len(shas))

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    # ------------------------------------------------------------------ reading
    def get(self, shas: Sequence[str]) -> np.ndarray:
        """Activations ``[N, L, H]`` float32 for ``shas`` (in that order).

        Reads only the shards that hold the requested rows, and from each only
        the row range it needs (memory-mapped via ``safe_open``). Raises
        ``KeyError`` naming the first sha not in the cache.
        """
        if self._shape is None:
            if shas:
                raise KeyError(f"text sha {shas[0]} is not in the activation cache (cache is empty)")
            return np.zeros((0, 0, 0), dtype=np.float32)
        out = np.empty((len(shas), *self._shape), dtype=np.float32)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
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
        for shard, wanted in by_shard.items():
            rows = [r for _, r in wanted]
            lo, hi = min(rows), max(rows) + 1
            with safe_open(str(shard), framework="numpy") as f:
                block = f.get_slice(TENSOR_NAME)[lo:hi]
            for i, row in wanted:
                out[i] = block[row - lo]
        return out

    def iter_chunks(self, shas: Sequence[str], chunk_size: int = DEFAULT_SHARD_SIZE) -> Iterator[np.ndarray]:
        """``get`` in successive chunks of at most ``chunk_size`` rows (bounded memory)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        for start in range(0, len(shas), chunk_size):
            yield self.get(shas[start : start + chunk_size])


@dataclass
class CacheRunStats:
    """What one :func:`ensure_cached` call did."""

    texts_total: int
    unique_texts: int
    forwarded: int
    cached: int
    tokens: int
    truncated: int
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int | None
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stat(engine: Any, name: str, default: Any = 0) -> Any:
    stats = getattr(engine, "stats", None)
    return getattr(stats, name, default) if stats is not None else default


def ensure_cached(
    engine: Any,
    cache: ActivationCache,
    texts: Sequence[str],
    *,
    keys: Sequence[str] | None = None,
    progress: bool = True,
) -> CacheRunStats:
    """Make sure every text in ``texts`` has its pooled activations in ``cache``.

    Texts are deduplicated by SHA-256 and only those the cache lacks are
    forwarded through ``engine.forward``; results are added as they stream out
    and shards are written as they fill, so memory stays around one shard and a
    killed run resumes from the shards already written. ``keys`` (parallel to
    ``texts``) name the examples in errors; an empty text is refused.
    """
    if keys is not None and len(keys) != len(texts):
        raise ValueError(f"ensure_cached: {len(keys)} keys for {len(texts)} texts")
    reject_empty_texts(texts, keys)
    shas = [text_sha256(t) for t in texts]
    first: dict[str, int] = {}
    for i, sha in enumerate(shas):
        first.setdefault(sha, i)
    todo = cache.missing(list(first))
    todo_texts = [texts[first[s]] for s in todo]
    todo_keys = [keys[first[s]] for s in todo] if keys is not None else None

    tokens0 = int(_stat(engine, "tokens", 0) or 0)
    trunc0 = int(_stat(engine, "truncated", 0) or 0)
    # A lazy engine loads its weights inside forward(); that time is not forwarding time.
    load0 = float(_stat(engine, "load_seconds", 0.0) or 0.0)
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), unit="text", desc="forward", file=sys.stderr, dynamic_ncols=True)
    try:
        if todo:
            for indices, acts in engine.forward(todo_texts, keys=todo_keys):
                idx = [int(i) for i in indices]
                cache.add([todo[i] for i in idx], acts)
                if bar is not None:
                    bar.update(len(idx))
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    tok = int(_stat(engine, "tokens", 0) or 0) - tokens0
                    bar.set_postfix(tok_s=f"{tok / elapsed:,.0f}", refresh=False)
    finally:
        # Whatever was forwarded before an error is kept: the next run resumes from it.
        cache.flush()
        if bar is not None:
            bar.close()
    load_seconds = float(_stat(engine, "load_seconds", 0.0) or 0.0) - load0
    seconds = max(time.perf_counter() - t0 - load_seconds, 0.0) if todo else 0.0
    tokens = int(_stat(engine, "tokens", 0) or 0) - tokens0
    stats = CacheRunStats(
        texts_total=len(texts),
        unique_texts=len(first),
        forwarded=len(todo),
        cached=len(first) - len(todo),
        tokens=tokens,
        truncated=int(_stat(engine, "truncated", 0) or 0) - trunc0,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_bytes=_stat(engine, "peak_memory_bytes", None),
        device=str(_stat(engine, "device", "") or ""),
    )
    log.info(
        "activations: %d texts (%d unique): %d forwarded, %d from cache; %d tokens (%d truncated) in %.1fs "
        "(%.0f tokens/s) on %s",
        stats.texts_total, stats.unique_texts, stats.forwarded, stats.cached, stats.tokens,
        stats.truncated, stats.seconds, stats.tokens_per_s, stats.device or "?",
    )
    return stats
