"""The memory-graph sensor: one refresh run when the graph's version changes.

Propagation is explicit here rather than declarative automation: the sensor
must add the `emotion` partitions of newly qualifying emotions (declarative
automation cannot create partitions), and it asks for ONE run covering the
snapshot, every emotion partition (as a partition range, so the GPU step loads
the model once) and the all-emotion assets. Automation conditions would
instead launch separate runs per asset/partition set and need the daemon's
asset-automation tick to be enabled.
"""


import os
from collections.abc import Sequence

import dagster as dg

from amygdala_dagster.pipeline.assets import (
    activation_stats, emotion_catalog, evaluation_report, memory_graph, memory_snapshot, readout_manifest,
    readout_vectors, tagged_examples,
)
from amygdala_dagster.pipeline.assets.common import EMOTION, RANGE_END_TAG, RANGE_START_TAG, emotion_partitions
from amygdala_dagster.pipeline.resources import MemoryGraphResource, SelectionResource

UNPARTITIONED_HEAD = [memory_snapshot.key, emotion_catalog.key]
PARTITIONED = [tagged_examples.key, activation_stats.key]
ALL_EMOTION_TAIL = [readout_vectors.key, readout_manifest.key, evaluation_report.key]
REFRESH_KEYS = UNPARTITIONED_HEAD + PARTITIONED + ALL_EMOTION_TAIL
DATA_VERSION_TAG = "dagster/data_version"


def sensor_interval_seconds() -> int:
    return int(os.environ.get("AMYGDALA_SENSOR_INTERVAL_S", "60"))


def qualifying_emotions_now(memory: MemoryGraphResource, selection: SelectionResource) -> list[str]:
    """Fetch the graph and return the emotions that qualify under ``selection`` (catalog rank order)."""
    return plan_partitions(memory, selection, [])[0]


def plan_partitions(
    memory: MemoryGraphResource, selection: SelectionResource, existing: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """``(new, dropped, partitions)`` for the graph as it is now.

    ``new``: qualifying emotions without a partition yet. ``dropped``: existing
    partitions that now have fewer positives than ``selection.min_positives``
    (and are not curated): they would fail the blocking min-positives check and
    hold back every other emotion's refresh. ``partitions``: what remains, in order.
    """
    from amygdala_dagster.examples import qualifying_emotions
    from amygdala_dagster.snapshot import build_snapshot

    nodes, _report = memory.source().fetch_nodes()
    catalog = selection.catalog(build_snapshot(nodes))
    qualifying = qualifying_emotions(catalog)
    positives = dict(zip(catalog["emotion"].to_list(), catalog["n_positive"].to_list()))
    curated = set(selection.curated)
    dropped = [e for e in existing if e not in curated and positives.get(e, 0) < int(selection.min_positives)]
    new = [e for e in qualifying if e not in existing]
    partitions = [e for e in existing if e not in dropped] + new
    return new, dropped, partitions


def refresh_tags(partitions: Sequence[str]) -> dict[str, str]:
    """Run tags selecting every emotion partition as one range (one run, one GPU step)."""
    if not partitions:
        return {}
    return {RANGE_START_TAG: partitions[0], RANGE_END_TAG: partitions[-1]}


def refresh_selection(partitions: Sequence[str]) -> list[dg.AssetKey]:
    """The snapshot and its downstream; only the unpartitioned head when no emotion partition exists."""
    return list(REFRESH_KEYS) if partitions else list(UNPARTITIONED_HEAD)


@dg.sensor(
    name="memory_graph_sensor",
    minimum_interval_seconds=sensor_interval_seconds(),
    target=REFRESH_KEYS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=(
        "Polls the memory graph's graph_version (cursor = last version seen). On a change: registers "
        "newly qualifying emotions as partitions and requests ONE run of the snapshot and everything "
        "downstream over all emotion partitions. Unreachable server: skipped tick."
    ),
)
def memory_graph_sensor(
    context: dg.SensorEvaluationContext, memory: MemoryGraphResource, selection: SelectionResource
) -> dg.SensorResult | dg.SkipReason:
    from amygdala_dagster.sources import MemoryGraphError

    try:
        version = memory.source().graph_version()
    except (MemoryGraphError, ValueError, OSError) as exc:
        return dg.SkipReason(f"memory graph {memory.description} unreachable: {exc}")
    if context.cursor == version.version:
        return dg.SkipReason(f"memory graph unchanged (version {version.version[:16]}, {version.node_count} nodes)")
    existing = emotion_partitions(context.instance)
    try:
        new, dropped, partitions = plan_partitions(memory, selection, existing)
    except (MemoryGraphError, ValueError, OSError) as exc:
        return dg.SkipReason(f"memory graph {memory.description} changed but could not be read: {exc}")
    context.log.info(
        f"memory graph version {version.version[:16]} ({version.node_count} nodes); "
        f"new emotion partitions: {', '.join(new) or 'none'}; dropped: {', '.join(dropped) or 'none'}"
    )
    requests = []
    if dropped:
        requests.append(EMOTION.build_delete_request(dropped))
    if new:
        requests.append(EMOTION.build_add_request(new))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"memory-graph-{version.version}",
                asset_selection=refresh_selection(partitions),
                tags={**refresh_tags(partitions), "amygdala/graph_version": version.version},
            )
        ],
        dynamic_partitions_requests=requests,
        asset_events=[
            dg.AssetObservation(
                asset_key=memory_graph.key,
                metadata={"node_count": version.node_count},
                tags={DATA_VERSION_TAG: version.version},
            )
        ],
        cursor=version.version,
    )
