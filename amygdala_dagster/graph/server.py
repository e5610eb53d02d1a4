"""An MCP server for the memory-graph protocol (Contract 4) over a JSONL export.

Tools: ``list_nodes(cursor, limit)`` and ``graph_version()``, served over
streamable HTTP at ``/mcp``, stateless with plain JSON responses. The file is
re-read whenever its size or modification time changes, so editing the export
changes what the server answers without a restart; a cursor issued before the
change is then refused as stale, so no read mixes two versions (Contract 4).

Memory is bounded per request and in total (:class:`RequestLimits`): a body
over ``max_request_bytes`` is answered 413, and a request that would take the
bodies of the requests in flight over ``max_inflight_bytes`` is answered 503
with ``Retry-After``. Each accepted byte becomes several objects inside the
SDK (the parsed message, the arguments, the answer), so without the caps 100
parallel 3.9 MB requests took the process from 85 MB to 1-1.9 GB. glibc
keeps freed heap memory mapped, so after a burst of large requests the server
returns it with ``malloc_trim`` once nothing is in flight
(``benchmarks/serve_graph_memory.py`` measures both).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from amygdala_dagster.graph.mcp_source import STALE_CURSOR
from amygdala_dagster.graph.nodes import GraphVersion
from amygdala_dagster.graph.sources import jsonl_graph_version

log = logging.getLogger(__name__)

NODE_FIELDS = ("key", "node_type", "content", "created_at", "updated_at")
MAX_PAGE_SIZE = 1000
MAX_JSON_DEPTH = 64
#: Default cap on one request body (the protocol's requests are well under 1 KB).
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
#: Default cap on the bodies of all requests in flight together.
DEFAULT_MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
#: After this many request bytes since the last trim, freed heap memory is returned once idle.
TRIM_AFTER_BYTES = 1024 * 1024
#: Seconds between the end of such a request and the trim (at most one trim per interval).
TRIM_DELAY_S = 0.5
#: Characters of a client's cursor repeated in an error message.
_SHOWN_CURSOR_CHARS = 40


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/dicts more than ``limit`` levels (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


class NodesPage(TypedDict):
    nodes: list[dict[str, Any]]
    next_cursor: str | None


class VersionInfo(TypedDict):
    version: str
    node_count: int


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int]  # (mtime_ns, size)
    version: GraphVersion
    nodes: list[dict[str, Any]]


class JsonlGraph:
    """A JSONL export, loaded lazily and re-read when the file changes on disk."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def load(self) -> _Loaded:
        with self._lock:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if self._loaded is None or self._loaded.stamp != stamp:
                self._loaded = self._read(stamp)
            return self._loaded

    def _read(self, stamp: tuple[int, int]) -> _Loaded:
        data = self.path.read_bytes()
        nodes: list[dict[str, Any]] = []
        for lineno, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                log.warning("%s:%d: skipped, not valid JSON (%s)", self.path, lineno, exc)
                continue
            except RecursionError:
                log.warning("%s:%d: skipped, not valid JSON (nested too deeply)", self.path, lineno)
                continue
            if not isinstance(raw, dict):
                log.warning("%s:%d: skipped, not a JSON object", self.path, lineno)
                continue
            # Only the protocol's fields; absent ones stay absent so the client's
            # validation reports them exactly as it would for the file itself.
            node = {f: raw[f] for f in NODE_FIELDS if f in raw}
            if _too_deep(node, MAX_JSON_DEPTH):
                # The SDK's serializer gives up on deep values, which would fail every page holding the node.
                log.warning("%s:%d: skipped, JSON nested too deeply (more than %d levels)",
                            self.path, lineno, MAX_JSON_DEPTH)
                continue
            nodes.append(node)
        version = jsonl_graph_version(data)
        log.info("loaded %d node(s) from %s (version %s)", len(nodes), self.path, version.version[:12])
        return _Loaded(stamp=stamp, version=version, nodes=nodes)


_CURSOR = re.compile(r"^([0-9a-f]{16})-([0-9]+)$")


def _make_cursor(version: GraphVersion, offset: int) -> str:
    """An opaque cursor: the first 16 hex digits of the graph version it belongs to, then the offset."""
    return f"{version.version[:16]}-{offset}"


def _shown(cursor: str) -> str:
    """``cursor`` for an error message: its repr, cut short (a client's megabytes are not echoed back)."""
    if len(cursor) <= _SHOWN_CURSOR_CHARS:
        return repr(cursor)
    return f"{cursor[:_SHOWN_CURSOR_CHARS]!r}... ({len(cursor)} characters)"


def _parse_cursor(cursor: str | None, current: GraphVersion) -> int:
    """The offset a cursor points at; ToolError for a foreign cursor or one issued for another version."""
    if cursor is None or cursor == "":
        return 0
    m = _CURSOR.match(cursor)
    if m is None:
        raise ToolError(f"invalid cursor {_shown(cursor)}: pass back a next_cursor this server returned")
    if m.group(1) != current.version[:16]:
        raise ToolError(
            f"{STALE_CURSOR}: the graph changed since this cursor was issued (version {m.group(1)} is now "
            f"{current.version[:16]}); restart the read from the first page"
        )
    return int(m.group(2))


def build_mcp_server(path: str | os.PathLike[str]) -> MCPServer:
    """The :class:`MCPServer` with the two Contract-4 tools over the JSONL file at ``path``."""
    graph = JsonlGraph(path)
    server = MCPServer(
        "amygdala-memory-graph",
        instructions="Memory-graph nodes from a JSONL export (list_nodes, graph_version).",
        log_level="WARNING",
    )

    @server.tool()
    def list_nodes(cursor: str | None = None, limit: int = 200) -> NodesPage:
        """One page of nodes in file order; pass ``next_cursor`` back until it is null.

        A cursor is bound to the graph version it was issued for: once the file
        changes it is refused as stale, and the read must start again.
        """
        if limit < 1:
            raise ToolError(f"limit must be at least 1, got {limit}")
        limit = min(limit, MAX_PAGE_SIZE)
        loaded = graph.load()
        start = _parse_cursor(cursor, loaded.version)
        end = start + limit
        nxt = _make_cursor(loaded.version, end) if end < len(loaded.nodes) else None
        return {"nodes": loaded.nodes[start:end], "next_cursor": nxt}

    @server.tool()
    def graph_version() -> VersionInfo:
        """sha256 of the export's bytes and its number of non-blank lines, for change detection."""
        v = graph.load().version
        return {"version": v.version, "node_count": v.node_count}

    return server


async def _send_json(send: Send, status: int, body: dict[str, str],
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), *headers, (b"content-length", str(len(data)).encode())],
    })
    await send({"type": "http.response.body", "body": data})


class _BearerAuth:
    """Rejects HTTP requests whose ``Authorization`` is not ``Bearer <token>`` with 401.

    The scheme is matched case-insensitively (RFC 9110 section 11.1: ``bearer``
    and ``BEARER`` are the same scheme); the token is compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = token.encode()

    def _authorized(self, given: bytes) -> bool:
        scheme, _, credentials = given.strip().partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        return hmac.compare_digest(credentials.strip(), self._expected) and ok_scheme

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not self._authorized(given):
                await _send_json(send, 401, {"error": "unauthorized", "detail": "missing or wrong bearer token"},
                                 ((b"www-authenticate", b'Bearer realm="amygdala-memory-graph"'),))
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on the request bytes the server holds (see the module docstring).

    ``max_request_bytes``: one request body, larger ones get 413.
    ``max_inflight_bytes``: the bodies of all requests being served together;
    a request that would go over gets 503 with ``Retry-After: retry_after_s``.
    ``trim``: return freed heap memory to the system (glibc ``malloc_trim``)
    when nothing is in flight, after at least ``TRIM_AFTER_BYTES`` of requests.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    retry_after_s: int = 1
    trim: bool = True

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError(
                f"--max-inflight-bytes {self.max_inflight_bytes} is below --max-request-bytes "
                f"{self.max_request_bytes}: a request of the allowed size could never be served"
            )


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (returns free heap pages of every arena to the system), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # absent from musl
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses such a request before it gets here
    return None


class _RequestLimits:
    """Caps one request body (413) and the bodies in flight together (503 + ``Retry-After``).

    The body is read here, counted as it arrives, and handed to the app as one
    message; its bytes stay reserved until the app has answered. Runs on the
    event loop, so the counter needs no lock.
    """

    def __init__(self, app: ASGIApp, limits: RequestLimits):
        self.app = app
        self.limits = limits
        self._inflight = 0
        self._since_trim = 0
        self._trim = _malloc_trim() if limits.trim else None
        self._trim_timer: asyncio.TimerHandle | None = None

    async def _too_large(self, send: Send, size: str) -> None:
        await _send_json(send, 413, {
            "error": "request too large",
            "detail": f"the request body is {size}; this server accepts at most "
                      f"{self.limits.max_request_bytes} bytes per request (serve-graph --max-request-bytes)",
        })

    async def _busy(self, send: Send) -> None:
        await _send_json(send, 503, {
            "error": "busy",
            "detail": f"requests in flight hold {self._inflight} of the {self.limits.max_inflight_bytes} "
                      "request bytes this server serves at once (serve-graph --max-inflight-bytes); retry later",
        }, ((b"retry-after", str(self.limits.retry_after_s).encode()),))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, budget = self.limits.max_request_bytes, self.limits.max_inflight_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._too_large(send, f"{declared} bytes")
            return
        if declared is not None and self._inflight + declared > budget:
            await self._busy(send)
            return
        reserved = declared or 0
        self._inflight += reserved
        try:
            chunks: list[bytes] = []
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:  # a body without Content-Length, or one longer than declared
                    chunks.clear()
                    await self._too_large(send, f"more than {limit} bytes")
                    return
                if received > reserved:
                    if self._inflight + received - reserved > budget:
                        chunks.clear()
                        await self._busy(send)
                        return
                    self._inflight += received - reserved
                    reserved = received
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body: bytes | None = b"".join(chunks)
            chunks.clear()

            async def replay() -> Message:
                # The body once, then the server's own messages (a disconnect); no reference to it is kept.
                nonlocal body
                if body is not None:
                    message, body = {"type": "http.request", "body": body, "more_body": False}, None
                    return message
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self._inflight -= reserved
            self._since_trim += reserved
            if self._trim is not None and self._since_trim >= TRIM_AFTER_BYTES and self._trim_timer is None:
                self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._idle_trim)

    def _idle_trim(self) -> None:
        """Once nothing is in flight: collect the garbage (cycles such as exceptions' frames hold request data)
        and return the freed heap to the system. Runs on the event loop, at most every ``TRIM_DELAY_S``."""
        self._trim_timer = None
        if self._inflight > 0:
            self._trim_timer = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._idle_trim)
            return
        self._since_trim = 0
        gc.collect()
        if self._trim is not None:
            self._trim()


def build_app(path: str | os.PathLike[str], token: str | None = None, host: str = "127.0.0.1",
              limits: RequestLimits | None = RequestLimits()) -> ASGIApp:
    """The ASGI app serving the JSONL export at ``path`` on ``/mcp``.

    With ``token``, every HTTP request must carry ``Authorization: Bearer <token>``
    (checked first: a refused request's body is never read). ``host`` is the bind
    address: on a loopback address the SDK's DNS-rebinding protection stays on
    and accepts ``127.0.0.1``/``localhost`` Host headers. ``limits`` bounds the
    request bytes held (None: unbounded, for comparison only).
    """
    app: ASGIApp = build_mcp_server(path).streamable_http_app(
        streamable_http_path="/mcp", stateless_http=True, json_response=True, host=host
    )
    if limits is not None:
        app = _RequestLimits(app, limits)
    return _BearerAuth(app, token) if token else app


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost`` or a loopback IP (``127.0.0.0/8``, ``::1``).

    Other host names count as remote: what they resolve to can change.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token_env: str | None, allow_remote: bool) -> str | None:
    """The bearer token to require (read from ``token_env``), after the bind-address policy.

    A non-loopback ``host`` is refused unless ``allow_remote``, and then needs a
    token. ``ValueError`` names the flag to change; nothing has been bound yet.
    """
    if not is_loopback_host(host):
        if not allow_remote:
            raise ValueError(
                f"--host {host} is not a loopback address: the graph would be reachable from other machines. "
                "Pass --allow-remote (with --token-env) to serve it there"
            )
        if not token_env:
            raise ValueError("--allow-remote requires a token: give --token-env NAME, the variable holding it")
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"--token-env {token_env} given but the environment variable {token_env} is not set")
    return token


def serve(
    path: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 7777,
    token_env: str | None = None,
    *,
    allow_remote: bool = False,
    on_ready: Callable[[str], None] | None = None,
    limits: RequestLimits | None = RequestLimits(),
) -> int:
    """Serve the JSONL export at ``path`` until interrupted; returns an exit status.

    ``token_env`` names an environment variable holding the bearer token that
    clients must send; it must be set when given (``ValueError`` otherwise).
    A non-loopback ``host`` needs ``allow_remote`` and a token (see :func:`check_bind`).
    ``port=0`` picks a free port. ``on_ready(url)`` is called once the server
    accepts connections. ``limits`` bounds the request bytes held (see
    :class:`RequestLimits`). A port that cannot be bound raises ``OSError``.
    """
    token = check_bind(host, token_env, allow_remote)
    if not is_loopback_host(host):
        log.warning("serving %s on %s, reachable from other machines (bearer token required)", path, host)
    app = build_app(path, token=token, host=host, limits=limits)
    # Bind here rather than in uvicorn, which exits the process on a bind failure.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    if token is None:
        log.info("no --token-env: any process on this machine can read the graph through %s:%s", host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}/mcp"

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(url)
        await task

    try:
        asyncio.run(run())
    finally:
        sock.close()
    return 0 if server.started else 1
