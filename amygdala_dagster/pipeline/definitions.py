"""The code location: ``dagster dev`` (workspace.yaml) and ``dagster asset materialize -m`` load this module.

Resources default to the environment so the UI works with no configuration:
``AMYGDALA_MEMORY_MCP_URL`` or ``AMYGDALA_MEMORY_FILE`` (default: the bundled
sample graph), ``AMYGDALA_MODEL`` (default: bundled MiniLM), ``AMYGDALA_DEVICE``,
``AMYGDALA_DTYPE``, ``AMYGDALA_TARGET_LAYERS``, ``AMYGDALA_DEVICE_MAP``, ``AMYGDALA_SHARDS``, ``AMYGDALA_OUTPUT_DIR`` (default
``./amygdala_output``; any fsspec URL works), ``AMYGDALA_CACHE_DIR``,
``AMYGDALA_EMOTIONS`` (curated emotions, comma-separated, always included). Every
field can also be set per run from the launchpad (``resources:`` in run config).
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from amygdala_dagster.pipeline.assets import ALL_ASSETS
from amygdala_dagster.pipeline.checks import ALL_CHECKS
from amygdala_dagster.pipeline.jobs import JOBS, LOGGERS
from amygdala_dagster.pipeline.k8s import deployment_executor
from amygdala_dagster.pipeline.resources import (
    ArtifactStorage, EvaluationResource, MemoryGraphResource, ModelResource, SelectionResource, ShardingResource,
    default_output_dir,
)
from amygdala_dagster.pipeline.sensors import memory_graph_sensor


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def default_resources() -> dict[str, Any]:
    """The resources, configured from ``AMYGDALA_*`` environment variables."""
    model_kwargs = {k: v for k, v in {
        "model": _env("AMYGDALA_MODEL"), "device": _env("AMYGDALA_DEVICE"), "dtype": _env("AMYGDALA_DTYPE"),
        "layers": _env("AMYGDALA_TARGET_LAYERS"), "cache_dir": _env("AMYGDALA_CACHE_DIR"),
        "device_map": _env("AMYGDALA_DEVICE_MAP"),
    }.items() if v is not None}
    shards = _env("AMYGDALA_SHARDS")
    return {
        # The token is read from $AMYGDALA_MEMORY_TOKEN (token_env) when the graph is contacted, in
        # whichever process does it (CLI, sensor, run worker): only the variable's name is config.
        "memory": MemoryGraphResource(mcp_url=_env("AMYGDALA_MEMORY_MCP_URL"), file=_env("AMYGDALA_MEMORY_FILE")),
        "model": ModelResource(**model_kwargs),
        "sharding": ShardingResource(**({"shards": shards} if shards is not None else {})),
        "storage": ArtifactStorage(base_path=default_output_dir()),
        "selection": SelectionResource(
            curated=[e.strip() for e in (_env("AMYGDALA_EMOTIONS") or "").split(",") if e.strip()]
        ),
        "evaluation": EvaluationResource(),
    }


def build_definitions(resources: dict[str, object] | None = None) -> dg.Definitions:
    """The Definitions with ``resources`` overriding the environment defaults (by key)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=JOBS,
        sensors=[memory_graph_sensor],
        loggers=LOGGERS,
        resources={**default_resources(), **(resources or {})},
        executor=deployment_executor(),
    )


defs = build_definitions()
