"""The code location: ``dagster dev`` (workspace.yaml) and ``dagster asset materialize -m`` load this module.

Resources default to the environment so the UI works with no configuration: every
``AMYGDALA_*`` variable of the README's Configuration table, read once by
:func:`amygdala_dagster.workflow.settings.current_settings` (memory graph, model, device, dtype, target
layers, device map, shards, output directory -- any fsspec URL --, activation cache, curated
emotions). A variable out of bounds stops the code location with one line naming it. Every
field can also be set per run from the launchpad (``resources:`` in run config).
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from amygdala_dagster.pipeline.assets import ALL_ASSETS
from amygdala_dagster.pipeline.jobs import LOCAL_EXECUTOR, LOGGERS, build_jobs
from amygdala_dagster.pipeline.k8s import deployment_executor
from amygdala_dagster.pipeline.resources import (
    ArtifactStorage,
    EvaluationResource,
    MemoryGraphResource,
    ModelResource,
    SelectionResource,
    ShardingResource,
)
from amygdala_dagster.pipeline.sensors import memory_graph_sensor
from amygdala_dagster.workflow.settings import current_settings


def default_resources() -> dict[str, Any]:
    """The resources, configured from the ``AMYGDALA_*`` environment.

    See :class:`~amygdala_dagster.workflow.settings.Settings`.
    """
    s = current_settings()
    return {
        # The token is read from $AMYGDALA_MEMORY_TOKEN (token_env) when the graph is contacted, in
        # whichever process does it (CLI, sensor, run worker): only the variable's name is config.
        "memory": MemoryGraphResource(mcp_url=s.memory_mcp_url, file=s.memory_file),
        "model": ModelResource(model=s.model, device=s.device, dtype=s.dtype, layers=s.target_layers,
                               cache_dir=s.cache_dir, device_map=s.device_map),
        "sharding": ShardingResource(shards=s.shards),
        "storage": ArtifactStorage(base_path=s.output_location()),
        "selection": SelectionResource(curated=list(s.emotions)),
        "evaluation": EvaluationResource(),
    }


def build_definitions(resources: dict[str, object] | None = None, shards: int | None = None) -> dg.Definitions:
    """The Definitions with ``resources`` overriding the environment defaults (by key); the jobs include the
    shard steps when ``shards`` (default ``$AMYGDALA_SHARDS``) is above 1."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=build_jobs(current_settings().shards if shards is None else shards),
        sensors=[memory_graph_sensor],
        loggers=LOGGERS,
        resources={**default_resources(), **(resources or {})},
        executor=deployment_executor() or LOCAL_EXECUTOR,
    )


defs = build_definitions()
