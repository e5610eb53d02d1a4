"""The memory snapshot: every node of the graph with its tag lines parsed, as one table.

One row per node, sorted by key. ``body`` is the text the model may see (the tag
block removed, Contract 1); ``scores`` holds the node's valid tags sorted by
emotion. The table is stored as Parquet; :func:`snapshot_hash` is its content
hash, which is the same for equal graphs whatever order the nodes came in.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from amygdala_dagster.files.atomic import atomic_write_bytes
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.tags import parse_tags

SCORES_DTYPE = pl.List(pl.Struct({"emotion": pl.Utf8, "score": pl.Float64}))

SNAPSHOT_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "key": pl.Utf8,
    "node_type": pl.Utf8,
    "created_at": pl.Utf8,
    "updated_at": pl.Utf8,
    "body": pl.Utf8,
    "scores": SCORES_DTYPE,
    "n_malformed": pl.Int64,
    "content_sha256": pl.Utf8,
}

log = logging.getLogger(__name__)

# Bump when the meaning of the hash changes, so old data versions never match new ones.
_HASH_VERSION = "amygdala-snapshot-v1"


class SnapshotError(ValueError):
    """A snapshot table or file that cannot be used."""


def build_snapshot(nodes: Iterable[MemoryNode]) -> pl.DataFrame:
    """Parse every node's tags into one table (one row per node, sorted by key).

    Raises :class:`SnapshotError` on a key seen twice (sources dedupe keys via
    :func:`amygdala_dagster.graph.nodes.normalize_nodes`; a duplicate here is a bug upstream).
    """
    rows: dict[str, dict[str, Any]] = {}
    for node in nodes:
        key = _valid_utf8(node.key, node.key)
        if key in rows:
            raise SnapshotError(f"duplicate node key {key!r} in snapshot input")
        content = _valid_utf8(node.content, key)
        parsed = parse_tags(content)
        rows[key] = {
            "key": key,
            "node_type": _valid_utf8(node.node_type, key),
            "created_at": None if node.created_at is None else _valid_utf8(node.created_at, key),
            "updated_at": None if node.updated_at is None else _valid_utf8(node.updated_at, key),
            "body": parsed.body,
            "scores": [{"emotion": e, "score": float(s)} for e, s in sorted(parsed.scores.items())],
            "n_malformed": parsed.malformed,
            "content_sha256": hashlib.sha256(content.encode("utf-8")).hexdigest(),
        }
    ordered = [rows[k] for k in sorted(rows)]
    return pl.DataFrame(ordered, schema=SNAPSHOT_SCHEMA)


def _valid_utf8(text: str, key: str) -> str:
    """``text`` with lone surrogates (possible in JSON input, not storable) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        log.warning("node %r: replaced unpaired surrogate characters with U+FFFD", key)
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _check_schema(df: pl.DataFrame, what: str) -> None:
    missing = [c for c in SNAPSHOT_SCHEMA if c not in df.columns]
    if missing:
        raise SnapshotError(f"{what}: not a memory snapshot, missing column(s) {', '.join(missing)}")


def snapshot_hash(df: pl.DataFrame) -> str:
    """Content hash of a snapshot: sha256 over (key, node_type, content_sha256) of every row.

    Independent of row order, so equal graphs give equal hashes; used as the
    Dagster data version of the snapshot.
    """
    _check_schema(df, "snapshot_hash")
    h = hashlib.sha256(_HASH_VERSION.encode())
    rows = sorted(zip(df["key"].to_list(), df["node_type"].to_list(), df["content_sha256"].to_list()))
    for key, node_type, sha in rows:
        # JSON framing keeps the fields unambiguous whatever characters a key holds.
        h.update(json.dumps([key, node_type, sha], ensure_ascii=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_snapshot(df: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the snapshot as Parquet, atomically (a reader never sees a partial file)."""
    _check_schema(df, str(path))
    buf = io.BytesIO()
    df.select(list(SNAPSHOT_SCHEMA)).write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


def read_snapshot(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read a snapshot written by :func:`write_snapshot`."""
    path = Path(path)
    try:
        df = pl.read_parquet(path)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: snapshot file not found") from None
    except Exception as exc:  # polars raises several error types for a corrupt file
        raise SnapshotError(f"{path}: not a readable Parquet snapshot ({exc})") from exc
    _check_schema(df, str(path))
    return df.select(list(SNAPSHOT_SCHEMA))
