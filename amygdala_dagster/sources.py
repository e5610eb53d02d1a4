"""Memory-graph sources (Contract 4): an MCP server or a JSONL export.

Both sources return the shared :class:`~amygdala_dagster.nodes.MemoryNode`
list (validated, de-duplicated, sorted by key) and a cheap
:class:`GraphVersion` for change detection.

The MCP client is a small JSON-RPC 2.0 client over synchronous ``httpx``
speaking the streamable-HTTP transport (``initialize`` handshake, then
``tools/call``), rather than the SDK's async client: it gives direct control of
connect/read timeouts and bounded retries, and needs no event loop inside a
Dagster sensor or a notebook.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import httpx

from amygdala_dagster.nodes import MemoryNode, NormalizeReport, normalize_nodes

log = logging.getLogger(__name__)

DEFAULT_MCP_URL = "http://localhost:7777"
DEFAULT_TOKEN_ENV = "AMYGDALA_MEMORY_TOKEN"
# The newest revision reachable through the ``initialize`` handshake in mcp 2.x;
# servers answer with the revision they actually speak and we echo that one.
MCP_PROTOCOL_VERSION = "2025-11-25"
CLIENT_INFO = {"name": "amygdala-dagster", "version": "0.1.0"}
MAX_PAGES = 1_000_000

Progress = Callable[[int], None]


class GraphVersion(NamedTuple):
    version: str
    node_count: int


class MemoryGraphError(RuntimeError):
    """The memory graph could not be read; the message names the URL or file and what failed."""


def jsonl_graph_version(data: bytes) -> GraphVersion:
    """sha256 of a JSONL export's bytes and its number of non-blank lines."""
    count = sum(1 for line in data.splitlines() if line.strip())
    return GraphVersion(hashlib.sha256(data).hexdigest(), count)


class JsonlSource:
    """A JSONL export, one node object per line (blank lines ignored)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def description(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r})"

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise MemoryGraphError(f"memory graph file {self.path} does not exist") from None
        except OSError as exc:
            raise MemoryGraphError(f"cannot read memory graph file {self.path}: {exc.strerror or exc}") from exc

    def _raw_nodes(self, data: bytes, progress: Progress | None) -> Iterator[tuple[str, Any]]:
        n = 0
        for lineno, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise MemoryGraphError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise MemoryGraphError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise MemoryGraphError(f"{where}: not valid JSON (nested too deeply)") from None
            yield where, raw
            n += 1
            if progress is not None and n % 100 == 0:
                progress(n)
        if progress is not None and n % 100:
            progress(n)

    def fetch_nodes(self, progress: Progress | None = None) -> tuple[list[MemoryNode], NormalizeReport]:
        """All usable nodes, sorted by key, and what was skipped or merged."""
        data = self._read()
        return normalize_nodes(self._raw_nodes(data, progress), self.description)

    def graph_version(self) -> GraphVersion:
        return jsonl_graph_version(self._read())


def normalize_mcp_url(url: str) -> str:
    """The MCP endpoint for ``url``: a URL without a path means ``/mcp`` on that host."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"memory MCP URL must be http(s)://host[:port][/path], got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/mcp"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _Retryable(Exception):
    """A failure worth another attempt (connection error, timeout, HTTP 5xx)."""

    def __init__(self, what: str, detail: str):
        super().__init__(detail)
        self.what = what
        self.detail = detail


class _SessionExpired(Exception):
    pass


def _describe_transport_error(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "host name not found"
    return text


class McpSource:
    """A memory graph behind an MCP server (streamable HTTP, JSON-RPC 2.0).

    ``token_env`` names the environment variable read (at call time) for an
    optional bearer token; ``token`` gives one directly instead (e.g. the value
    of a Dagster ``EnvVar``) and takes precedence. The token is never logged, put
    in an error message or shown by ``repr``. Each failed HTTP request is retried ``retries``
    times after a connection error, a timeout or an HTTP 5xx, waiting
    ``backoff * 2**attempt`` seconds in between; a 4xx fails at once.
    """

    def __init__(
        self,
        url: str = DEFAULT_MCP_URL,
        *,
        list_tool: str = "list_nodes",
        version_tool: str = "graph_version",
        token_env: str | None = DEFAULT_TOKEN_ENV,
        token: str | None = None,
        page_size: int = 200,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = normalize_mcp_url(url)
        self.list_tool = list_tool
        self.version_tool = version_tool
        self.token_env = token_env
        self._token = token or None
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff

    def bearer_token(self) -> str | None:
        """The token to send: the one given, else the environment variable's (read now)."""
        if self._token:
            return self._token
        return os.environ.get(self.token_env) if self.token_env else None

    @property
    def description(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"McpSource({self.url!r})"

    def fetch_nodes(self, progress: Progress | None = None) -> tuple[list[MemoryNode], NormalizeReport]:
        """All usable nodes, sorted by key, following ``next_cursor`` until it is null."""
        with _McpSession(self) as session:
            raws = list(self._pages(session, progress))
        return normalize_nodes(raws, self.description)

    def _pages(self, session: _McpSession, progress: Progress | None) -> Iterator[tuple[str, Any]]:
        cursor: str | None = None
        seen: set[str] = set()
        n = 0
        for page in range(1, MAX_PAGES + 1):
            args: dict[str, Any] = {"limit": self.page_size}
            if cursor is not None:
                args["cursor"] = cursor
            result = session.call_tool(self.list_tool, args)
            nodes = result.get("nodes") if isinstance(result, dict) else None
            if not isinstance(nodes, list):
                raise MemoryGraphError(
                    f"{self.url}: {self.list_tool} page {page} has no 'nodes' list (got {_short(result)})"
                )
            for i, raw in enumerate(nodes):
                yield f"{self.url} page {page} item {i}", raw
            n += len(nodes)
            if progress is not None:
                progress(n)
            nxt = result.get("next_cursor")
            if nxt is None:
                return
            if not isinstance(nxt, str):
                raise MemoryGraphError(f"{self.url}: {self.list_tool} page {page} next_cursor is not a string: {nxt!r}")
            if nxt in seen or nxt == cursor:
                raise MemoryGraphError(
                    f"{self.url}: {self.list_tool} repeated cursor {nxt!r} on page {page}; stopping to avoid a loop"
                )
            seen.add(nxt)
            cursor = nxt
        raise MemoryGraphError(f"{self.url}: {self.list_tool} returned more than {MAX_PAGES} pages")

    def graph_version(self) -> GraphVersion:
        with _McpSession(self) as session:
            result = session.call_tool(self.version_tool, {})
        version = result.get("version") if isinstance(result, dict) else None
        count = result.get("node_count") if isinstance(result, dict) else None
        if not isinstance(version, str) or not isinstance(count, int) or isinstance(count, bool):
            raise MemoryGraphError(
                f"{self.url}: {self.version_tool} must return {{'version': str, 'node_count': int}}, "
                f"got {_short(result)}"
            )
        return GraphVersion(version, count)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _McpSession:
    """One initialized MCP session over one ``httpx.Client``."""

    def __init__(self, source: McpSource):
        self.source = source
        self.url = source.url
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._protocol: str | None = None
        timeout = httpx.Timeout(source.read_timeout, connect=source.connect_timeout)
        self._client = httpx.Client(timeout=timeout, follow_redirects=True)

    def __enter__(self) -> _McpSession:
        try:
            self._initialize()
        except BaseException:
            self._client.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._session_id is not None:
                # Politely end a stateful session; a failure here changes nothing for us.
                try:
                    self._client.delete(self.url, headers=self._headers(), timeout=self.source.connect_timeout)
                except httpx.HTTPError:
                    pass
        finally:
            self._client.close()

    def _initialize(self) -> None:
        self._session_id = None
        self._protocol = None
        result = self._request(
            "initialize",
            {"protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO},
        )
        version = result.get("protocolVersion") if isinstance(result, dict) else None
        self._protocol = version if isinstance(version, str) else MCP_PROTOCOL_VERSION
        self._send("notifications/initialized", None, request_id=None)

    def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        """The tool's result: ``structuredContent``, else the JSON of its first text item."""
        try:
            result = self._request("tools/call", {"name": name, "arguments": arguments})
        except _SessionExpired:
            self._initialize()
            result = self._request("tools/call", {"name": name, "arguments": arguments})
        if not isinstance(result, dict):
            raise MemoryGraphError(f"{self.url}: tool {name} returned a malformed result: {_short(result)}")
        texts = [c.get("text", "") for c in result.get("content") or [] if isinstance(c, dict) and c.get("type") == "text"]
        if result.get("isError"):
            message = " ".join(t for t in texts if t) or "no message"
            raise MemoryGraphError(f"{self.url}: tool {name} failed: {message}")
        structured = result.get("structuredContent")
        if structured is not None:
            return structured
        if not texts:
            raise MemoryGraphError(f"{self.url}: tool {name} returned neither structuredContent nor text content")
        try:
            return json.loads(texts[0])
        except json.JSONDecodeError as exc:
            raise MemoryGraphError(f"{self.url}: tool {name} returned text that is not JSON ({exc.msg})") from None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self._session_id is not None:
            headers["mcp-session-id"] = self._session_id
        if self._protocol is not None:
            headers["mcp-protocol-version"] = self._protocol
        token = self.source.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(self, method: str, params: dict[str, Any]) -> Any:
        request_id = next(self._ids)
        return self._send(method, params, request_id=request_id)

    def _send(self, method: str, params: dict[str, Any] | None, *, request_id: int | None) -> Any:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        if request_id is not None:
            message["id"] = request_id
        attempts = self.source.retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.source.backoff * 2 ** (attempt - 1)
                log.warning(
                    "%s: %s (attempt %d of %d); retrying in %.2fs", self.url, last.detail if last else "?",
                    attempt, attempts, delay,
                )
                time.sleep(delay)
            try:
                return self._post_once(message, method, request_id)
            except _Retryable as exc:
                last = exc
        assert last is not None
        raise MemoryGraphError(f"{last.what} {self.url} after {attempts} attempts: {last.detail}")

    def _post_once(self, message: dict[str, Any], method: str, request_id: int | None) -> Any:
        try:
            with self._client.stream("POST", self.url, json=message, headers=self._headers()) as response:
                if response.status_code >= 500:
                    raise _Retryable("server error from", f"HTTP {response.status_code} {response.reason_phrase}")
                if response.status_code in (401, 403):
                    env = self.source.token_env
                    if self.source._token:
                        hint = "the configured bearer token was rejected"
                    elif not env:
                        hint = "no token is configured (token_env is None)"
                    elif not os.environ.get(env):
                        hint = f"no token sent: set the bearer token in the environment variable {env}"
                    else:
                        hint = f"the bearer token from the environment variable {env} was rejected"
                    raise MemoryGraphError(
                        f"authentication failed at {self.url} (HTTP {response.status_code}): {hint}"
                    )
                if response.status_code == 404 and self._session_id is not None and method != "initialize":
                    raise _SessionExpired()
                if response.status_code >= 400:
                    body = response.read().decode("utf-8", "replace").strip()
                    raise MemoryGraphError(
                        f"{self.url} rejected {method} with HTTP {response.status_code} "
                        f"{response.reason_phrase}: {body[:300]}"
                    )
                if method == "initialize":
                    self._session_id = response.headers.get("mcp-session-id")
                if request_id is None:
                    return None
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype == "text/event-stream":
                    reply = self._from_sse(response.iter_lines(), request_id)
                else:
                    reply = self._from_json(response.read(), request_id)
        except httpx.ConnectTimeout:
            raise _Retryable("could not connect to", f"connect timeout after {self.source.connect_timeout}s") from None
        except httpx.ConnectError as exc:
            raise _Retryable("could not connect to", _describe_transport_error(exc)) from None
        except httpx.TimeoutException:
            raise _Retryable("no answer from", f"read timeout after {self.source.read_timeout}s") from None
        except httpx.TransportError as exc:
            raise _Retryable("connection to", f"broken: {_describe_transport_error(exc)}") from None
        if reply is None:
            raise MemoryGraphError(f"{self.url}: no JSON-RPC response to {method} (id {request_id})")
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {"message": reply["error"]}
            raise MemoryGraphError(
                f"{self.url}: {method} failed with JSON-RPC error {err.get('code')}: {err.get('message')}"
            )
        return reply.get("result")

    def _from_json(self, body: bytes, request_id: int) -> dict[str, Any] | None:
        try:
            payload = json.loads(body)
        except ValueError:
            raise MemoryGraphError(f"{self.url}: response is not JSON: {body[:200]!r}") from None
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, dict) and item.get("id") == request_id:
                return item
        return None

    def _from_sse(self, lines: Iterator[str], request_id: int) -> dict[str, Any] | None:
        data: list[str] = []
        for line in itertools.chain(lines, [""]):
            if line == "":
                if data:
                    try:
                        item = json.loads("\n".join(data))
                    except ValueError:
                        item = None
                    data = []
                    if isinstance(item, dict) and item.get("id") == request_id and ("result" in item or "error" in item):
                        return item
                continue
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
        return None


def open_source(
    memory_mcp_url: str | None = None, memory_file: str | os.PathLike[str] | None = None, **mcp_kwargs: Any
) -> JsonlSource | McpSource:
    """The source for the command-line flags ``--memory-mcp-url`` / ``--memory-file``.

    At most one may be given; with neither, the MCP server at :data:`DEFAULT_MCP_URL`.
    ``mcp_kwargs`` go to :class:`McpSource` and are ignored for a file.
    """
    if memory_mcp_url is not None and memory_file is not None:
        raise ValueError("give either --memory-mcp-url or --memory-file, not both")
    if memory_file is not None:
        return JsonlSource(memory_file)
    return McpSource(memory_mcp_url or DEFAULT_MCP_URL, **mcp_kwargs)
