"""The memory-graph sensor against a real `amygdala serve-graph` whose file the test edits."""

from __future__ import annotations

import os
import time
import warnings

import dagster as dg
import pytest

from amygdala_dagster.pipeline import resources as R
from amygdala_dagster.pipeline.jobs import REFRESH_KEYS
from amygdala_dagster.pipeline.sensors import memory_graph_sensor
from amygdala_dagster_tests.pipeline_graphs import new_emotion_nodes, small_graph, write_graph

pytestmark = pytest.mark.slow  # a real server, polled / a webserver started

warnings.filterwarnings("ignore", category=dg.BetaWarning)


def tick(instance, server_url, cursor):
    resources = {
        "memory": R.MemoryGraphResource(mcp_url=server_url, retries=0, token_env=None),
        "selection": R.SelectionResource(min_positives=3),
        "sharding": R.ShardingResource(),
    }
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = memory_graph_sensor(context)
    if isinstance(result, dg.SensorResult):
        # what the daemon does with the result
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, dg.DeleteDynamicPartitionsRequest):
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
            else:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def rewrite(path, nodes):
    before = path.stat().st_mtime_ns
    write_graph(path, nodes)
    if path.stat().st_mtime_ns == before:  # same mtime tick: make the change visible to the server
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_sensor_runs_once_per_graph_change_adds_partitions_and_survives_outage(graph_server, tmp_path):
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(4))
    server = graph_server(file=graph)
    instance = dg.DagsterInstance.ephemeral()

    first = tick(instance, server.url, None)
    assert isinstance(first, dg.SensorResult) and len(first.run_requests) == 1
    run = first.run_requests[0]
    assert set(run.asset_selection) == set(REFRESH_KEYS)
    assert sorted(instance.get_dynamic_partitions("emotion")) == ["curiosity", "frustration", "warmth"]
    keys = instance.get_dynamic_partitions("emotion")
    assert run.tags["dagster/asset_partition_range_start"] == keys[0]
    assert run.tags["dagster/asset_partition_range_end"] == keys[-1]
    cursor = first.cursor

    # no change: no run
    same = tick(instance, server.url, cursor)
    assert isinstance(same, dg.SkipReason) and "unchanged" in same.skip_message

    # a new qualifying emotion: one run and a new partition, which the run covers
    rewrite(graph, small_graph(4) + new_emotion_nodes("joy", 4))
    deadline = time.monotonic() + 10
    changed = tick(instance, server.url, cursor)
    while isinstance(changed, dg.SkipReason) and time.monotonic() < deadline:
        time.sleep(0.2)
        changed = tick(instance, server.url, cursor)
    assert isinstance(changed, dg.SensorResult) and len(changed.run_requests) == 1
    assert [list(r.partition_keys) for r in changed.dynamic_partitions_requests] == [["joy"]]
    assert instance.get_dynamic_partitions("emotion")[-1] == "joy"
    assert changed.run_requests[0].tags["dagster/asset_partition_range_end"] == "joy"
    assert changed.cursor != cursor
    cursor = changed.cursor

    # a change that brings no new emotion: one run, no partition request
    rewrite(graph, small_graph(4) + new_emotion_nodes("joy", 5))
    deadline = time.monotonic() + 10
    edit = tick(instance, server.url, cursor)
    while isinstance(edit, dg.SkipReason) and time.monotonic() < deadline:
        time.sleep(0.2)
        edit = tick(instance, server.url, cursor)
    assert isinstance(edit, dg.SensorResult) and len(edit.run_requests) == 1
    assert not edit.dynamic_partitions_requests

    # an emotion that falls below the minimum of positives loses its partition (it would block the run)
    rewrite(graph, small_graph(4) + new_emotion_nodes("joy", 2))
    deadline = time.monotonic() + 10
    fewer = tick(instance, server.url, edit.cursor)
    while isinstance(fewer, dg.SkipReason) and time.monotonic() < deadline:
        time.sleep(0.2)
        fewer = tick(instance, server.url, edit.cursor)
    assert isinstance(fewer, dg.SensorResult) and len(fewer.run_requests) == 1
    assert "joy" not in instance.get_dynamic_partitions("emotion")
    assert fewer.run_requests[0].tags["dagster/asset_partition_range_end"] == \
        instance.get_dynamic_partitions("emotion")[-1]

    # server down: a skipped tick with a clear message, no exception, cursor kept
    server.stop()
    down = tick(instance, server.url, fewer.cursor)
    assert isinstance(down, dg.SkipReason)
    assert "unreachable" in down.skip_message and str(server.port) in down.skip_message
