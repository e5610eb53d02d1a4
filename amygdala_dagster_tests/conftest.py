

# --- memory-graph server fixtures (sources/server helper) -------------------------------
import json as _json
import logging as _logging
import os as _os
import socket as _socket
import subprocess as _subprocess
import sys as _sys
import time as _time
from dataclasses import dataclass as _dataclass
from dataclasses import field as _field
from pathlib import Path as _Path

import pytest as _pytest
import torch as _torch

# Under pytest-xdist (`pytest -n 2`) the workers share the cores: one torch thread pool each, not
# one per core each, which would oversubscribe them.
if _os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _torch.set_num_threads(max(1, (_os.cpu_count() or 1) // int(_os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path, nodes) -> _Path:
    """Write ``nodes`` (dicts, or raw strings written as-is) one per line to ``path``."""
    path = _Path(path)
    path.write_text("".join((n if isinstance(n, str) else _json.dumps(n)) + "\n" for n in nodes), encoding="utf-8")
    return path


@_dataclass
class GraphServer:
    """A running ``amygdala serve-graph`` subprocess."""

    url: str
    file: _Path
    port: int
    log: _Path
    process: _subprocess.Popen = _field(repr=False)

    def stop(self) -> None:
        """Stop the server (idempotent); waits for the process to exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except _subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def output(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return self.log.read_text(encoding="utf-8", errors="replace")


@_pytest.fixture
def graph_server(tmp_path_factory):
    """Factory starting the real ``amygdala serve-graph`` on a free 127.0.0.1 port.

    ``graph_server(nodes=None, *, file=None, token_env=None, token=None, args=(), startup_timeout=30.0) -> GraphServer``

    - ``nodes``: a list of node dicts (or raw line strings) written as JSONL to a new file;
    - ``file``: an existing JSONL file to serve instead (edit it to change the graph:
      the server re-reads it when its size/mtime change); with neither, an empty graph;
    - ``token_env`` + ``token``: the server gets ``--token-env token_env`` with that
      variable set to ``token`` in its environment only, and requires
      ``Authorization: Bearer <token>``;
    - ``args``: further ``serve-graph`` flags (``["--max-request-bytes", "64KiB"]``).

    Returns a :class:`GraphServer` with ``.url`` (``http://127.0.0.1:PORT/mcp``),
    ``.file``, ``.port``, ``.stop()`` and ``.output()``. Waits (bounded) until the port
    accepts connections; every server started is killed at teardown.
    """
    started: list[GraphServer] = []

    def start(nodes=None, *, file=None, token_env=None, token=None, args=(), startup_timeout=30.0) -> GraphServer:
        workdir = tmp_path_factory.mktemp("graph_server")
        if file is None:
            file = write_jsonl(workdir / "graph.jsonl", nodes or [])
        elif nodes is not None:
            write_jsonl(file, nodes)
        port = free_port()
        cmd = [_sys.executable, "-m", "amygdala_dagster.commands.cli", "serve-graph", "--file", str(file),
               "--host", "127.0.0.1", "--port", str(port), *args]
        env = dict(_os.environ)
        if token_env is not None:
            cmd += ["--token-env", token_env]
            if token is not None:
                env[token_env] = token
        log = workdir / "server.log"
        with open(log, "wb") as out:
            proc = _subprocess.Popen(cmd, stdout=out, stderr=_subprocess.STDOUT, env=env)
        server = GraphServer(url=f"http://127.0.0.1:{port}/mcp", file=_Path(file), port=port, log=log, process=proc)
        started.append(server)
        deadline = _time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve-graph exited with {proc.returncode}:\n{server.output()}")
            try:
                with _socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if _time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(
                        f"serve-graph did not listen within {startup_timeout}s:\n{server.output()}") from None
                _time.sleep(0.05)
        return server

    yield start
    for server in started:
        server.stop()


# --- weight reads, counted through the DEBUG line models.load_model logs for each ----------
class WeightReads(_logging.Handler):
    """Counts the model weight reads of this process (``count``) while the fixture is active."""

    def __init__(self) -> None:
        super().__init__(_logging.DEBUG)
        self.count = 0

    def emit(self, record: _logging.LogRecord) -> None:
        if ": weights read from " in record.getMessage():
            self.count += 1


@_pytest.fixture
def weight_reads():
    """A :class:`WeightReads` attached to ``amygdala_dagster.engine.models`` for the test."""
    logger = _logging.getLogger("amygdala_dagster.engine.models")
    handler, level = WeightReads(), logger.level
    logger.addHandler(handler)
    logger.setLevel(_logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- the releases this test run resolved to: the first lines of every pytest run (CI included), so a
# failing run shows which release of each key package it ran on (README, "Tested versions") --------------
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "dagster", "dagster-webserver",
                "dagster-postgres", "dagster-k8s", "mcp", "pydantic", "pydantic-settings", "sqlalchemy",
                "psycopg2-binary", "s3fs", "fsspec", "aiobotocore", "botocore", "boto3", "moto",
                "universal-pathlib", "polars", "numpy", "scikit-learn", "scipy")


def key_package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} (not installed)"

    return ", ".join(one(p) for p in KEY_PACKAGES)


def pytest_report_header(config) -> list[str]:
    return [f"key packages: {key_package_versions()}"]
