"""Paths of the bundled sample data (package data under ``amygdala_dagster/data``)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def _data_file(name: str) -> Path:
    return Path(str(importlib.resources.files("amygdala_dagster") / "data" / name))


def sample_graph_path() -> Path:
    """The bundled sample memory graph: 220 nodes, 16 emotions (JSONL, Contract 4 fields)."""
    return _data_file("sample_graph.jsonl")


def conversation_snippets_path() -> Path:
    """The bundled held-out conversation snippets (JSONL of ``{"id", "text"}``, no tags)."""
    return _data_file("conversation_snippets.jsonl")
