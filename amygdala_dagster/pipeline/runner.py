"""Run the asset graph from the command line: the Dagster instance, `amygdala run` and backfills.

The runs go through Dagster (``materialize``, in process) so they are recorded
in the instance and appear in ``dagster dev``. Instance location: ``$DAGSTER_HOME``
when set; otherwise ``<repo>/.dagster_home`` configured by ``<repo>/dagster.yaml``
when running from a source checkout (the directory holding dagster.yaml and
workspace.yaml next to the package), else ``./.dagster_home``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

log = logging.getLogger(__name__)

# Dagster's console logger prints every engine event at DEBUG; on the command line
# the step starts/ends and our own log lines (INFO) are the useful progress.
CONSOLE_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def project_root() -> Path | None:
    """The source checkout holding ``dagster.yaml`` and ``workspace.yaml``, if the package runs from one."""
    import amygdala_dagster

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


def get_instance() -> dg.DagsterInstance:
    """The persistent Dagster instance (created on demand)."""
    from dagster._core.instance.ref import InstanceRef

    if os.environ.get("DAGSTER_HOME"):
        # Dagster refuses a DAGSTER_HOME that does not exist yet; a new one is just empty.
        dagster_home().mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.get()
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    root = project_root()
    # Absolute paths here: dagster.yaml's relative ones only hold when the current directory is the repo.
    overrides: dict[str, Any] = {
        "storage": {"sqlite": {"base_dir": str(home / "storage")}},
        "local_artifact_storage": {
            "module": "dagster._core.storage.root", "class": "LocalArtifactStorage",
            "config": {"base_dir": str(home)},
        },
        "compute_logs": {
            "module": "dagster._core.storage.local_compute_log_manager", "class": "LocalComputeLogManager",
            "config": {"base_dir": str(home / "logs")},
        },
    }
    if root is None:
        overrides["concurrency"] = {"pools": {"default_limit": 1}}
        overrides["telemetry"] = {"enabled": False}
    ref = InstanceRef.from_dir(str(home), config_dir=str(root) if root else str(home), overrides=overrides)
    return dg.DagsterInstance.from_ref(ref)


def _all_defs() -> tuple[list[Any], list[Any]]:
    from amygdala_dagster.pipeline.assets import ALL_ASSETS
    from amygdala_dagster.pipeline.checks import ALL_CHECKS

    return ALL_ASSETS, ALL_CHECKS


def observe_graph(instance: dg.DagsterInstance, resources: Mapping[str, Any]) -> Any:
    """Record the graph's version as an observation of ``memory_graph`` (lineage) and return it."""
    from amygdala_dagster.pipeline.assets import memory_graph
    from amygdala_dagster.pipeline.sensors import DATA_VERSION_TAG

    version = resources["memory"].source().graph_version()
    instance.report_runless_asset_event(
        dg.AssetObservation(asset_key=memory_graph.key, metadata={"node_count": version.node_count},
                            tags={DATA_VERSION_TAG: version.version})
    )
    return version


def materialize_all(resources: Mapping[str, Any], instance: dg.DagsterInstance,
                    raise_on_error: bool = False) -> dg.ExecuteInProcessResult:
    """One run: the snapshot, every qualifying (and already registered) emotion, the readout and report.

    Registered emotions that now have too few positives lose their partition (see
    :func:`~amygdala_dagster.pipeline.sensors.plan_partitions`).
    """
    from amygdala_dagster.pipeline.assets.common import EMOTION, emotion_partitions
    from amygdala_dagster.pipeline.sensors import plan_partitions, refresh_selection, refresh_tags

    version = observe_graph(instance, resources)
    log.info("memory graph %s: %d nodes (version %s)", resources["memory"].description,
             version.node_count, version.version[:16])
    new, dropped, partitions = plan_partitions(resources["memory"], resources["selection"], emotion_partitions(instance))
    for e in dropped:
        log.warning("emotion %s has too few positives now; removing its partition", e)
        instance.delete_dynamic_partition(EMOTION.name, e)
    if new:
        instance.add_dynamic_partitions(EMOTION.name, new)
    log.info("emotions: %s", ", ".join(partitions) or "none qualify")
    assets, checks = _all_defs()
    return dg.materialize(
        assets + checks, instance=instance, resources=dict(resources), selection=refresh_selection(partitions),
        tags=refresh_tags(partitions), raise_on_error=raise_on_error, run_config=CONSOLE_RUN_CONFIG,
    )


def backfill_emotions(names: Sequence[str], resources: Mapping[str, Any], instance: dg.DagsterInstance,
                      raise_on_error: bool = False) -> dg.ExecuteInProcessResult:
    """Add ``names`` as emotion partitions, materialise them in one run and refresh the all-emotion assets.

    The run's partition range spans the requested emotions (partitions between
    them in registration order are recomputed too; their texts are cached).
    Without a stored snapshot the run starts from the snapshot.
    """
    from amygdala_dagster.examples import check_emotion_name
    from amygdala_dagster.pipeline.assets.common import EMOTION, SNAPSHOT_FILE, emotion_partitions
    from amygdala_dagster.pipeline.sensors import ALL_EMOTION_TAIL, PARTITIONED, UNPARTITIONED_HEAD, refresh_tags

    names = list(dict.fromkeys(check_emotion_name(n) for n in names))
    if not names:
        raise ValueError("no emotion given")
    existing = emotion_partitions(instance)
    new = [n for n in names if n not in existing]
    if new:
        instance.add_dynamic_partitions(EMOTION.name, new)
    keys = emotion_partitions(instance)
    pos = sorted(keys.index(n) for n in names)
    span = keys[pos[0]: pos[-1] + 1]
    selection = list(PARTITIONED) + list(ALL_EMOTION_TAIL)
    if not resources["storage"].store().exists(SNAPSHOT_FILE):
        selection = list(UNPARTITIONED_HEAD) + selection
    assets, checks = _all_defs()
    return dg.materialize(
        assets + checks, instance=instance, resources=dict(resources), selection=selection,
        tags={**refresh_tags(span), "amygdala/backfill": ",".join(names)}, raise_on_error=raise_on_error,
        run_config=CONSOLE_RUN_CONFIG,
    )


def step_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """Metadata (plain values) of the first materialization of ``asset`` in a run."""
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return {}


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """One line per failed step or failed blocking check."""
    out = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            out.append(f"{event.step_key}: {err.message.strip() if err else 'failed'}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            d = event.event_specific_data
            if not d.passed:
                out.append(f"check {d.check_name} ({d.severity.value}): {d.description}")
    return out
