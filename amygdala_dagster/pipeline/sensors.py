"""The memory-graph sensor: one refresh run when the graph's version changes.

Propagation is explicit here rather than declarative automation: the sensor
must add the `emotion` partitions of newly qualifying emotions (declarative
automation cannot create partitions), and it asks for ONE run covering the
snapshot, every emotion partition (as a partition range, so the GPU step loads
the model once) and the all-emotion assets. Automation conditions would
instead launch separate runs per asset/partition set and need the daemon's
asset-automation tick to be enabled.
"""


import dagster as dg

from amygdala_dagster.graph.nodes import MemoryGraphError
from amygdala_dagster.pipeline.assets.common import EMOTION, emotion_partitions
from amygdala_dagster.pipeline.assets.graph import memory_graph
from amygdala_dagster.pipeline.jobs import REFRESH_JOB, plan_from_graph, refresh_selection, refresh_tags
from amygdala_dagster.pipeline.resources import MemoryGraphResource, SelectionResource, ShardingResource
from amygdala_dagster.workflow.settings import current_settings

DATA_VERSION_TAG = "dagster/data_version"


def sensor_interval_seconds() -> int:
    """``$AMYGDALA_SENSOR_INTERVAL_S`` (default 60): the sensor's minimum interval, read when the code loads."""
    return current_settings().sensor_interval_s


@dg.sensor(
    name="memory_graph_sensor",
    minimum_interval_seconds=sensor_interval_seconds(),
    job_name=REFRESH_JOB,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description=(
        "Polls the memory graph's graph_version (cursor = last version seen). On a change: registers "
        "newly qualifying emotions as partitions and requests ONE run of the snapshot and everything "
        "downstream over all emotion partitions. Unreachable server: skipped tick."
    ),
)
def memory_graph_sensor(
    context: dg.SensorEvaluationContext, memory: MemoryGraphResource, selection: SelectionResource,
    sharding: ShardingResource,
) -> dg.SensorResult | dg.SkipReason:
    try:
        version = memory.source().graph_version()
    except (MemoryGraphError, ValueError, OSError) as exc:
        return dg.SkipReason(f"memory graph {memory.description} unreachable: {exc}")
    if context.cursor == version.version:
        return dg.SkipReason(f"memory graph unchanged (version {version.version[:16]}, {version.node_count} nodes)")
    existing = emotion_partitions(context.instance)
    try:
        plan = plan_from_graph(memory, selection, existing)
    except (MemoryGraphError, ValueError, OSError) as exc:
        return dg.SkipReason(f"memory graph {memory.description} changed but could not be read: {exc}")
    context.log.info(
        f"memory graph version {version.version[:16]} ({version.node_count} nodes); "
        f"new emotion partitions: {', '.join(plan.new) or 'none'}; "
        f"dropped: {'; '.join(f'{e} ({why})' for e, why in plan.dropped.items()) or 'none'}"
    )
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    removed = [e for e in plan.dropped if e in existing]
    if removed:
        requests.append(EMOTION.build_delete_request(removed))
    if plan.new:
        requests.append(EMOTION.build_add_request(plan.new))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"memory-graph-{version.version}",
                asset_selection=refresh_selection(plan.partitions, int(sharding.shards)),
                tags={**refresh_tags(plan.partitions), "amygdala/graph_version": version.version},
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
