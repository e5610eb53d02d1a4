"""The memory-graph client over MCP (Contract 4): :class:`McpSource`.

The MCP client is the ``mcp`` SDK's (streamable HTTP), run from synchronous
callers with ``asyncio.run`` (or a worker-thread portal inside a running event
loop); this module adds what the project needs around it: the ``/mcp`` default
path, errors that name the URL and the token's environment variable, bounded
retries with backoff (tenacity) and one graph version per read (Contract 4).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio.from_thread
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Implementation, TextContent
from pydantic import SecretStr
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

if sys.version_info < (3, 11):  # the built-in from 3.11; anyio depends on the backport before it
    from exceptiongroup import BaseExceptionGroup

from amygdala_dagster.graph.nodes import (
    GraphVersion,
    MemoryGraphError,
    MemoryNode,
    NormalizeReport,
    Progress,
    normalize_nodes,
)

log = logging.getLogger(__name__)

DEFAULT_MCP_URL = "http://localhost:7777"
DEFAULT_TOKEN_ENV = "AMYGDALA_MEMORY_TOKEN"
CLIENT_INFO = Implementation(name="amygdala-dagster", version="0.1.0")
MAX_PAGES = 1_000_000
MAX_ATTEMPTS = 100_000  # sessions per operation: a backstop should answers and failures alternate forever


def normalize_mcp_url(url: str) -> str:
    """The MCP endpoint for ``url``: a URL without a path means ``/mcp`` on that host."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"memory MCP URL must be http(s)://host[:port][/path], got {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/mcp"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


STALE_CURSOR = "stale cursor"
"""Words that begin a ``list_nodes`` error for a cursor issued before the graph changed (Contract 4)."""


class _Retryable(Exception):
    """A failure worth another attempt (connection error, timeout, HTTP 5xx, lost session)."""

    def __init__(self, what: str, detail: str):
        super().__init__(detail)
        self.what = what
        self.detail = detail


class _GraphChanged(Exception):
    """The graph changed during a read: restart it from the first page."""

    @classmethod
    def between(cls, old: GraphVersion, new: GraphVersion) -> _GraphChanged:
        return cls(f"the graph changed during the read: version {old.version[:12]} became {new.version[:12]}")


class _HttpStatus(Exception):
    """An HTTP answer the MCP transport would blur into a generic JSON-RPC error (raised by a response hook)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status


async def _check_status(response: httpx2.Response) -> None:
    if response.request.method == "POST" and (response.status_code in (401, 403) or response.status_code >= 500):
        raise _HttpStatus(response.status_code, response.reason_phrase)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _describe_transport_error(exc: httpx2.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, httpx2.ConnectError) and ("refused" in low or "all connection attempts failed" in low):
        return "connection refused"
    if "name or service not known" in low or "nodename nor servname" in low or "name resolution" in low:
        return "host name not found"
    return text


class McpSource:
    """A memory graph behind an MCP server (streamable HTTP), through the ``mcp`` SDK's client.

    ``token_env`` names the environment variable read (at call time) for an
    optional bearer token; ``token`` gives one directly instead (e.g. the value
    of a Dagster ``EnvVar``) and takes precedence. The token is never logged, put
    in an error message or shown by ``repr``.

    A connection error, a timeout or an HTTP 5xx is retried up to ``retries``
    times in a row, waiting ``backoff * 2**n`` seconds (the count starts again
    after each answer that arrives); a 401/403 or a tool error fails at once.
    A read is consistent (Contract 4): when the graph changes during it (the
    server says a cursor is stale, or ``graph_version`` differs at the end) the
    read starts again from the first page, at most ``max_restarts`` times.
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
        max_restarts: int = 3,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.url = normalize_mcp_url(url)
        self.list_tool = list_tool
        self.version_tool = version_tool
        self.token_env = token_env
        self._token = SecretStr(token) if token else None
        self.page_size = page_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_restarts = max_restarts

    def bearer_token(self) -> str | None:
        """The token to send: the one given, else the environment variable's (read now)."""
        if self._token is not None:
            return self._token.get_secret_value()
        return os.environ.get(self.token_env) if self.token_env else None

    @property
    def description(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"McpSource({self.url!r})"

    # -- public, synchronous ------------------------------------------------------------

    def fetch_nodes(self, progress: Progress | None = None) -> tuple[list[MemoryNode], NormalizeReport]:
        """All usable nodes of one graph version, sorted by key; ``report.version`` is that version."""
        raws, version = _run_sync(self._read_all, progress)
        nodes, report = normalize_nodes(raws, self.description)
        report.version = version
        return nodes, report

    def graph_version(self) -> GraphVersion:
        async def once(client: _CountingClient) -> GraphVersion:
            return await self._version(client)

        version: GraphVersion = _run_sync(self._with_session, once, _Budget())
        return version

    # -- the read -----------------------------------------------------------------------

    async def _read_all(self, progress: Progress | None) -> tuple[list[tuple[str, Any]], GraphVersion]:
        budget = _Budget()
        for restart in range(self.max_restarts + 1):
            read = _Read()
            try:
                await self._with_session(functools.partial(self._pages, read=read, progress=progress), budget)
                assert read.version is not None  # _pages read it first
                return read.raws, read.version
            except _GraphChanged as exc:
                if restart == self.max_restarts:
                    raise MemoryGraphError(
                        f"{self.url}: the memory graph changed during the read {restart + 1} times in a row "
                        f"(last time {str(exc).split(': ', 1)[-1]}); giving up, try again when it is quiet"
                    ) from None
                log.warning("%s: %s; reading again from the first page (restart %d of %d)",
                            self.url, exc, restart + 1, self.max_restarts)
        raise AssertionError("unreachable")

    async def _pages(self, client: _CountingClient, read: _Read, progress: Progress | None) -> None:
        """Continue ``read`` (its state survives a reconnect) until the last page and a version check."""
        if read.version is None:
            read.version = await self._version(client)
        while not read.done:
            page = read.pages + 1
            args: dict[str, Any] = {"limit": self.page_size}
            if read.cursor is not None:
                args["cursor"] = read.cursor
            try:
                result = await self._call(client, self.list_tool, args, f"page {page}")
            except MemoryGraphError as exc:
                if read.cursor is None:
                    raise
                # Any server may refuse a cursor once its graph moved on, whatever its words.
                now = await self._version(client)
                if STALE_CURSOR in str(exc).lower() or now != read.version:
                    raise _GraphChanged.between(read.version, now) from None
                raise
            nodes = result.get("nodes") if isinstance(result, dict) else None
            if not isinstance(nodes, list):
                raise MemoryGraphError(
                    f"{self.url}: {self.list_tool} page {page} has no 'nodes' list (got {_short(result)})"
                )
            nxt = result.get("next_cursor")
            if nxt is not None and not isinstance(nxt, str):
                raise MemoryGraphError(f"{self.url}: {self.list_tool} page {page} next_cursor is not a string: {nxt!r}")
            if nxt is not None and (nxt in read.seen or nxt == read.cursor):
                raise MemoryGraphError(
                    f"{self.url}: {self.list_tool} repeated cursor {nxt!r} on page {page}; stopping to avoid a loop"
                )
            read.raws.extend((f"{self.url} page {page} item {i}", raw) for i, raw in enumerate(nodes))
            read.pages = page
            if progress is not None:
                progress(len(read.raws))
            if nxt is None:
                read.done = True
            else:
                read.seen.add(nxt)
                read.cursor = nxt
            if read.pages >= MAX_PAGES and not read.done:
                raise MemoryGraphError(f"{self.url}: {self.list_tool} returned more than {MAX_PAGES} pages")
        # A server without version-bound cursors may have changed between pages.
        now = await self._version(client)
        if now != read.version:
            raise _GraphChanged.between(read.version, now)

    async def _version(self, client: _CountingClient) -> GraphVersion:
        result = await self._call(client, self.version_tool, {}, "")
        version = result.get("version") if isinstance(result, dict) else None
        count = result.get("node_count") if isinstance(result, dict) else None
        if not isinstance(version, str) or not isinstance(count, int) or isinstance(count, bool):
            raise MemoryGraphError(
                f"{self.url}: {self.version_tool} must return {{'version': str, 'node_count': int}}, "
                f"got {_short(result)}"
            )
        return GraphVersion(version, count)

    async def _call(self, client: _CountingClient, name: str, arguments: dict[str, Any], where: str) -> Any:
        """The tool's result: ``structuredContent``, else the JSON of its first text item."""
        what = f"tool {name}" + (f" ({where})" if where else "")
        result = await client.call_tool(name, arguments, what)
        texts = [c.text for c in result.content if isinstance(c, TextContent)]
        if result.is_error:
            message = " ".join(t for t in texts if t) or "no message"
            raise MemoryGraphError(f"{self.url}: {what} failed: {message}")
        if result.structured_content is not None:
            return result.structured_content
        if not texts:
            raise MemoryGraphError(f"{self.url}: {what} returned neither structuredContent nor text content")
        try:
            return json.loads(texts[0])
        except json.JSONDecodeError as exc:
            raise MemoryGraphError(f"{self.url}: {what} returned text that is not JSON ({exc.msg})") from None
        except RecursionError:
            raise MemoryGraphError(f"{self.url}: {what} returned JSON nested too deeply") from None

    # -- sessions and retries -------------------------------------------------------------

    async def _with_session(self, work: Callable[[_CountingClient], Awaitable[_T]], budget: _Budget) -> _T:
        """``work(client)`` in an MCP session, reconnecting and retrying transient failures."""

        def wait(state: RetryCallState) -> float:
            return float(self.backoff * 2 ** (budget.failures - 1))

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s: %s (attempt %d of %d); retrying in %.2fs", self.url,
                        getattr(exc, "detail", exc), budget.failures, self.retries + 1, state.upcoming_sleep)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=lambda state: budget.failures > self.retries or state.attempt_number > MAX_ATTEMPTS,
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._session_once(work, budget)
        except _Retryable as exc:
            raise MemoryGraphError(f"{exc.what} {self.url} after {budget.failures} attempts: {exc.detail}") from None
        raise AssertionError("unreachable")

    async def _session_once(self, work: Callable[[_CountingClient], Awaitable[_T]], budget: _Budget) -> _T:
        headers = {}
        token = self.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        http = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(self.read_timeout, connect=self.connect_timeout),
            event_hooks={"response": [_check_status]},
        )
        try:
            async with http, Client(streamable_http_client(self.url, http_client=http),
                                    client_info=CLIENT_INFO) as client:
                budget.current = "the MCP handshake"
                counting = _CountingClient(client, budget)
                return await work(counting)
        except (MemoryGraphError, _GraphChanged):
            raise
        except BaseException as exc:  # the transport raises exception groups
            classified = self._classify(exc, budget)
            if isinstance(classified, _Retryable):
                budget.failures += 1
            raise classified from None

    def _classify(self, exc: BaseException, budget: _Budget) -> BaseException:
        leaves = _leaves(exc)
        for leaf in leaves:
            if isinstance(leaf, (MemoryGraphError, _GraphChanged)):
                return leaf
        for leaf in leaves:
            if isinstance(leaf, _HttpStatus):
                if leaf.status in (401, 403):
                    return MemoryGraphError(f"authentication failed at {self.url} ({leaf}): {self._auth_hint()}")
                return _Retryable("server error from", str(leaf))
            if isinstance(leaf, httpx2.ConnectTimeout):
                return _Retryable("could not connect to", f"connect timeout after {self.connect_timeout}s")
            if isinstance(leaf, httpx2.ConnectError):
                return _Retryable("could not connect to", _describe_transport_error(leaf))
            if isinstance(leaf, httpx2.TimeoutException):
                return _Retryable("no answer from", f"read timeout after {self.read_timeout}s")
            if isinstance(leaf, httpx2.TransportError):
                return _Retryable("connection to", f"broken: {_describe_transport_error(leaf)}")
            if isinstance(leaf, MCPError):
                if leaf.message == "Session terminated":
                    return _Retryable("session lost at", "the server ended the MCP session")
                message = " ".join(leaf.message.split())
                if "recursion limit" in message:
                    message = "the answer is JSON nested too deeply"
                return MemoryGraphError(f"{self.url}: {budget.current} failed: MCP error {leaf.code}: "
                                        f"{_short(message, 300)}")
            if isinstance(leaf, RecursionError):
                return MemoryGraphError(f"{self.url}: {budget.current} failed: the answer is nested too deeply")
        if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
            return exc
        first = leaves[0] if leaves else exc
        return MemoryGraphError(
            f"{self.url}: {budget.current} failed: {type(first).__name__}: {_short(' '.join(str(first).split()), 300)}"
        )

    def _auth_hint(self) -> str:
        env = self.token_env
        if self._token is not None:
            return "the configured bearer token was rejected"
        if not env:
            return "no token is configured (token_env is None)"
        if not os.environ.get(env):
            return f"no token sent: set the bearer token in the environment variable {env}"
        return f"the bearer token from the environment variable {env} was rejected"


_T = TypeVar("_T")


@dataclass
class _Budget:
    """Failures in a row, shared by the attempts of one operation; an answer resets it."""

    failures: int = 0
    current: str = ""
    """The call in flight (``tool list_nodes (page 3)``), for error messages."""


@dataclass
class _Read:
    """The state of one read, kept across reconnects."""

    version: GraphVersion | None = None
    cursor: str | None = None
    seen: set[str] = field(default_factory=set)
    raws: list[tuple[str, Any]] = field(default_factory=list)
    pages: int = 0
    done: bool = False


class _CountingClient:
    """The SDK client; each answer that arrives resets the retry budget's count of failures in a row."""

    def __init__(self, client: Client, budget: _Budget):
        self._client = client
        self._budget = budget

    async def call_tool(self, name: str, arguments: dict[str, Any], what: str) -> CallToolResult:
        self._budget.current = what
        result = await self._client.call_tool(name, arguments)
        self._budget.failures = 0
        return result


def _run_sync(fn: Callable[..., Coroutine[Any, Any, _T]], *args: Any) -> _T:
    """Run the coroutine function ``fn(*args)`` to completion from synchronous code.

    With no event loop running in this thread (a CLI, a Dagster op) ``asyncio.run``;
    inside one (a notebook) a blocking portal runs it on a worker thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(fn(*args))
    with anyio.from_thread.start_blocking_portal() as portal:
        result: _T = portal.call(fn, *args)
        return result


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
