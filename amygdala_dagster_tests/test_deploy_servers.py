"""The production deployment against real servers on 127.0.0.1: the Dagster instance of
deploy/dagster.yaml on PostgreSQL, artefacts in an S3 bucket (moto's server), the pair published
through its pointer. Slow: each test runs the pipeline or kills publishing processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
import warnings
from pathlib import Path

import dagster as dg
import pytest

from amygdala_dagster.commands import cli
from amygdala_dagster.files.storage import location
from amygdala_dagster.pipeline import resources as R
from amygdala_dagster.pipeline.assets import ALL_ASSETS
from amygdala_dagster.pipeline.runner import backfill_emotions, failures, get_instance
from amygdala_dagster.pipeline.sensors import memory_graph_sensor
from amygdala_dagster.readout.manifest import load_readout, write_readout
from amygdala_dagster.readout.publish import publish_pair
from amygdala_dagster.readout.releases import POINTER_FILE, POINTER_FORMAT, read_pointer
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph
from amygdala_dagster_tests.servers import postgres_url, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from amygdala_dagster_tests.test_manifest import FIELDS, make_readout
from amygdala_dagster_tests.test_publish import assert_readers_see_whole_pairs

pytestmark = pytest.mark.slow
warnings.filterwarnings("ignore", category=dg.BetaWarning)

REPO = Path(__file__).resolve().parents[1]
DEPLOY_YAML = REPO / "deploy" / "dagster.yaml"


@pytest.fixture
def postgres_db(postgres_url):
    """A database of its own on the session's server (runs and partitions of one test only)."""
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        conn.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def deploy_home(tmp_path, postgres_db, monkeypatch):
    """DAGSTER_HOME holding deploy/dagster.yaml, DAGSTER_POSTGRES_URL set (here and for subprocesses)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", postgres_db)
    return home


def amygdala(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amygdala_dagster.commands.cli", *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}, cwd=cwd,
    )


def bucket_fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_run_is_recorded_in_postgres_and_the_pair_and_report_land_in_the_bucket(deploy_home, s3_bucket, tmp_path,
                                                                                capsys):
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(8))
    out = f"{s3_bucket}/amygdala"
    proc = amygdala("run", "--memory-file", str(graph), "--min-positives", "3", "--output-dir", out,
                    "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_id = re.search(r"dagster run (\S+) recorded", proc.stdout)[1]

    instance = get_instance()  # deploy/dagster.yaml through DAGSTER_HOME
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert sorted(instance.get_dynamic_partitions("emotion")) == ["curiosity", "frustration", "warmth"]

    fs = bucket_fs()
    base = out.removeprefix("s3://")
    pointer = json.loads(fs.cat(f"{base}/{POINTER_FILE}"))
    assert fs.exists(f"{base}/{pointer['vectors']}") and fs.exists(f"{base}/report/evaluation.html")
    assert not fs.exists(f"{base}/vectors.safetensors")  # on object storage the pair is read via the pointer
    readout = load_readout(out)
    assert readout.sha256 == pointer["vectors_sha256"] and readout.concepts == ["curiosity", "frustration", "warmth"]
    assert cli.main(["inspect", out]) == 0
    assert f"release {pointer['release']}" in capsys.readouterr().out

    before = fs.info(f"{base}/report/evaluation.json")["LastModified"]
    assert cli.main(["report", "--output-dir", out, "--no-snippets", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}/report/evaluation.html" in printed
    fs.invalidate_cache()
    assert fs.info(f"{base}/report/evaluation.json")["LastModified"] >= before
    assert json.loads(fs.cat(f"{base}/report/evaluation.json"))["meta"]["vectors_sha256"] == readout.sha256


def test_second_run_forwards_nothing_with_the_cache_in_the_bucket(deploy_home, s3_bucket, tmp_path):
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(6))
    common = ["--memory-file", str(graph), "--min-positives", "3", "--cache-dir", f"{s3_bucket}/cache"]
    first = amygdala("run", *common, "--output-dir", f"{s3_bucket}/first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert bucket_fs().find(f"{s3_bucket.removeprefix('s3://')}/cache")  # the cache is in the bucket
    second = amygdala("run", *common, "--output-dir", f"{s3_bucket}/second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "activations: 0 texts forwarded" in second.stdout
    assert load_readout(f"{s3_bucket}/first").sha256 == load_readout(f"{s3_bucket}/second").sha256


def test_sensor_tick_and_backfill_against_the_postgres_instance(deploy_home, s3_bucket, tmp_path):
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(6))
    resources = {
        "memory": R.MemoryGraphResource(file=str(graph)),
        "selection": R.SelectionResource(min_positives=3, max_emotions=2),  # the third one comes by backfill
        "storage": R.ArtifactStorage(base_path=f"{s3_bucket}/amygdala"),
        "model": R.ModelResource(cache_dir=str(tmp_path / "cache")),
        "evaluation": R.EvaluationResource(bootstrap=0, snippets_file="none"),
        "sharding": R.ShardingResource(),
    }
    instance = get_instance()
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"

    # one sensor tick, and what the daemon does with its result: partitions, then the requested run
    with dg.build_sensor_context(instance=instance, cursor=None, resources=resources) as context:
        tick = memory_graph_sensor(context)
    assert isinstance(tick, dg.SensorResult) and len(tick.run_requests) == 1
    for request in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    request = tick.run_requests[0]
    result = dg.materialize(ALL_ASSETS, instance=instance, resources=resources,
                            selection=request.asset_selection, tags=request.tags)
    assert result.success, failures(result)
    first = load_readout(f"{s3_bucket}/amygdala").concepts
    (missing,) = {"curiosity", "frustration", "warmth"} - set(first)

    # a backfill of the emotion left out, recorded in the same PostgreSQL database
    backfill = backfill_emotions([missing], resources, instance)
    assert backfill.success, failures(backfill)
    fresh = get_instance()  # a second client of the same database sees both runs and the new partition
    assert missing in fresh.get_dynamic_partitions("emotion")
    runs = {r.run_id: r for r in fresh.get_runs()}
    assert runs[result.run_id].status == runs[backfill.run_id].status == dg.DagsterRunStatus.SUCCESS
    assert runs[backfill.run_id].tags["amygdala/backfill"] == missing
    assert load_readout(f"{s3_bucket}/amygdala").concepts == sorted([*first, missing])


def _pair(tmp_path: Path, seed: int) -> tuple[bytes, bytes, str]:
    d = tmp_path / f"pair-{seed}"
    write_readout(d / "vectors.safetensors", d / "manifest.json", make_readout(seed=seed), **FIELDS)
    m = (d / "manifest.json").read_bytes()
    return (d / "vectors.safetensors").read_bytes(), m, json.loads(m)["vectors_sha256"]


def test_bucket_reader_never_sees_a_mismatched_pair_while_publishing(s3_bucket, tmp_path):
    out = f"{s3_bucket}/amygdala"
    pairs = [_pair(tmp_path, seed) for seed in (1, 2)]
    publish_pair(f"{out}/vectors.safetensors", f"{out}/manifest.json", pairs[0][0], pairs[0][1], keep=3)
    assert_readers_see_whole_pairs(out, f"{out}/vectors.safetensors", f"{out}/manifest.json", pairs, rounds=12)


def test_pointer_read_while_it_is_replaced_gives_one_whole_pointer(s3_bucket):
    """A reader polling ``current.json`` while the publisher replaces it: every read returns one whole
    pointer. A read that checks the object's size and ETag first and then fetches ranges of it fails
    (s3fs: FileExpired) when the object is replaced in between; one GET of the whole object cannot."""
    base = location(f"{s3_bucket}/pointer-race")
    pointers = [json.dumps({"format": POINTER_FORMAT, "release": name, "pad": "x" * size}).encode()
                for name, size in (("a", 10), ("b", 3000))]
    (base / POINTER_FILE).write_bytes(pointers[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            (base / POINTER_FILE).write_bytes(pointers[i % 2])

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = [read_pointer(base) for _ in range(300)]
    finally:
        stop.set()
        t.join(timeout=60)
    assert {p["release"] for p in seen if p} <= {"a", "b"} and all(seen)


S3_KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    import s3fs.core
    from amygdala_dagster.readout.publish import publish_pair
    target, out, vfile, mfile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    calls = 0
    original = s3fs.core.S3FileSystem._call_s3

    async def killing(self, method, *args, **kwargs):
        global calls
        calls += 1
        if calls == target:  # die before this request reaches the server
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, method, *args, **kwargs)

    s3fs.core.S3FileSystem._call_s3 = killing
    publish_pair(f"{out}/vectors.safetensors", f"{out}/manifest.json",
                 open(vfile, "rb").read(), open(mfile, "rb").read(), keep=2)
""")


def test_publisher_killed_at_every_request_leaves_a_whole_pair_in_the_bucket(s3_bucket, tmp_path):
    out = f"{s3_bucket}/amygdala"
    old_v, old_m, old_sha = _pair(tmp_path, 1)
    new_v, new_m, new_sha = _pair(tmp_path, 2)
    vfile, mfile = tmp_path / "v", tmp_path / "m"
    vfile.write_bytes(new_v)
    mfile.write_bytes(new_m)
    publish_pair(f"{out}/vectors.safetensors", f"{out}/manifest.json", old_v, old_m)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = 0
    for target in range(1, 60):
        proc = subprocess.run([sys.executable, "-c", S3_KILL_CHILD, str(target), out, str(vfile), str(mfile)],
                              capture_output=True, text=True, env=env, timeout=120)
        sha = load_readout(out).sha256
        if proc.returncode == 0:
            assert sha == new_sha
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert sha in {old_sha, new_sha}, target
        killed += 1
        publish_pair(f"{out}/vectors.safetensors", f"{out}/manifest.json", old_v, old_m)  # back to the old pair
    else:
        pytest.fail("the publication never completed")
    assert killed >= 4  # the release objects, the pointer and the clean-up were each a kill point
