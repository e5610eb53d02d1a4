"""The named jobs (full refresh, emotion backfill), their asset selections and partition planning.

The sensor, `amygdala run` and `amygdala backfill-emotion` all launch these
jobs, so every run in the instance says what it was.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import dagster as dg
import polars as pl

from amygdala_dagster.graph.snapshot import build_snapshot
from amygdala_dagster.pipeline.assets.activations import activation_stats
from amygdala_dagster.pipeline.assets.common import EMOTIONS_TAG, OUTPUT_TAG, RANGE_END_TAG, RANGE_START_TAG
from amygdala_dagster.pipeline.assets.emotions import emotion_catalog, tagged_examples
from amygdala_dagster.pipeline.assets.evaluation import evaluation_report
from amygdala_dagster.pipeline.assets.graph import memory_snapshot
from amygdala_dagster.pipeline.assets.readout_pair import readout_manifest, readout_vectors
from amygdala_dagster.pipeline.assets.shards import activation_cache
from amygdala_dagster.pipeline.resources import MemoryGraphResource, SelectionResource
from amygdala_dagster.workflow.partitions import PartitionPlan, plan_partitions

UNPARTITIONED_HEAD = [memory_snapshot.key, emotion_catalog.key]
PARTITIONED = [tagged_examples.key, activation_stats.key]
#: The shard steps' asset: in a run only when the forward work is split (sharding.shards > 1).
SHARDED = [activation_cache.key]
ALL_EMOTION_TAIL = [readout_vectors.key, readout_manifest.key, evaluation_report.key]
REFRESH_KEYS = UNPARTITIONED_HEAD + PARTITIONED + ALL_EMOTION_TAIL

#: What every step process needs, imported once by the forkserver that the step processes fork from, so a step
#: starts in a fraction of a second instead of importing Dagster, polars and torch again (~5-20 s each): the
#: code location and the instance's storage (SQLite locally, PostgreSQL in a deployment; a module that is not
#: installed is skipped), whose imports (SQLAlchemy, alembic) cost each step ~0.6 s otherwise.
PRELOADED_MODULES = ["amygdala_dagster.pipeline.definitions", "dagster._core.storage.sqlite_storage",
                     "dagster._core.storage.local_compute_log_manager", "dagster_postgres"]


def _forkserver_config(config: dict) -> dict:
    return {**config, "start_method": {"forkserver": {"preload_modules": list(PRELOADED_MODULES)}}}


#: One process per step, as the UI and the daemon run a job, forked from a preloaded forkserver.
#: Run config: ``execution: {config: {max_concurrent: N}}`` (default: the CPU count).
LOCAL_EXECUTOR = dg.multiprocess_executor.configured(
    _forkserver_config, name="multiprocess",
    config_schema={"max_concurrent": dg.Field(dg.Noneable(int), is_required=False, default_value=None)},
)

REFRESH_JOB = "full_refresh"
BACKFILL_JOB = "emotion_backfill"
KIND_TAG = "amygdala/run"

#: Run retries (deploy/dagster.yaml: ``run_retries``, ``retry_on_asset_or_op_failure: false``): a run whose
#: worker died is re-executed from the failure, up to this many times; the new run's forward step reads
#: what the dead one had written to the activation cache. A step that fails on its own is not retried.
RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_strategy": "FROM_FAILURE"}

def build_jobs(shards: int = 1) -> list[dg.UnresolvedAssetJobDefinition]:
    """``full_refresh`` and ``emotion_backfill``; with ``shards > 1`` they include the shard steps
    (``activation_cache``), else the GPU step forwards everything itself (no planning step, one weight load)."""
    keys = with_shards(REFRESH_KEYS, shards)
    return [
        dg.define_asset_job(
            REFRESH_JOB, selection=dg.AssetSelection.assets(*keys), tags={KIND_TAG: "full-refresh", **RETRY_TAGS},
            description="The memory snapshot and everything downstream over every emotion partition, in one run "
                        "(the GPU step loads the model once). Launched by `amygdala run` and memory_graph_sensor.",
        ),
        dg.define_asset_job(
            BACKFILL_JOB, selection=dg.AssetSelection.assets(*keys),
            tags={KIND_TAG: "emotion-backfill", **RETRY_TAGS},
            description="New emotion partitions (a partition range) and the all-emotion readout, manifest and "
                        "report. Launched by `amygdala backfill-emotion`; starts from the snapshot only when none "
                        "is stored.",
        ),
    ]


def refresh_tags(partitions: Sequence[str], emotions: Sequence[str] | None = None,
                 output: str | None = None) -> dict[str, str]:
    """Run tags selecting ``partitions`` as one range (one run, one GPU step), naming the emotions the run
    publishes (default: ``partitions``) and the output it writes."""
    if not partitions:
        return {}
    tags = {RANGE_START_TAG: partitions[0], RANGE_END_TAG: partitions[-1],
            EMOTIONS_TAG: ",".join(emotions if emotions is not None else partitions)}
    if output:
        tags[OUTPUT_TAG] = output
    return tags


def with_shards(keys: Sequence[dg.AssetKey], shards: int) -> list[dg.AssetKey]:
    """``keys`` plus the shard steps' asset when the forward work is split and activation_stats is selected."""
    keys = list(keys)
    return keys + list(SHARDED) if int(shards) > 1 and activation_stats.key in keys else keys


def refresh_selection(partitions: Sequence[str], shards: int = 1) -> list[dg.AssetKey]:
    """The snapshot and its downstream (with the shard steps when ``shards > 1``); only the unpartitioned
    head when no emotion partition exists."""
    return with_shards(REFRESH_KEYS, shards) if partitions else list(UNPARTITIONED_HEAD)


def graph_catalog(memory: MemoryGraphResource, selection: SelectionResource) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(snapshot, catalog)`` of the graph as it is now."""
    nodes, _report = memory.source().fetch_nodes()
    snapshot = build_snapshot(nodes)
    return snapshot, selection.catalog(snapshot)


def plan_from_graph(memory: MemoryGraphResource, selection: SelectionResource,
                    existing: Sequence[str]) -> PartitionPlan:
    """:func:`~amygdala_dagster.workflow.partitions.plan_partitions` for the graph as it is now."""
    _snapshot, catalog = graph_catalog(memory, selection)
    return plan_partitions(catalog, existing, int(selection.min_positives), selection.curated)


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO"),
        "show_errors": dg.Field(bool, is_required=False, default_value=True,
                                description="False: leave ERROR events (failures, tracebacks) to the caller, "
                                            "which prints each cause once"),
    },
    description="Plain console lines for `amygdala run` / `backfill-emotion` "
                "(progress; failures summarised by the command).",
)
def cli_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    out = logging.Logger("amygdala", level=logging.getLevelName(str(config["log_level"]).upper()))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if not config["show_errors"]:
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    out.addHandler(handler)
    return out


LOGGERS = {"console": dg.colored_console_logger, "cli_console": cli_console}
# What the command line runs with: progress at INFO, each failure printed once by the command.
CLI_RUN_CONFIG = {"loggers": {"cli_console": {"config": {"log_level": "INFO", "show_errors": False}}}}
