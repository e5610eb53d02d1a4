"""`amygdala serve-graph` under a burst of large requests: the server's RSS before, during, after and idle.

The report (Reliability round 2, item 7): 100 parallel authenticated requests
of 3.9 MB each took the server from 85 MB to 1.9 GB RSS, and it stayed there
when idle. This script starts the real server on 127.0.0.1 (one fresh process
per configuration), sends one small request, measures the idle RSS, fires the
burst from 100 threads (httpx, one connection each) while sampling the
server's RSS every 10 ms, and measures the RSS right after the burst and after
a few idle seconds. Every configuration runs in the same invocation:

- ``unbounded (before)``: the app without :class:`RequestLimits` (the server as
  it was: no caps, no trimming);
- ``unbounded + trim``: caps too high to matter, ``malloc_trim`` on;
- ``4 MiB/16 MiB no trim`` and ``4 MiB/16 MiB + trim``: caps that let 3.9 MB
  requests through, up to 16 MiB of them at once, without and with trimming;
- ``defaults (CLI)``: ``amygdala serve-graph`` with its default flags
  (1 MiB per request, 16 MiB in flight): every 3.9 MB request is refused.

Payloads (``--payload``): ``cursor`` calls ``list_nodes`` with a 3.9 MB cursor
(the error message used to echo it whole), ``padding`` calls ``graph_version``
with 3.9 MB of extra JSON. Also timed: 200 sequential small requests per
configuration (what the limits cost a normal call).

    python benchmarks/serve_graph_memory.py                    # both payloads, ~2 minutes on 2 cores
    python benchmarks/serve_graph_memory.py --payload cursor --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import MiB, format_table  # noqa: E402

TOKEN_ENV = "SERVE_GRAPH_BENCH_TOKEN"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

# name -> ("cli", extra flags) or ("child", limits spec for --child)
CONFIGS: dict[str, tuple[str, list[str] | str]] = {
    "unbounded (before)": ("child", "none"),
    "unbounded + trim": ("child", f"{1024 * MiB},{1024 * MiB},trim"),
    "4 MiB/16 MiB no trim": ("child", f"{4 * MiB},{16 * MiB},notrim"),
    "4 MiB/16 MiB + trim": ("cli", ["--max-request-bytes", "4MiB", "--max-inflight-bytes", "16MiB"]),
    "defaults (CLI)": ("cli", []),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args: argparse.Namespace) -> int:
    """Serve with the library entry point and the given limits (``none``, or ``REQ,INFLIGHT,trim|notrim``)."""
    from amygdala_dagster.graph.server import RequestLimits, serve

    limits = None
    if args.limits != "none":
        req, inflight, trim = args.limits.split(",")
        limits = RequestLimits(max_request_bytes=int(req), max_inflight_bytes=int(inflight), trim=trim == "trim")
    return serve(args.file, port=args.port, token_env=TOKEN_ENV, limits=limits)


def start(kind: str, spec: list[str] | str, graph: Path, token: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "cli":
        cmd = [sys.executable, "-m", "amygdala_dagster.commands.cli", "serve-graph", "--file", str(graph),
               "--port", str(port), "--token-env", TOKEN_ENV, *spec]
    else:
        cmd = [sys.executable, __file__, "--child", "--file", str(graph), "--port", str(port), "--limits", str(spec)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, TOKEN_ENV: token})
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("server did not listen within 60 s") from None
            time.sleep(0.05)


def payload(kind: str, size: int) -> bytes:
    if kind == "cursor":
        message = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                   "params": {"name": "list_nodes", "arguments": {"cursor": "x" * size}}}
    else:
        message = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                   "params": {"name": "graph_version", "arguments": {}},
                   "padding": ["y" * 100] * (size // 104)}
    return json.dumps(message).encode()


def run_config(name: str, kind: str, spec: list[str] | str, body: bytes, graph: Path, args: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:
    import httpx
    import psutil

    token = "bench-" + os.urandom(8).hex()
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    proc, url = start(kind, spec, graph, token, workdir / f"{name.replace(' ', '_').replace('/', '_')}.log")
    try:
        server = psutil.Process(proc.pid)
        small = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                            "params": {"name": "graph_version", "arguments": {}}}).encode()
        with httpx.Client(timeout=60) as client:
            assert client.post(url, content=small, headers=headers).status_code == 200
            t0 = time.perf_counter()
            latencies = []
            for _ in range(args.small):
                t = time.perf_counter()
                client.post(url, content=small, headers=headers).raise_for_status()
                latencies.append(time.perf_counter() - t)
            small_s = time.perf_counter() - t0
        time.sleep(1.0)
        idle = server.memory_info().rss
        peak, stop = [idle], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                stop.wait(0.01)

        def one(_: int) -> str:
            try:
                return str(httpx.post(url, content=body, headers=headers, timeout=300).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            statuses = list(pool.map(one, range(args.requests)))
        burst_s = time.perf_counter() - t0
        after = server.memory_info().rss
        time.sleep(args.idle)
        idle_after = server.memory_info().rss
        stop.set()
        sampler.join()
        return {
            "config": name, "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
            "idle_mib": idle / MiB, "peak_mib": peak[0] / MiB, "after_burst_mib": after / MiB,
            "idle_after_mib": idle_after / MiB, "burst_s": burst_s,
            "small_requests": args.small, "small_total_s": small_s,
            "small_median_ms": statistics.median(latencies) * 1000 if latencies else None,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payload", choices=("cursor", "padding", "both"), default="both")
    parser.add_argument("--requests", type=int, default=100, help="parallel requests in the burst (default: 100)")
    parser.add_argument("--size", type=int, default=3_900_000, help="bytes per request (default: 3,900,000)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before the last RSS (default: 3)")
    parser.add_argument("--small", type=int, default=200, help="sequential small requests timed first (default: 200)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--limits", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from amygdala_dagster.data import sample_graph_path

    graph = sample_graph_path()
    payloads = ("cursor", "padding") if args.payload == "both" else (args.payload,)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="serve-graph-bench-") as tmp:
        for kind in payloads:
            body = payload(kind, args.size)
            for name in names:
                print(f"  [{time.strftime('%H:%M:%S')}] {kind}: {name} ...", file=sys.stderr, flush=True)
                how, spec = CONFIGS[name]
                r = {"payload": kind, "body_bytes": len(body),
                     **run_config(name, how, spec, body, graph, args, Path(tmp))}
                results.append(r)
                rows.append([kind, name, ", ".join(f"{k}: {v}" for k, v in r["statuses"].items()),
                             r["idle_mib"], r["peak_mib"], r["after_burst_mib"], r["idle_after_mib"],
                             r["burst_s"], r["small_median_ms"]])
    print(f"\n{args.requests} parallel requests of {args.size:,} bytes each against `amygdala serve-graph` "
          f"(bundled sample graph, token required); RSS of the server process in MiB; idle = {args.idle:g} s later\n")
    print(format_table(["payload", "server", "answers", "RSS idle", "RSS peak", "RSS after burst",
                        "RSS idle after", "burst s", "small req ms (median)"], rows))
    if args.json:
        args.json.write_text(json.dumps({"requests": args.requests, "size": args.size, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
