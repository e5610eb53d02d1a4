"""Memory-graph sources (Contract 4): a JSONL export (:class:`JsonlSource`, here) or an MCP server
(:class:`~amygdala_dagster.graph.mcp_source.McpSource`), and :func:`open_source` to choose one.

Both sources return the shared :class:`~amygdala_dagster.graph.nodes.MemoryNode`
list (validated, de-duplicated, sorted by key) and a cheap
:class:`~amygdala_dagster.graph.nodes.GraphVersion` for change detection.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amygdala_dagster.files.jsonio import jsonl_values
from amygdala_dagster.graph.mcp_source import DEFAULT_MCP_URL, McpSource
from amygdala_dagster.graph.nodes import (
    GraphVersion,
    MemoryGraphError,
    MemoryNode,
    NormalizeReport,
    Progress,
    normalize_nodes,
)


def jsonl_graph_version(data: bytes) -> GraphVersion:
    """sha256 of a JSONL export's bytes and its number of non-blank lines."""
    count = sum(1 for line in data.splitlines() if line.strip())
    return GraphVersion(hashlib.sha256(data).hexdigest(), count)


class JsonlSource:
    """A JSONL export, one node object per line (blank lines ignored)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def description(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r})"

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise MemoryGraphError(f"memory graph file {self.path} does not exist") from None
        except OSError as exc:
            raise MemoryGraphError(f"cannot read memory graph file {self.path}: {exc.strerror or exc}") from exc

    def _raw_nodes(self, data: bytes, progress: Progress | None) -> Iterator[tuple[str, Any]]:
        n = 0
        for where, raw in jsonl_values(self.path, MemoryGraphError, data):
            yield where, raw
            n += 1
            if progress is not None and n % 100 == 0:
                progress(n)
        if progress is not None and n % 100:
            progress(n)

    def fetch_nodes(self, progress: Progress | None = None) -> tuple[list[MemoryNode], NormalizeReport]:
        """All usable nodes, sorted by key, and what was skipped or merged (``report.version``: the file's)."""
        data = self._read()
        nodes, report = normalize_nodes(self._raw_nodes(data, progress), self.description)
        report.version = jsonl_graph_version(data)
        return nodes, report

    def graph_version(self) -> GraphVersion:
        return jsonl_graph_version(self._read())


def open_source(
    memory_mcp_url: str | None = None, memory_file: str | os.PathLike[str] | None = None, **mcp_kwargs: Any
) -> JsonlSource | McpSource:
    """The source for the command-line flags ``--memory-mcp-url`` / ``--memory-file``.

    At most one may be given; with neither, the MCP server at :data:`DEFAULT_MCP_URL`.
    ``mcp_kwargs`` go to :class:`McpSource` and are ignored for a file.
    """
    if memory_mcp_url is not None and memory_file is not None:
        raise ValueError("give either --memory-mcp-url or --memory-file, not both")
    if memory_file is not None:
        return JsonlSource(memory_file)
    return McpSource(memory_mcp_url or DEFAULT_MCP_URL, **mcp_kwargs)
