"""The memory graph (observed source) and its snapshot."""


import time
from collections import Counter

import dagster as dg
import polars as pl

from amygdala_dagster.graph.snapshot import build_snapshot, read_snapshot, snapshot_hash, write_snapshot
from amygdala_dagster.pipeline.assets.common import GROUP, file_meta, table
from amygdala_dagster.pipeline.checks import SNAPSHOT_CHECKS, check_result, snapshot_problems
from amygdala_dagster.pipeline.resources import ArtifactStorage, MemoryGraphResource
from amygdala_dagster.workflow.layout import SNAPSHOT_FILE


@dg.observable_source_asset(
    group_name=GROUP,
    description="The memory graph (MCP server or JSONL export); data version = its graph_version.",
)
def memory_graph(memory: MemoryGraphResource) -> dg.ObserveResult:
    version = memory.source().graph_version()
    return dg.ObserveResult(
        data_version=dg.DataVersion(version.version),
        metadata={"node_count": version.node_count, "source": memory.description},
    )


@dg.asset(
    group_name=GROUP,
    deps=[memory_graph],
    code_version="1",
    kinds={"polars", "parquet"},
    check_specs=SNAPSHOT_CHECKS,
    description="Every node of the memory graph with its tag lines parsed (one Parquet table).",
)
def memory_snapshot(
    context: dg.AssetExecutionContext, memory: MemoryGraphResource, storage: ArtifactStorage
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    source = memory.source()
    context.log.info(f"reading the memory graph from {memory.description}")
    nodes, report = source.fetch_nodes(progress=lambda n: context.log.debug(f"{n} nodes read"))
    version = report.version or source.graph_version()  # the version the nodes were read from
    df = build_snapshot(nodes)
    digest = snapshot_hash(df)
    store = storage.store()
    with store.local_for_write(SNAPSHOT_FILE) as path:
        write_snapshot(df, path)
    types = Counter(df["node_type"].to_list())
    n_tagged = int(df.filter(df["scores"].list.len() > 0).height)
    context.log.info(f"snapshot: {df.height} nodes ({n_tagged} tagged), hash {digest[:12]}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(digest),
        check_results=[check_result(SNAPSHOT_CHECKS[0].name, snapshot_problems(df), metadata={"rows": df.height})],
        metadata={
            "dagster/row_count": df.height,
            "n_tagged": n_tagged,
            "n_skipped": report.n_skipped,
            "n_duplicate_keys": len(report.duplicate_keys),
            "n_malformed_tags": int(df["n_malformed"].sum()),
            "node_types": table([{"node_type": t, "nodes": n} for t, n in sorted(types.items())]),
            "snapshot_sha256": digest,
            "graph_version": version.version,
            "source": memory.description,
            "seconds": round(time.perf_counter() - t0, 3),
            **file_meta(store, SNAPSHOT_FILE),
        },
    )


def read_snapshot_from(storage: ArtifactStorage) -> pl.DataFrame:
    """The stored snapshot table."""
    store = storage.store()
    if not store.exists(SNAPSHOT_FILE):
        raise FileNotFoundError(f"{store.uri(SNAPSHOT_FILE)} does not exist: materialize memory_snapshot first")
    with store.local_for_read(SNAPSHOT_FILE) as path:
        return read_snapshot(path)


__all__ = ["memory_graph", "memory_snapshot", "read_snapshot_from"]
