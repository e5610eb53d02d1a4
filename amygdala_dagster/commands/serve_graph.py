"""``amygdala serve-graph``: serve a JSONL memory-graph export over MCP (Contract 4)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amygdala_dagster.commands.flags import byte_size
from amygdala_dagster.data import sample_graph_path
from amygdala_dagster.graph.server import (
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    JsonlGraph,
    RequestLimits,
    check_bind,
    serve,
)
from amygdala_dagster.workflow.settings import current_settings

HELP = "serve a JSONL memory-graph export as an MCP server (list_nodes, graph_version)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file", metavar="GRAPH.jsonl", type=Path, default=None,
        help="JSONL export to serve, one node per line (default: $AMYGDALA_MEMORY_FILE, else the bundled sample graph)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind (default: %(default)s); one that is not loopback needs --allow-remote",
    )
    parser.add_argument("--port", type=int, default=7777, help="port to bind (default: %(default)s)")
    parser.add_argument(
        "--token-env", metavar="NAME", default=None,
        help="require 'Authorization: Bearer <token>', the token read from this environment variable "
             "(without it any process on this machine can read the graph)",
    )
    parser.add_argument(
        "--allow-remote", action="store_true",
        help="allow a --host that is not a loopback address (other machines can connect); requires --token-env",
    )
    parser.add_argument(
        "--max-request-bytes", metavar="SIZE", type=byte_size, default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted, bytes or 512KiB/4MiB; larger ones get 413 (default: %(default)s, 1 MiB)",
    )
    parser.add_argument(
        "--max-inflight-bytes", metavar="SIZE", type=byte_size, default=DEFAULT_MAX_INFLIGHT_BYTES,
        help="request bytes served at once; a request beyond gets 503 with Retry-After (default: %(default)s, 16 MiB)",
    )


def main(args: argparse.Namespace) -> int:
    configured = current_settings().memory_file
    path: Path = (args.file if args.file is not None else Path(configured).expanduser() if configured
                  else sample_graph_path())
    if not path.is_file():
        what = ("--file" if args.file is not None else "AMYGDALA_MEMORY_FILE" if configured
                else "the bundled sample graph")
        print(f"amygdala serve-graph: {what} {path} does not exist", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"amygdala serve-graph: --port {args.port} is not a valid port", file=sys.stderr)
        return 2
    try:
        check_bind(args.host, args.token_env, args.allow_remote)
        limits = RequestLimits(max_request_bytes=args.max_request_bytes, max_inflight_bytes=args.max_inflight_bytes)
    except ValueError as exc:
        print(f"amygdala serve-graph: {exc}", file=sys.stderr)
        return 2
    try:
        n_nodes = len(JsonlGraph(path).load().nodes)
    except OSError as exc:
        print(f"amygdala serve-graph: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(f"serving {n_nodes} nodes from {path} at {url}", flush=True)

    try:
        return serve(path, host=args.host, port=args.port, token_env=args.token_env,
                     allow_remote=args.allow_remote, on_ready=ready, limits=limits)
    except ValueError as exc:
        print(f"amygdala serve-graph: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"amygdala serve-graph: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
