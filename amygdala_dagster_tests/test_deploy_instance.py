"""The Dagster instance of deploy/dagster.yaml: the PostgreSQL URL as providers print it works in every
Dagster process, and a database that cannot be reached is one line naming the host and the variable
(exit 1), never the password, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from amygdala_dagster.pipeline.instance import InstanceUnavailable, describe, driver_url, open_instance
from amygdala_dagster_tests.conftest import free_port
from amygdala_dagster_tests.servers import postgres_url  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]
DEPLOY_YAML = REPO / "deploy" / "dagster.yaml"
PASSWORD = "pw-Secret-4711"


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "dagster_home"
    h.mkdir()
    shutil.copy(DEPLOY_YAML, h / "dagster.yaml")
    return h


def cli(*args: str, env: dict[str, str], cwd: Path, exe: str | None = None) -> subprocess.CompletedProcess:
    cmd = [exe, *args] if exe else [sys.executable, "-m", "amygdala_dagster.commands.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


@pytest.mark.parametrize("url, expected", [
    ("postgresql://u:p@db:5432/d", "postgresql+psycopg2://u:p@db:5432/d"),
    ("postgres://u:p@db/d?sslmode=require", "postgresql+psycopg2://u:p@db/d?sslmode=require"),
    ("postgresql+psycopg2://u@db/d", "postgresql+psycopg2://u@db/d"),
    ("postgresql+pg8000://u@db/d", "postgresql+pg8000://u@db/d"),  # a driver the user named is kept
])
def test_a_bare_url_gets_the_driver_dagster_postgres_ships(url, expected):
    assert driver_url(url) == expected
    assert PASSWORD not in describe(f"postgresql://u:{PASSWORD}@db.example:6543/dagster")
    assert describe(f"postgresql://u:{PASSWORD}@db.example:6543/dagster") == "db.example:6543/dagster"


@pytest.mark.parametrize("command", [["run"], ["backfill-emotion", "joy"]])
def test_an_unreachable_database_is_one_line_naming_host_and_variable_exit_1(command, home, tmp_path):
    port = free_port()  # nothing listens there
    env = {"DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": f"postgresql://amygdala:{PASSWORD}@127.0.0.1:{port}/dagster",
           "AMYGDALA_OUTPUT_DIR": str(tmp_path / "out"), "AMYGDALA_CACHE_DIR": str(tmp_path / "cache")}
    started = time.monotonic()
    proc = cli(*command, env=env, cwd=tmp_path)
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"amygdala {command[0]}: cannot reach the Dagster instance's PostgreSQL database at 127.0.0.1:{port}/dagster "
        "(the URL comes from $DAGSTER_POSTGRES_URL): Connection refused"), proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert took < 30, f"took {took:.0f} s"  # 3 quick tries, not 18 s of retries and a traceback


def test_an_unset_url_variable_is_one_line(home, tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_POSTGRES_URL", raising=False)
    proc = cli("run", env={"DAGSTER_HOME": str(home), "AMYGDALA_OUTPUT_DIR": str(tmp_path / "out")}, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"amygdala run: {home}/dagster.yaml reads $DAGSTER_POSTGRES_URL, which is not set"


def test_the_dagster_cli_names_the_host_too(home, tmp_path):
    """`dagster instance info` (Dagster's own process) goes through the same storage class."""
    exe = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    port = free_port()
    proc = cli("instance", "info", exe=exe, cwd=tmp_path, env={
        "DAGSTER_HOME": str(home), "DAGSTER_POSTGRES_URL": f"postgresql://a:{PASSWORD}@127.0.0.1:{port}/d"})
    assert proc.returncode != 0
    assert f"cannot reach the Dagster instance's PostgreSQL database at 127.0.0.1:{port}/d" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_bare_url_works_for_the_cli_the_webserver_storage_and_dagster(scheme, postgres_url, home, tmp_path,
                                                                        monkeypatch):
    url = postgres_url.replace("postgresql://", f"{scheme}://", 1)
    assert "+" not in url.split("://")[0]
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", url)
    with open_instance(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.run_storage._engine.url.drivername == "postgresql+psycopg2"
        # what dagster-webserver does to its storages: psycopg 3 closed the connection here ("the connection is
        # closed" on the first query), which is why the driver is named for a bare URL
        instance.run_storage.optimize_for_webserver(statement_timeout=5000, pool_recycle=3600, max_overflow=2)
        instance.event_log_storage.optimize_for_webserver(statement_timeout=5000, pool_recycle=3600, max_overflow=2)
        instance.add_dynamic_partitions("emotion", [f"calm{scheme}"])
        assert instance.get_runs() == [] and f"calm{scheme}" in instance.get_dynamic_partitions("emotion")
    exe = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    info = cli("instance", "info", exe=exe, cwd=tmp_path, env={"DAGSTER_HOME": str(home)})
    assert info.returncode == 0, info.stderr[-3000:]
    assert "run_storage: PostgresRunStorage" in info.stdout \
        and "event_log_storage: PostgresEventLogStorage" in info.stdout


def test_open_instance_maps_a_bad_yaml_to_one_line(tmp_path):
    (tmp_path / "dagster.yaml").write_text("storage:\n  nosuch: {}\n")
    with pytest.raises(InstanceUnavailable, match=r"dagster.yaml: "):
        open_instance(str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with open_instance(str(tmp_path)) as instance:
        assert isinstance(instance, dg.DagsterInstance)
