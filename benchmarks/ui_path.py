"""The UI/daemon path against the command line: the same full refresh, side by side, on one machine.

Through the Dagster UI or the daemon every step is its own process (the job's
multiprocess executor); ``amygdala run`` executes the same job in one process.
This script measures both on the same graph, each from a cold output directory
and activation cache, in one persistent instance (SQLite, the project's
``dagster.yaml`` settings):

- ``cli``: ``amygdala run`` (in process);
- ``ui``: ``dagster job execute -m amygdala_dagster.pipeline.definitions -j full_refresh`` with the partition
  range tags the sensor and the CLI give a run (what the launchpad or the daemon runs).

Each is repeated ``--repeat`` times (alternating), and the table gives the
median wall time, the number of step processes, the weight loads per run (by
step) and the ratio ui/cli. ``python benchmarks/ui_path.py [--graph G.jsonl]
[--repeat 3] [--json FILE]``; about five minutes on 2 cores with the bundled
sample graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _env(home: Path, out: Path, cache: Path, graph: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMYGDALA_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(home), AMYGDALA_OUTPUT_DIR=str(out), AMYGDALA_CACHE_DIR=str(cache),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if graph is not None:
        env["AMYGDALA_MEMORY_FILE"] = str(graph)
    return env


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _run_stats(home: Path, run_id: str | None) -> dict[str, Any]:
    """Step processes, steps that loaded the weights, and the run's status, from the instance."""
    code = f"""
import json, dagster as dg
from dagster._core.instance.ref import InstanceRef
with dg.DagsterInstance.from_ref(InstanceRef.from_dir({str(home)!r})) as inst:
    runs = inst.get_runs(limit=1) if {run_id!r} is None else [inst.get_run_by_id({run_id!r})]
    run = runs[0]
    recs = inst.get_records_for_run(run.run_id).records
    pids, loads, steps, forwarded = set(), [], set(), None
    for r in recs:
        e = r.event_log_entry
        d = e.dagster_event
        if d is not None and d.event_type_value == "STEP_START":
            steps.add(d.step_key); pids.add(d.pid)
        if d is not None and d.event_type_value == "ASSET_MATERIALIZATION":
            m = d.step_materialization_data.materialization
            if "texts_forwarded" in m.metadata:
                forwarded = m.metadata["texts_forwarded"].value
            v = m.metadata.get("model_weights_loaded")
            if v is not None and getattr(v, "value", v):
                loads.append(d.step_key)
    print(json.dumps({{"run_id": run.run_id, "status": run.status.value, "steps": len(steps),
                      "processes": len(pids), "weight_loads": sorted(set(loads)), "texts_forwarded": forwarded}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "DAGSTER_HOME": str(home)}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _partitions(home: Path, env: dict[str, str]) -> list[str]:
    code = f"""
import dagster as dg
from dagster._core.instance.ref import InstanceRef
with dg.DagsterInstance.from_ref(InstanceRef.from_dir({str(home)!r})) as inst:
    print(",".join(inst.get_dynamic_partitions("emotion")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().split(",")


def run_cli(home: Path, work: Path, graph: Path | None) -> tuple[float, dict[str, Any]]:
    out, cache = work / "out-cli", work / "cache-cli"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([_bin("amygdala"), "run"], cwd=work, env=_env(home, out, cache, graph),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"amygdala run failed:\n{proc.stderr[-3000:]}")
    return seconds, _run_stats(home, None)


def run_ui(home: Path, work: Path, graph: Path | None) -> tuple[float, dict[str, Any]]:
    out, cache = work / "out-ui", work / "cache-ui"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = _env(home, out, cache, graph)
    keys = _partitions(home, env)
    tags = json.dumps({"dagster/asset_partition_range_start": keys[0],
                       "dagster/asset_partition_range_end": keys[-1]})
    t0 = time.perf_counter()
    proc = subprocess.run([_bin("dagster"), "job", "execute", "-m", "amygdala_dagster.pipeline.definitions",
                           "-j", "full_refresh", "--tags", tags], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dagster job execute failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, _run_stats(home, None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graph", type=Path, default=None, help="memory graph JSONL (default: the bundled sample)")
    p.add_argument("--nodes", type=int, default=None,
                   help="instead, a synthetic graph of N nodes recombined from the bundled ones (extraction.py's)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from amygdala_dagster.pipeline.runner import instance_yaml

    results: dict[str, list[dict[str, Any]]] = {"cli": [], "ui": []}
    with tempfile.TemporaryDirectory(prefix="amygdala-ui-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        home.mkdir()
        if args.nodes:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from extraction import bundled_nodes, synthetic_graph

            args.graph = work / "graph.jsonl"
            nodes = synthetic_graph(bundled_nodes(), args.nodes)
            args.graph.write_text("".join(json.dumps(dataclasses.asdict(n)) + "\n" for n in nodes))
        (home / "dagster.yaml").write_text(instance_yaml(home))
        for i in range(args.repeat):
            for kind, fn in (("cli", run_cli), ("ui", run_ui)):  # cli first: it registers the partitions
                seconds, stats = fn(home, work, args.graph)
                results[kind].append({"seconds": round(seconds, 2), **stats})
                print(f"{kind} #{i + 1}: {seconds:.1f} s, {stats['processes']} process(es), {stats['steps']} steps, "
                      f"weights loaded by {', '.join(stats['weight_loads']) or 'no step'}, "
                      f"{stats['texts_forwarded']} texts forwarded",
                      flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in results.items()}
    print()
    print(f"{'path':<6}{'median s':>10}{'steps':>7}{'processes':>11}  weight loads per run (steps)")
    for kind in ("cli", "ui"):
        last = results[kind][-1]
        print(f"{kind:<6}{med[kind]:>10.1f}{last['steps']:>7}{last['processes']:>11}  "
              f"{len(last['weight_loads'])} ({', '.join(last['weight_loads']) or '-'})")
    print(f"\nui / cli: {med['ui'] / med['cli']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"median_seconds": med, "ratio": med["ui"] / med["cli"], "runs": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
