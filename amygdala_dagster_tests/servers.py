"""Real servers on 127.0.0.1 for the deployment tests: PostgreSQL (the OS package's binaries) and an
S3-compatible server (moto's server mode). Session-scoped: started once, stopped at the end.

Import the fixtures into a test module (``from amygdala_dagster_tests.servers import ...``).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER = "amygdala"
PG_DATABASE = "dagster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server's ``bin`` directory (Debian layout, else ``$PATH``)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name),
                            reverse=True):
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql://...`` (no driver named) of a throw-away cluster on a free loopback port (socket in a temp dir).

    PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres`` user that the
    Debian package creates, and its commands run through ``runuser``.
    """
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="amygdala-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to own the cluster")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, sock, port = base / "data", base / "sock", free_port()
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=120)
    run(bindir / "initdb", "-D", data, "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
    run("mkdir", sock)
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    try:
        run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", base / "server.log", "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        log = (base / "server.log").read_text() if (base / "server.log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{log}") from exc
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", PG_USER, PG_DATABASE)
        # bare, as every provider prints it: deploy/dagster.yaml's storage (pipeline/instance.py) names the driver
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}/{PG_DATABASE}"
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on a free loopback port; the AWS_* variables point at it.

    The variables are the standard ones every client reads (boto3, s3fs, the AWS CLI), so subprocesses
    such as ``amygdala run`` reach the same server without any project-specific setting.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> Iterator[str]:
    """``s3://<new bucket>`` on the loopback S3 server."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"amygdala-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    with contextlib.suppress(Exception):
        fs.rm(name, recursive=True)
