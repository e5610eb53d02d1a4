"""Smoke test: the real Dagster webserver serves the repository's workspace.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from dagster._core.instance.ref import InstanceRef

from amygdala_dagster.pipeline.checks import ALL_CHECK_SPECS
from amygdala_dagster_tests.conftest import free_port

pytestmark = pytest.mark.slow  # a real server, polled / a webserver started

REPO = Path(__file__).resolve().parent.parent
QUERY = """
{
  assetNodes {
    assetKey { path } partitionKeys
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
    internalFreshnessPolicy { ... on TimeWindowFreshnessPolicy { failWindowSeconds } }
  }
  repositoriesOrError { ... on RepositoryConnection { nodes { name sensors { name } } } }
}
"""


def test_webserver_serves_assets_partitions_and_sensor(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        instance.add_dynamic_partitions("emotion", ["calm", "warmth"])
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "AMYGDALA_OUTPUT_DIR": str(tmp_path / "out")}
    log = tmp_path / "webserver.log"
    exe = Path(sys.executable).with_name("dagster-webserver")
    cmd = [str(exe) if exe.exists() else "dagster-webserver", "-w", str(REPO / "workspace.yaml"),
           "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                if httpx.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "webserver not up in 120 s:\n" + log.read_text(errors="replace")
            time.sleep(0.5)
        # the code location loads in the background; poll until its assets are there
        while True:
            data = httpx.post(f"{base}/graphql", json={"query": QUERY}, timeout=30).json()["data"]
            nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
            if nodes or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {"memory_graph", "memory_snapshot", "emotion_catalog", "tagged_examples", "activation_stats",
                "readout_vectors", "readout_manifest", "evaluation_report"} <= set(nodes)
        assert nodes["tagged_examples"]["partitionKeys"] == ["calm", "warmth"]
        assert nodes["activation_stats"]["partitionKeys"] == ["calm", "warmth"]
        checks = {c["name"]: c["blocking"] for n in nodes.values() for c in n["assetChecksOrError"]["checks"]}
        assert checks["manifest_matches_vectors"] is True and checks["separation_above_threshold"] is False
        assert set(checks) == {spec.name for spec in ALL_CHECK_SPECS}
        for key in ("readout_vectors", "readout_manifest"):
            assert nodes[key]["internalFreshnessPolicy"] == {"failWindowSeconds": 24 * 3600}
        sensors = [s["name"] for r in data["repositoriesOrError"]["nodes"] for s in r["sensors"]]
        assert "memory_graph_sensor" in sensors
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
