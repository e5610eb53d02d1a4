"""The production deployment as an operator runs it, on 127.0.0.1: ``dagster-daemon`` and
``dagster-webserver`` with deploy/dagster.yaml (DAGSTER_HOME a temp dir holding it), the instance on a
real PostgreSQL (a bare ``postgresql://`` URL), artefacts and the activation cache in a bucket of the S3
server (moto), the memory graph a JSONL export.

- The sensor is switched on through the webserver's GraphQL API, the graph changes, the sensor's run
  succeeds, and a backfill of a new emotion (``amygdala backfill-emotion``, same instance and bucket) runs
  beside it: the steps of the ``gpu`` pool never overlap across the two runs (step start/success times in
  the instance's event log), and the pair in the bucket (``current.json`` -> release) is whole, holds the
  new emotion and passes ``amygdala inspect``.
- A run whose worker is killed in the middle of its forward pass is marked failed, the daemon retries it
  (run_retries, ``dagster/max_retries`` on the job) and the retry forwards only the texts the killed run
  had not yet written to the activation cache.

Every wait is bounded and, when it runs out, the test fails with the daemon's and the webserver's logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import RunsFilter

from amygdala_dagster.pipeline.instance import open_instance
from amygdala_dagster_tests.conftest import free_port
from amygdala_dagster_tests.servers import postgres_url, s3_endpoint  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEPLOY_YAML = REPO / "deploy" / "dagster.yaml"
WORKSPACE = REPO / "workspace.yaml"
SAMPLE = REPO / "amygdala_dagster" / "data" / "sample_graph.jsonl"
LOCATION = "amygdala_dagster"
SENSOR = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "sensorName": "memory_graph_sensor"}
SHARD_SIZE = 256  # rows per activation-cache shard (engine/cache.py DEFAULT_SHARD_SIZE)
STAMP = "2026-03-01T00:00:00Z"

START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}"""
SENSOR_TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status ticks(limit: 20) { status skipReason runIds } } }
  }
}"""
LOCATION_LOADED = """
{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name sensors { name } } } } }"""
RUNS = """
query Runs($ids: [String!]) {
  runsOrError(filter: {runIds: $ids}) { __typename ... on Runs { results { runId status jobName } } }
}"""


def _exe(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def node(key: str, body: str, tags: str) -> dict:
    return {"key": key, "node_type": "journal", "content": f"{body}\n\n{tags}",
            "created_at": STAMP, "updated_at": STAMP}


def nostalgia_nodes(n: int = 12) -> list[dict]:
    """``n`` nodes of a new emotion, each with a text of its own."""
    places = ["the old station", "my grandmother's kitchen", "the summer camp", "the first apartment",
              "the school library", "the harbour at dusk"]
    return [node(f"journal/nostalgia-{i:02d}",
                 f"Reading the early drafts again I missed {places[i % len(places)]} and the evenings there, "
                 f"entry {i}, the light the way it used to fall.", "nostalgia:9 calm:2")
            for i in range(n)]


def generated_nodes(n: int) -> list[dict]:
    """``n`` new nodes tagged with emotions of the sample graph: texts never forwarded before."""
    emotions = ["warmth", "clarity", "sadness", "joy"]
    return [node(f"gen/{i:05d}",
                 f"Generated note {i}: the session about topic {i * 7919 % 10007} went on for a while and "
                 f"I kept track of item {i % 97} and step {i % 13} as we went.",
                 f"{emotions[i % 4]}:9 {emotions[(i + 1) % 4]}:2")
            for i in range(n)]


def write_graph(path: Path, nodes: list[dict]) -> Path:
    """Write ``nodes`` as JSONL, atomically (the sensor may read the file at any moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(n) + "\n" for n in nodes), encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass
class Deployment:
    base: Path
    home: Path
    graph: Path
    bucket: str
    env: dict[str, str]
    web: str
    logs: dict[str, Path]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return f"{self.bucket}/output"

    def dump(self) -> str:
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"----- {name} (last 6000 characters) -----\n{text[-6000:]}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """``check()``'s first truthy value, polled; a failure with the servers' logs after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.dump()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not within {timeout:.0f} s\n{self.dump()}")
            time.sleep(interval)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        response = httpx.post(f"{self.web}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    def amygdala(self, *args: str) -> subprocess.Popen:
        log = self.base / f"amygdala-{args[0]}-{uuid.uuid4().hex[:6]}.log"
        self.logs[f"amygdala {args[0]}"] = log
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "amygdala_dagster.commands.cli", *args], cwd=self.base,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and its process group (the code servers and run workers it launched)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def deployment(postgres_url, s3_endpoint, tmp_path_factory) -> Iterator[Deployment]:  # noqa: F811
    import psycopg2
    import s3fs

    base = tmp_path_factory.mktemp("daemon")
    db = f"d_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    try:
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {db}")
    finally:
        conn.close()
    url = postgres_url.rsplit("/", 1)[0] + f"/{db}"
    assert url.startswith("postgresql://")  # bare, as a provider prints it
    bucket = f"amygdala-daemon-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    home = base / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    graph = base / "graph.jsonl"  # not there yet: the sensor's ticks skip until it is
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMYGDALA_", "DAGSTER_"))}
    env.update({"DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": url, "HF_HUB_OFFLINE": "1",
                "AMYGDALA_OUTPUT_DIR": f"s3://{bucket}/output", "AMYGDALA_CACHE_DIR": f"s3://{bucket}/cache",
                "AMYGDALA_MEMORY_FILE": str(graph), "AMYGDALA_SENSOR_INTERVAL_S": "2",
                "PYTHONPATH": str(REPO)})
    port = free_port()
    dep = Deployment(base=base, home=home, graph=graph, bucket=f"s3://{bucket}", env=env,
                     web=f"http://127.0.0.1:{port}",
                     logs={"dagster-daemon": base / "daemon.log", "dagster-webserver": base / "webserver.log"})
    commands = {"dagster-daemon": [_exe("dagster-daemon"), "run", "-w", str(WORKSPACE)],
                "dagster-webserver": [_exe("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                      "-w", str(WORKSPACE)]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))  # open_instance here reads the same dagster.yaml and database
        mp.setenv("DAGSTER_POSTGRES_URL", url)
        try:
            for name, cmd in commands.items():
                with open(dep.logs[name], "wb") as out:
                    dep.procs[name] = subprocess.Popen(cmd, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                       start_new_session=True)

            def location_loaded() -> bool:
                try:
                    data = dep.graphql(LOCATION_LOADED)["repositoriesOrError"]
                except (httpx.HTTPError, AssertionError):
                    return False
                return any(s["name"] == "memory_graph_sensor" for r in data.get("nodes", []) for s in r["sensors"])

            dep.wait("the webserver serving the code location", location_loaded, 180, interval=1)
            yield dep
        finally:
            for proc in dep.procs.values():
                _stop(proc)


# ----------------------------------------------------------------------------- helpers on the instance
def step_events(instance: dg.DagsterInstance, run_id: str) -> list[Any]:
    kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}
    return [e for e in instance.all_logs(run_id, of_type=kinds)]


def gpu_intervals(instance: dg.DagsterInstance, run_id: str) -> list[tuple[float, float, str]]:
    """``(start, end, step)`` of each step of the run in the ``gpu`` pool, from its event log."""
    starts, out = {}, []
    for e in step_events(instance, run_id):
        step = e.step_key or ""
        if not (step == "activation_stats" or step.startswith("activation_cache.forward_activation_shard")):
            continue
        if e.dagster_event.event_type == DagsterEventType.STEP_START:
            starts[step] = e.timestamp
        else:
            out.append((starts[step], e.timestamp, f"{run_id[:8]}:{step}"))
    return out


def run_status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None, run_id
    return run.status


def materialization_metadata(instance: dg.DagsterInstance, run_id: str, asset: str) -> dict[str, Any]:
    for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        mat = e.dagster_event.step_materialization_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return {}


def full_refresh_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=RunsFilter(job_name="full_refresh")))


def cache_shards(bucket: str) -> set[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = f"{bucket.removeprefix('s3://')}/cache"
    return {p for p in (fs.find(root) if fs.exists(root) else []) if p.rsplit("/", 1)[-1].startswith("shard-")}


# ----------------------------------------------------------------------------- the sensor and a backfill
def test_sensor_run_and_a_backfill_beside_it_share_the_gpu_pool_and_publish_one_whole_pair(deployment):
    import s3fs

    dep = deployment
    started = time.monotonic()
    instance = open_instance(str(dep.home))

    # the sensor, switched on through the webserver's GraphQL API; its ticks skip while the graph is unreachable
    state = dep.graphql(START_SENSOR, {"selector": SENSOR})["startSensor"]
    assert state["__typename"] == "Sensor" and state["sensorState"]["status"] == "RUNNING", state

    def ticks() -> list[dict]:
        return dep.graphql(SENSOR_TICKS, {"selector": SENSOR})["sensorOrError"]["sensorState"]["ticks"]

    skipped = dep.wait("a skipped sensor tick", lambda: [t for t in ticks() if t["status"] == "SKIPPED"], 90)
    assert "unreachable" in (skipped[0]["skipReason"] or ""), skipped

    # The new export of the graph: the sample plus nodes of an emotion the graph never had. The backfill reads
    # it first and registers the emotion; then the graph the sensor watches becomes that export.
    nodes = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    export = write_graph(dep.base / "export.jsonl", nodes + nostalgia_nodes())
    backfill = dep.amygdala("backfill-emotion", "nostalgia", "--memory-file", str(export),
                            "--eval-conversations", "none")
    dep.wait("the backfill registering the new emotion 'nostalgia'",
             lambda: "nostalgia" in instance.get_dynamic_partitions("emotion") or backfill.poll() is not None, 180)
    assert backfill.poll() is None, dep.dump()
    shutil.copy(export, dep.graph)

    sensor_run = dep.wait("the sensor's run for the changed graph",
                          lambda: next(iter(full_refresh_runs(instance)), None), 90).run_id
    dep.wait("the sensor's run to finish",
             lambda: run_status(instance, sensor_run) in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE),
             420, interval=1)
    assert run_status(instance, sensor_run) == dg.DagsterRunStatus.SUCCESS, dep.dump()
    try:
        backfill.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the backfill did not finish\n{dep.dump()}")
    backfill_log = dep.logs["amygdala backfill-emotion"].read_text()
    assert backfill.returncode == 0, dep.dump()
    backfill_run = re.search(r"dagster run (\S+) recorded", backfill_log)[1]
    assert run_status(instance, backfill_run) == dg.DagsterRunStatus.SUCCESS

    # the gpu pool (limit 1): the runs' GPU steps never overlapped
    intervals = sorted(gpu_intervals(instance, sensor_run) + gpu_intervals(instance, backfill_run))
    assert {i[2].split(":")[0] for i in intervals} == {sensor_run[:8], backfill_run[:8]}, intervals
    for (s1, e1, a), (s2, e2, b) in zip(intervals, intervals[1:]):
        assert e1 <= s2, f"{a} [{s1:.2f}, {e1:.2f}] overlaps {b} [{s2:.2f}, {e2:.2f}]"

    # the pair in the bucket: current.json -> one release, both SHA-256 sums right, the new emotion in it
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    out = dep.output.removeprefix("s3://")
    pointer = json.loads(fs.cat(f"{out}/current.json"))
    vectors, manifest_bytes = fs.cat(f"{out}/{pointer['vectors']}"), fs.cat(f"{out}/{pointer['manifest']}")
    manifest = json.loads(manifest_bytes)
    assert hashlib.sha256(vectors).hexdigest() == pointer["vectors_sha256"] == manifest["vectors_sha256"]
    assert hashlib.sha256(manifest_bytes).hexdigest() == pointer["manifest_sha256"]
    assert "nostalgia" in manifest["concepts"] and len(manifest["concepts"]) == 17, manifest["concepts"]
    inspect = subprocess.run([sys.executable, "-m", "amygdala_dagster.commands.cli", "inspect", dep.output],
                             capture_output=True, text=True, timeout=300, env=dep.env, cwd=dep.base)
    assert inspect.returncode == 0 and f"release {pointer['release']}" in inspect.stdout, inspect.stderr[-3000:]

    # the webserver reads both runs from PostgreSQL (the bare URL works for its pooled connections too)
    runs = dep.graphql(RUNS, {"ids": [sensor_run, backfill_run]})["runsOrError"]["results"]
    assert {(r["runId"], r["status"]) for r in runs} == {(sensor_run, "SUCCESS"), (backfill_run, "SUCCESS")}
    print(f"sensor run + backfill on the daemon: {time.monotonic() - started:.0f} s")


# ----------------------------------------------------------------------------- a worker killed mid-forward
def _selected_new_texts(graph: Path, partitions: list[str]) -> int:
    """How many unique texts of the ``gen/`` nodes the next run selects (none was ever forwarded)."""
    from amygdala_dagster.examples.selection import SelectionParams, select_all
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.graph.sources import JsonlSource

    nodes, _ = JsonlSource(str(graph)).fetch_nodes()
    sets = select_all(build_snapshot(nodes), partitions, SelectionParams())
    return len({ex.text for s in sets.values() for ex in [*s.positives, *s.negatives] if ex.key.startswith("gen/")})


def test_a_worker_killed_mid_forward_fails_the_run_and_its_retry_forwards_only_the_rest(deployment):
    import psutil

    dep = deployment
    started = time.monotonic()
    instance = open_instance(str(dep.home))
    if "nostalgia" not in instance.get_dynamic_partitions("emotion"):
        pytest.skip("needs the deployment state of the sensor test (run the module, not this test alone)")
    before = {r.run_id for r in full_refresh_runs(instance)}
    shards_before = cache_shards(dep.bucket)

    # a larger graph: enough new texts that the forward fills several cache shards
    nodes = [json.loads(line) for line in dep.graph.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_graph(dep.graph, nodes + generated_nodes(1500))
    new_texts = _selected_new_texts(dep.graph, sorted(instance.get_dynamic_partitions("emotion")))
    assert new_texts > 3 * SHARD_SIZE

    run_id = dep.wait("the sensor's run for the larger graph",
                      lambda: next((r.run_id for r in full_refresh_runs(instance) if r.run_id not in before), None),
                      90)
    start = dep.wait("its forward step to start", lambda: next(
        (e for e in step_events(instance, run_id) if e.step_key == "activation_stats"
         and e.dagster_event.event_type == DagsterEventType.STEP_START), None), 300)
    written = dep.wait("a cache shard written by the forward", lambda: cache_shards(dep.bucket) - shards_before,
                       240, interval=0.25)
    assert not [e for e in step_events(instance, run_id) if e.step_key == "activation_stats"
                and e.dagster_event.event_type != DagsterEventType.STEP_START], "the forward ended before the kill"

    # kill the run worker the daemon launched (through its code server), and the step processes under it
    (run_start,) = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    worker = psutil.Process(run_start.dagster_event.pid)
    assert start.dagster_event.pid in {p.pid for p in worker.children(recursive=True)}
    victims = [*worker.children(recursive=True), worker]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    psutil.wait_procs(victims, timeout=30)

    dep.wait("the killed run marked failed",
             lambda: run_status(instance, run_id) == dg.DagsterRunStatus.FAILURE, 120, interval=0.2)
    detected = instance.get_run_record_by_id(run_id).end_time - killed_at
    retry = dep.wait("the daemon's retry of the killed run", lambda: next(
        (r.run_id for r in instance.get_runs(filters=RunsFilter(tags={"dagster/parent_run_id": run_id}))), None), 120)
    assert instance.get_run_by_id(retry).tags.get("dagster/retry_number") == "1"
    dep.wait("the retry to finish", lambda: run_status(instance, retry) in (
        dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE), 420, interval=1)
    assert run_status(instance, retry) == dg.DagsterRunStatus.SUCCESS, dep.dump()

    stats = materialization_metadata(instance, retry, "activation_stats")
    forwarded, cached = int(stats["texts_forwarded"]), int(stats["texts_cached"])
    # The generated texts were never forwarded before this pair of runs: without the killed run's shards the
    # retry would forward all of them; it forwarded at most what the killed run had not written.
    assert 0 < forwarded <= new_texts - SHARD_SIZE * len(written), (forwarded, new_texts, len(written))
    assert cached >= SHARD_SIZE * len(written)
    print(f"worker killed after {len(written)} shard(s); marked failed {detected:.1f} s after the kill; retry "
          f"forwarded {forwarded} of {new_texts} new texts ({cached} cached); {time.monotonic() - started:.0f} s")
