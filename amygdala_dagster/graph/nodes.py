"""The memory-graph node record (Contract 4), its normalisation, and what every source shares (error, progress)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: Told the number of nodes read so far (its result is ignored).
Progress = Callable[[int], object]


class MemoryGraphError(RuntimeError):
    """The memory graph could not be read; the message names the URL or file and what failed."""


class GraphVersion(NamedTuple):
    """What ``graph_version()`` answers (Contract 4): an opaque version string and the node count."""

    version: str
    node_count: int


@dataclass(frozen=True)
class MemoryNode:
    key: str
    node_type: str
    content: str
    created_at: str | None = None
    updated_at: str | None = None


@dataclass
class NormalizeReport:
    """What :func:`normalize_nodes` dropped or merged, for logs and metadata."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    duplicate_keys: list[str] = field(default_factory=list)
    version: GraphVersion | None = None
    """The graph version every node was read from, when the source knows it."""

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _scalar(raw: Mapping[str, Any], name: str, numbers: bool) -> str | None:
    """``raw[name]`` as text: a string (or, with ``numbers``, an int or float) or None; TypeError otherwise.

    Containers are refused rather than turned into text: a deeply nested one
    would raise RecursionError in ``str()`` and means the node is malformed.
    """
    value = raw.get(name)
    if value is None or isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{name!r} is {type(value).__name__}, not a string")


def node_from_mapping(raw: object) -> MemoryNode | str:
    """A :class:`MemoryNode` from a raw mapping, or the reason it is unusable."""
    if not isinstance(raw, Mapping):
        return f"not an object ({type(raw).__name__})"
    try:
        key = _scalar(raw, "key", numbers=True)
        node_type = _scalar(raw, "node_type", numbers=False)
        created_at = _scalar(raw, "created_at", numbers=True)
        updated_at = _scalar(raw, "updated_at", numbers=True)
    except TypeError as exc:
        return str(exc)
    if key is None or not key.strip():
        return "missing 'key'"
    if "content" not in raw or raw["content"] is None:
        return "missing 'content'"
    if not isinstance(raw["content"], str):
        return f"'content' is {type(raw['content']).__name__}, not a string"
    return MemoryNode(
        key=key, node_type=node_type or "unknown", content=raw["content"], created_at=created_at, updated_at=updated_at
    )


def _key_for_message(raw: Any) -> str | None:
    key = raw.get("key") if isinstance(raw, Mapping) else None
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str):
        return None
    return repr(key) if len(key) <= 80 else f"{key[:80]!r}..."


def normalize_nodes(
    raws: Iterable[tuple[str, Any]], source: str
) -> tuple[list[MemoryNode], NormalizeReport]:
    """Validate raw nodes and resolve duplicate keys.

    ``raws`` yields ``(where, raw)`` pairs; ``where`` names the place a raw node
    came from (``file.jsonl:12``, ``page 3``) so warnings can point at it.
    Unusable nodes are skipped, counted and named in one warning; a key seen
    twice keeps the node with the newer ``updated_at`` (the later one on a tie).
    The result is sorted by key, so every source yields the same order.
    """
    report = NormalizeReport()
    by_key: dict[str, MemoryNode] = {}
    for where, raw in raws:
        node = node_from_mapping(raw)
        if isinstance(node, str):
            key = _key_for_message(raw)
            report.skipped.append((where if key is None else f"{where} (key {key})", node))
            continue
        old = by_key.get(node.key)
        if old is not None:
            report.duplicate_keys.append(node.key)
            if (old.updated_at or "") > (node.updated_at or ""):
                continue
        by_key[node.key] = node
    if report.skipped:
        shown = "; ".join(f"{w}: {why}" for w, why in report.skipped[:10])
        more = f" (and {report.n_skipped - 10} more)" if report.n_skipped > 10 else ""
        log.warning("%s: skipped %d unusable node(s): %s%s", source, report.n_skipped, shown, more)
    if report.duplicate_keys:
        dups = sorted(set(report.duplicate_keys))
        log.warning(
            "%s: %d duplicate key(s), kept the newest updated_at: %s",
            source, len(dups), ", ".join(dups[:10]) + (" ..." if len(dups) > 10 else ""),
        )
    return [by_key[k] for k in sorted(by_key)], report
