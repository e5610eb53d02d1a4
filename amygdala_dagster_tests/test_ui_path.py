"""The UI/daemon path: a job executed as the launchpad and the daemon execute it (one process per step, through
``dagster job execute``), two runs at once on one instance whose ``gpu`` pool allows one step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from amygdala_dagster.pipeline.runner import instance_yaml
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph

EMOTIONS = ["curiosity", "frustration", "warmth"]
GPU_STEPS = ("activation_stats",)


def _execute(home: Path, tmp: Path, name: str, graph: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMYGDALA_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), AMYGDALA_MEMORY_FILE=str(graph), AMYGDALA_OUTPUT_DIR=str(tmp / f"out-{name}"),
               AMYGDALA_CACHE_DIR=str(tmp / f"cache-{name}"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    tags = json.dumps({"dagster/asset_partition_range_start": EMOTIONS[0],
                       "dagster/asset_partition_range_end": EMOTIONS[-1], "bench": name})
    exe = Path(sys.executable).with_name("dagster")
    cmd = [str(exe) if exe.exists() else "dagster", "job", "execute", "-m", "amygdala_dagster.pipeline.definitions",
           "-j", "full_refresh", "--tags", tags]
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


def _gpu_windows(instance: dg.DagsterInstance, run_id: str) -> list[tuple[float, float, str]]:
    starts: dict[str, float] = {}
    out = []
    for record in instance.get_records_for_run(run_id).records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None or event.step_key not in GPU_STEPS:
            continue
        if event.event_type_value == "STEP_START":
            starts[event.step_key] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            out.append((starts[event.step_key], entry.timestamp, run_id))
    return out


@pytest.mark.slow
def test_two_runs_at_once_never_hold_the_gpu_pool_together(tmp_path):
    """Issue "Model work once, on the GPU" §6: a sensor run and a UI run at once, each one process per step, the
    pool at 1: the GPU steps (the only ones that load weights) run one after the other, and each run loads the
    weights in exactly one step."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(home))  # concurrency.pools.default_limit: 1
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(12))
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        instance.add_dynamic_partitions("emotion", EMOTIONS)
    procs = {name: _execute(home, tmp_path, name, graph) for name in ("sensor", "ui")}
    for name, proc in procs.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text(errors="replace")[-4000:]
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        windows = sorted(w for r in runs for w in _gpu_windows(instance, r.run_id))
        assert len(windows) == 2 and windows[0][2] != windows[1][2]
        assert windows[0][1] <= windows[1][0], f"GPU steps overlapped: {windows}"
        for run in runs:
            loads = []
            for event in instance.get_records_for_run(run.run_id).records:
                d = event.event_log_entry.dagster_event
                if d is not None and d.event_type_value == "ASSET_MATERIALIZATION":
                    meta = d.step_materialization_data.materialization.metadata
                    if "model_weights_loaded" in meta and meta["model_weights_loaded"].value:
                        loads.append(d.step_key)
            assert set(loads) == {"activation_stats"}, (run.run_id, loads)  # one record per partition
