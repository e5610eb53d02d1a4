"""Run the asset graph from the command line: the Dagster instance, `amygdala run` and backfills.

The runs go through Dagster (the named jobs of :mod:`~amygdala_dagster.pipeline.jobs`, executed
in process) so they are recorded in the instance and appear in ``dagster dev``. Instance
location: ``$DAGSTER_HOME`` when set; otherwise ``<repo>/.dagster_home`` configured by
``<repo>/.dagster_home`` when running from a source checkout (the directory holding dagster.yaml
and workspace.yaml next to the package), else ``./.dagster_home``; see :func:`get_instance`.

Before a run is launched the graph is read once to plan the emotion partitions, and a
plan that cannot train anything is refused with its cause (:class:`RunRefused`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

import amygdala_dagster
from amygdala_dagster.examples.selection import select_all
from amygdala_dagster.files.atomic import atomic_write_text
from amygdala_dagster.graph.nodes import GraphVersion
from amygdala_dagster.graph.tags import check_emotion_name
from amygdala_dagster.pipeline.assets.common import (
    EMOTION_PARTITIONS,
    EMOTIONS_TAG,
    GPU_POOL,
    OUTPUT_TAG,
    emotion_partitions,
)
from amygdala_dagster.pipeline.assets.graph import memory_graph, read_snapshot_from
from amygdala_dagster.pipeline.definitions import build_definitions
from amygdala_dagster.pipeline.instance import open_instance
from amygdala_dagster.pipeline.jobs import (
    ALL_EMOTION_TAIL,
    BACKFILL_JOB,
    CLI_RUN_CONFIG,
    KIND_TAG,
    PARTITIONED,
    REFRESH_JOB,
    UNPARTITIONED_HEAD,
    graph_catalog,
    refresh_selection,
    refresh_tags,
    with_shards,
)
from amygdala_dagster.pipeline.k8s import deployment_executor
from amygdala_dagster.pipeline.sensors import DATA_VERSION_TAG
from amygdala_dagster.workflow.layout import SNAPSHOT_FILE
from amygdala_dagster.workflow.partitions import (
    NotQualifiedError,
    PartitionPlan,
    collect_texts,
    plan_partitions,
    qualification_problems,
)

log = logging.getLogger(__name__)


#: What a run returns: in process (one shard) or through the multiprocess/deployment executor (shards).
RunResult = dg.ExecuteInProcessResult | dg.JobExecutionResult


class RunRefused(ValueError):
    """The run cannot train anything as the data stands; the message says why and what would help."""


def project_root() -> Path | None:
    """The source checkout holding ``dagster.yaml`` and ``workspace.yaml``, if the package runs from one."""
    root = Path(amygdala_dagster.__file__).resolve().parent.parent
    if (root / "dagster.yaml").is_file() and (root / "workspace.yaml").is_file():
        return root
    return None


def dagster_home() -> Path:
    """Where runs are recorded (see the module docstring)."""
    env = os.environ.get("DAGSTER_HOME")
    if env:
        return Path(env).expanduser()
    root = project_root()
    return (root if root is not None else Path.cwd()) / ".dagster_home"


def instance_yaml(home: Path) -> str:
    """The project's instance settings (as the repository's dagster.yaml) with absolute paths under ``home``."""
    return (
        "# Written by amygdala: the project's instance settings (see the repository's dagster.yaml).\n"
        f"storage:\n  sqlite:\n    base_dir: {home / 'storage'}\n"
        "local_artifact_storage:\n  module: dagster._core.storage.root\n  class: LocalArtifactStorage\n"
        f"  config:\n    base_dir: {home}\n"
        "compute_logs:\n  module: dagster._core.storage.local_compute_log_manager\n"
        f"  class: LocalComputeLogManager\n  config:\n    base_dir: {home / 'logs'}\n"
        "concurrency:\n  pools:\n    default_limit: 1\n"
        "telemetry:\n  enabled: false\n"
    )


def get_instance() -> dg.DagsterInstance:
    """The persistent Dagster instance (created on demand).

    A home this creates (or the checkout's ``.dagster_home``) gets a
    ``dagster.yaml`` with the project's settings, so ``DAGSTER_HOME=<it> dagster dev``
    reads the same storage and concurrency pool as ``amygdala run``. An existing
    home with runs but without a dagster.yaml is left as it is. Raises
    :class:`~amygdala_dagster.pipeline.instance.InstanceUnavailable` (one line) when the
    instance cannot be opened, e.g. its PostgreSQL database is unreachable.
    """
    home = dagster_home()
    is_new = not home.exists() or not any(home.iterdir())
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and (is_new or not os.environ.get("DAGSTER_HOME")):
        atomic_write_text(config, instance_yaml(home.resolve()))
    return open_instance(str(home))


def observe_graph(instance: dg.DagsterInstance, resources: Mapping[str, Any]) -> GraphVersion:
    """Record the graph's version as an observation of ``memory_graph`` (lineage) and return it."""
    version = resources["memory"].source().graph_version()
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=memory_graph.key, metadata={"node_count": version.node_count},
                            tags={DATA_VERSION_TAG: version.version})
    )
    return version


def job_for(name: str, shards: int) -> dg.JobDefinition:
    """Job ``name`` of the code location with ``shards`` shard steps (what each step process of a multi-process
    run rebuilds, from this module's name and the arguments: see :func:`dagster.build_reconstructable_job`)."""
    return build_definitions(shards=shards).resolve_job_def(name)


def resources_run_config(resources: Mapping[str, Any]) -> dict[str, Any]:
    """Run config carrying the configurable resources' set fields, for step processes that rebuild the job."""
    out = {}
    for key, res in resources.items():
        if isinstance(res, dg.ConfigurableResource):
            fields = {f: getattr(res, f) for f in type(res).model_fields}
            out[key] = {"config": {f: v for f, v in fields.items() if v is not None and not isinstance(v, dg.EnvVar)}}
    return out


def _pool_hint(instance: dg.DagsterInstance, shards: int) -> None:
    try:
        limit = instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
    except Exception:  # noqa: BLE001 - a storage without pools: nothing to say
        return
    if limit and limit < shards:
        log.warning("the %r pool allows %d step(s) at a time, so the %d shards run %d at a time; "
                    "`dagster instance concurrency set %s %d` lets them all run at once",
                    GPU_POOL, limit, shards, limit, GPU_POOL, shards)


def _execute(job_name: str, resources: Mapping[str, Any], instance: dg.DagsterInstance,
             selection: Sequence[dg.AssetKey], tags: Mapping[str, str], raise_on_error: bool,
             quiet_errors: bool = True) -> RunResult:
    shards = int(resources["sharding"].shards)
    if shards > 1:
        # N shard steps in parallel: the multiprocess executor (or the deployment's, e.g. one pod per step)
        # runs each step in its own process, which rebuilds the job from the code location by name.
        run_config: dict[str, Any] = {**(CLI_RUN_CONFIG if quiet_errors else {}),
                                      "resources": resources_run_config(resources)}
        if deployment_executor() is None:
            run_config["execution"] = {"config": {"max_concurrent": max(shards, os.cpu_count() or 1)}}
        _pool_hint(instance, shards)
        # dagster annotates reconstructable_args as a 1-tuple; it takes any tuple of the function's arguments
        recon = dg.build_reconstructable_job(__name__, job_for.__name__,
                                             reconstructable_args=(job_name, shards))  # type: ignore[arg-type]
        return dg.execute_job(recon, instance=instance,
                              run_config=run_config, tags=dict(tags), asset_selection=list(selection),
                              raise_on_error=raise_on_error)
    job = build_definitions(dict(resources), shards=shards).resolve_job_def(job_name)
    return job.execute_in_process(
        instance=instance, asset_selection=list(selection), tags=dict(tags), raise_on_error=raise_on_error,
        run_config=CLI_RUN_CONFIG if quiet_errors else None,
    )


def clamp_shards(resources: Mapping[str, Any], snapshot: pl.DataFrame,
                 partitions: Sequence[str]) -> dict[str, Any]:
    """``resources`` with ``sharding.shards`` lowered to the run's unique example texts, when it asks for more.

    A shard step without a text is a process (a GPU pod on Kubernetes) started for nothing; the
    settings already bound ``shards`` by :data:`~amygdala_dagster.workflow.settings.MAX_SHARDS`. Logged when lowered.
    """
    sharding = resources["sharding"]
    shards = int(sharding.shards)
    if shards <= 1 or not partitions:
        return dict(resources)
    texts, _keys = collect_texts(select_all(snapshot, list(partitions), resources["selection"].params()))
    unique = len(set(texts))
    if unique >= shards:
        return dict(resources)
    n = max(1, unique)
    log.warning("%d shards asked for, but the run has %d unique text(s) to forward: running %d shard(s)",
                shards, unique, n)
    return {**resources, "sharding": type(sharding)(shards=n)}


def _no_emotion_message(catalog: pl.DataFrame, min_positives: int, source: str) -> str:
    if catalog.height == 0:
        return f"no node of the memory graph {source} carries a valid tag line: nothing to train"
    top = catalog.sort("rank").head(5)
    best = ", ".join(f"{e} {n}" for e, n in zip(top["emotion"].to_list(), top["n_positive"].to_list()))
    return (f"no emotion qualifies in {source}: an emotion needs {min_positives} eligible positives and the "
            f"most any has is {best}; tag more nodes, or lower --min-positives")


ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED]


def active_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """The project's runs that are queued or going on in ``instance``."""
    return [r for r in instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE)) if KIND_TAG in r.tags]


def claim_output(instance: dg.DagsterInstance, storage: Any) -> str:
    """The output's location, after checking that no other run of the instance is writing it.

    Two runs writing one output at once would each publish the other's emotions; the second one is
    refused (:class:`RunRefused`) before it changes anything.
    """
    output = storage.store().uri("")
    for run in active_runs(instance):
        if run.tags.get(OUTPUT_TAG) == output:
            raise RunRefused(f"run {run.run_id} ({run.tags.get(KIND_TAG)}, {run.status.value.lower()}) is writing "
                             f"{output}: wait for it to finish, or use another --output-dir")
    return output


def _apply_plan(instance: dg.DagsterInstance, plan: PartitionPlan, existing: Sequence[str]) -> None:
    in_use = {e for run in active_runs(instance) for e in (run.tags.get(EMOTIONS_TAG) or "").split(",") if e}
    for e, why in plan.dropped.items():
        if e in existing and e in in_use:
            log.warning("keeping emotion partition %r for the run in progress that trains it (%s); left out here",
                        e, why)
        elif e in existing:
            log.warning("removing emotion partition %r: %s", e, why)
            instance.delete_dynamic_partition(EMOTION_PARTITIONS, e)
        else:
            log.warning("leaving out emotion %r: %s", e, why)
    if plan.new:
        instance.add_dynamic_partitions(EMOTION_PARTITIONS, plan.new)


def materialize_all(resources: Mapping[str, Any], instance: dg.DagsterInstance,
                    raise_on_error: bool = False) -> RunResult:
    """One ``full_refresh`` run: the snapshot, every qualifying emotion, the readout and report.

    Registered emotions that can no longer pass the blocking checks lose their
    partition (see :func:`~amygdala_dagster.workflow.partitions.plan_partitions`). Raises
    :class:`RunRefused` when no emotion can be trained.
    """
    memory, selection = resources["memory"], resources["selection"]
    version = observe_graph(instance, resources)
    log.info("memory graph %s: %d nodes (version %s)", memory.description, version.node_count, version.version[:16])
    snapshot, catalog = graph_catalog(memory, selection)
    if snapshot.height == 0:
        raise RunRefused(f"the memory graph {memory.description} has no usable node: nothing to train")
    existing = emotion_partitions(instance)
    plan = plan_partitions(catalog, existing, int(selection.min_positives), selection.curated)
    if not plan.partitions:
        raise RunRefused(_no_emotion_message(catalog, int(selection.min_positives), memory.description))
    output = claim_output(instance, resources["storage"])
    _apply_plan(instance, plan, existing)
    log.info("emotions: %s", ", ".join(plan.partitions))
    resources = clamp_shards(resources, snapshot, plan.partitions)
    keys = emotion_partitions(instance)  # the range runs in registration order; a kept partition may sit inside
    inside = [e for e in keys if e in plan.partitions]
    return _execute(REFRESH_JOB, resources, instance,
                    refresh_selection(plan.partitions, int(resources["sharding"].shards)),
                    refresh_tags(inside, plan.partitions, output), raise_on_error)


def backfill_emotions(names: Sequence[str], resources: Mapping[str, Any], instance: dg.DagsterInstance,
                      raise_on_error: bool = False) -> RunResult:
    """Add ``names`` as emotion partitions, materialise them in one run and refresh the all-emotion assets.

    An emotion that cannot qualify is refused (:class:`NotQualifiedError`, saying
    why and what would make it qualify) before any partition is added, and
    registered partitions that cannot pass the blocking checks are removed. The
    run's partition range spans the requested emotions (partitions between them
    in registration order are recomputed too; their texts are cached). Without
    a stored snapshot the run starts from the snapshot.
    """
    names = list(dict.fromkeys(check_emotion_name(n) for n in names))
    if not names:
        raise ValueError("no emotion given")
    memory, selection, storage = resources["memory"], resources["selection"], resources["storage"]
    params = selection.params()
    has_snapshot = storage.store().exists(SNAPSHOT_FILE)
    # Decide on the data the run will use: the stored snapshot, else the graph as it is now.
    snapshot = read_snapshot_from(storage) if has_snapshot else graph_catalog(memory, selection)[0]
    catalog = selection.catalog(snapshot)
    refused = qualification_problems(catalog, select_all(snapshot, names, params), int(selection.min_positives),
                                     params)
    if refused:
        raise NotQualifiedError("; ".join(f"emotion {e!r} does not qualify: {why}" for e, why in refused.items()))
    existing = emotion_partitions(instance)
    plan = plan_partitions(catalog, existing, int(selection.min_positives), selection.curated)
    plan.new = [n for n in names if n not in existing]
    output = claim_output(instance, storage)
    _apply_plan(instance, PartitionPlan(new=plan.new, dropped={e: w for e, w in plan.dropped.items()
                                                                if e in existing}, partitions=[]), existing)
    keys = emotion_partitions(instance)
    pos = sorted(keys.index(n) for n in names)
    span = keys[pos[0]: pos[-1] + 1]
    resources = clamp_shards(resources, snapshot, span)
    chosen = with_shards(list(PARTITIONED), int(resources["sharding"].shards)) + list(ALL_EMOTION_TAIL)
    if not has_snapshot:
        chosen = list(UNPARTITIONED_HEAD) + chosen
    return _execute(BACKFILL_JOB, resources, instance, chosen,
                    {**refresh_tags(span, [k for k in keys if k not in plan.dropped], output),
                     "amygdala/backfill": ",".join(names)}, raise_on_error)


def step_metadata(result: RunResult, asset: str) -> dict[str, Any]:
    """Metadata (plain values) of the first materialization of ``asset`` in a run."""
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return {}


def failures(result: RunResult) -> list[str]:
    """One line per failed step or failed blocking check: the cause (the innermost error), not the wrapper."""
    out = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            failure: Any = event.event_specific_data  # StepFailureData: Dagster types the payload as a union
            err = failure.error
            while err is not None and err.cause is not None:
                err = err.cause
            message = err.message.strip().splitlines()[-1] if err and err.message.strip() else "failed"
            out.append(f"{event.step_key}: {message}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            d: Any = event.event_specific_data  # AssetCheckEvaluation
            if not d.passed:
                out.append(f"check {d.check_name} ({d.severity.value}): {d.description}")
    return out
