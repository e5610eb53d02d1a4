"""Memory-graph sources: the JSONL export and the MCP client against real loopback servers."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from amygdala_dagster.graph.mcp_source import DEFAULT_MCP_URL, McpSource, normalize_mcp_url
from amygdala_dagster.graph.nodes import GraphVersion, MemoryGraphError, MemoryNode
from amygdala_dagster.graph.sources import JsonlSource, open_source
from amygdala_dagster_tests.conftest import free_port, write_jsonl

TOKEN = "tok-5ecret-Q9zV"


def node(i: int, **over) -> dict:
    raw = {
        "key": f"node-{i:03d}",
        "node_type": ["journal", "digest", "pattern"][i % 3],
        "content": f"entry {i} about the day\nwarmth:{i % 11} clarity:{(i * 3) % 11}",
        "created_at": f"2024-03-{1 + i % 28:02d}T10:00:00Z",
        "updated_at": f"2024-04-{1 + i % 28:02d}T10:00:00Z",
    }
    raw.update(over)
    return raw


def expected(raws: list[dict]) -> list[MemoryNode]:
    return sorted((MemoryNode(**r) for r in raws), key=lambda n: n.key)


# --- JSONL source ---------------------------------------------------------------------


def test_jsonl_reads_nodes_sorted_and_reports_progress(tmp_path):
    raws = [node(i) for i in reversed(range(250))]
    path = write_jsonl(tmp_path / "g.jsonl", raws)
    with path.open("a") as f:
        f.write("\n   \n")  # blank lines are ignored
    seen: list[int] = []
    nodes, report = JsonlSource(path).fetch_nodes(progress=seen.append)
    assert nodes == expected(raws)
    assert report.n_skipped == 0 and report.duplicate_keys == []
    assert seen == [100, 200, 250]


def test_jsonl_broken_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [node(1), "", node(2), '{"key": "x", "content": ', node(3)])
    with pytest.raises(MemoryGraphError) as err:
        JsonlSource(path).fetch_nodes()
    assert f"{path}:4" in str(err.value)
    assert "not valid JSON" in str(err.value)


DEEP = "[" * 100_000 + "]" * 100_000  # beyond any JSON parser's recursion limit


def test_jsonl_deeply_nested_json_names_file_and_line(tmp_path):
    """Issue 9: a RecursionError from json.loads escaped the reader's JSON error handling."""
    path = write_jsonl(tmp_path / "g.jsonl", [node(1), '{"key": "deep", "content": "x", "created_at": ' + DEEP + "}"])
    with pytest.raises(MemoryGraphError) as err:
        JsonlSource(path).fetch_nodes()
    assert str(err.value) == f"{path}:2: not valid JSON (nested too deeply)"


def test_nested_values_make_a_node_unusable_and_the_warning_stays_short(tmp_path, caplog):
    nested = json.loads("[" * 500 + "]" * 500)
    raws = [node(1), node(2, created_at=nested), node(3, node_type={"a": 1}), {"key": nested, "content": "c"},
            node(4, updated_at=20240101)]
    path = write_jsonl(tmp_path / "g.jsonl", raws)
    with caplog.at_level(logging.WARNING):
        nodes, report = JsonlSource(path).fetch_nodes()
    assert [n.key for n in nodes] == ["node-001", "node-004"]
    assert nodes[1].updated_at == "20240101"  # a number is a usable timestamp
    assert [why for _, why in report.skipped] == [
        "'created_at' is list, not a string", "'node_type' is dict, not a string", "'key' is list, not a string"]
    assert len(caplog.text) < 1000


def test_jsonl_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    for call in (lambda s: s.fetch_nodes(), lambda s: s.graph_version()):
        with pytest.raises(MemoryGraphError, match="nope.jsonl does not exist"):
            call(JsonlSource(missing))


def test_jsonl_unusable_nodes_are_skipped_counted_and_named(tmp_path, caplog):
    bad_no_key = {k: v for k, v in node(2).items() if k != "key"}
    bad_content = node(3, content=["not", "a", "string"])
    bad_no_content = {k: v for k, v in node(4).items() if k != "content"}
    path = write_jsonl(tmp_path / "g.jsonl", [node(1), bad_no_key, bad_content, bad_no_content, node(5)])
    with caplog.at_level(logging.WARNING):
        nodes, report = JsonlSource(path).fetch_nodes()
    assert [n.key for n in nodes] == ["node-001", "node-005"]
    assert report.n_skipped == 3
    wheres = [w for w, _ in report.skipped]
    assert wheres[0] == f"{path}:2"
    assert wheres[1].startswith(f"{path}:3") and "node-003" in wheres[1]
    assert wheres[2].startswith(f"{path}:4") and "node-004" in wheres[2]
    assert "skipped 3 unusable node(s)" in caplog.text
    assert f"{path}:2: missing 'key'" in caplog.text
    assert "'content' is list, not a string" in caplog.text
    assert "missing 'content'" in caplog.text


def test_jsonl_duplicate_key_keeps_newest_and_reports_it(tmp_path, caplog):
    newer = node(7, content="the newer text", updated_at="2024-09-01T00:00:00Z")
    older = node(7, content="the older text", updated_at="2024-01-01T00:00:00Z")
    path = write_jsonl(tmp_path / "g.jsonl", [newer, node(1), older])
    with caplog.at_level(logging.WARNING):
        nodes, report = JsonlSource(path).fetch_nodes()
    assert {n.key: n.content for n in nodes} == {"node-001": node(1)["content"], "node-007": "the newer text"}
    assert report.duplicate_keys == ["node-007"]
    assert "duplicate key(s)" in caplog.text and "node-007" in caplog.text


def test_bundled_sample_reads_clean(caplog):
    """The demo prints no warning: no duplicate key, no unusable node (the behaviour is tested above)."""
    from amygdala_dagster.data import sample_graph_path

    with caplog.at_level(logging.WARNING):
        nodes, report = JsonlSource(sample_graph_path()).fetch_nodes()
    assert nodes and report.duplicate_keys == [] and report.n_skipped == 0
    assert caplog.text == ""


def test_jsonl_graph_version_is_sha256_and_line_count(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "g.jsonl", [node(1), node(2), "", node(3)])
    v = JsonlSource(path).graph_version()
    assert v == GraphVersion(hashlib.sha256(path.read_bytes()).hexdigest(), 3)
    with path.open("a") as f:
        f.write(json.dumps(node(4)) + "\n")
    v2 = JsonlSource(path).graph_version()
    assert v2.version != v.version and v2.node_count == 4


# --- URLs and open_source --------------------------------------------------------------


def test_normalize_mcp_url():
    assert normalize_mcp_url("http://localhost:7777") == "http://localhost:7777/mcp"
    assert normalize_mcp_url("http://localhost:7777/") == "http://localhost:7777/mcp"
    assert normalize_mcp_url("https://mem.example:9/custom/mcp") == "https://mem.example:9/custom/mcp"
    with pytest.raises(ValueError, match="ftp://x"):
        normalize_mcp_url("ftp://x")
    with pytest.raises(ValueError):
        normalize_mcp_url("localhost:7777")


def test_open_source_picks_one(tmp_path):
    src = open_source()
    assert isinstance(src, McpSource) and src.description == normalize_mcp_url(DEFAULT_MCP_URL)
    src = open_source(memory_mcp_url="http://127.0.0.1:9", page_size=7)
    assert isinstance(src, McpSource) and src.page_size == 7 and src.description == "http://127.0.0.1:9/mcp"
    src = open_source(memory_file=tmp_path / "g.jsonl")
    assert isinstance(src, JsonlSource) and src.description == str(tmp_path / "g.jsonl")
    with pytest.raises(ValueError, match="not both"):
        open_source(memory_mcp_url="http://x", memory_file="y")


# --- MCP client against the real serve-graph ------------------------------------------


def test_mcp_paginates_all_nodes_in_order(graph_server):
    raws = [node(i) for i in range(23)]
    server = graph_server(raws)
    pages: list[int] = []
    nodes, report = McpSource(server.url, page_size=5).fetch_nodes(progress=pages.append)
    assert nodes == expected(raws)
    assert pages == [5, 10, 15, 20, 23]  # five pages, each reported
    assert report.n_skipped == 0


def test_mcp_and_jsonl_sources_agree(graph_server, tmp_path):
    raws = [node(i) for i in range(12)]
    raws += [{k: v for k, v in node(50).items() if k != "key"}, node(51, content=5)]
    raws += [node(3, content="newer duplicate", updated_at="2025-01-01T00:00:00Z")]
    raws += [{"key": "bare", "content": "only the two required fields"}]
    server = graph_server(raws)
    from_mcp, mcp_report = McpSource(server.url, page_size=4).fetch_nodes()
    from_file, file_report = JsonlSource(server.file).fetch_nodes()
    assert from_mcp == from_file
    assert len(from_mcp) == 13
    assert MemoryNode("bare", "unknown", "only the two required fields") in from_mcp
    assert mcp_report.n_skipped == file_report.n_skipped == 2
    assert mcp_report.duplicate_keys == file_report.duplicate_keys == ["node-003"]
    assert McpSource(server.url).graph_version() == JsonlSource(server.file).graph_version()


def test_mcp_graph_version_follows_file_edits(graph_server):
    server = graph_server([node(i) for i in range(4)])
    src = McpSource(server.url)
    v1 = src.graph_version()
    assert v1.node_count == 4
    assert src.graph_version() == v1  # stable while the file is unchanged
    write_jsonl(server.file, [node(i) for i in range(6)])
    v2 = src.graph_version()
    assert v2.node_count == 6 and v2.version != v1.version
    assert v2 == JsonlSource(server.file).graph_version()
    nodes, _ = src.fetch_nodes()
    assert [n.key for n in nodes] == [f"node-{i:03d}" for i in range(6)]


def test_mcp_auth_with_token_env(graph_server, monkeypatch, caplog):
    raws = [node(i) for i in range(3)]
    server = graph_server(raws, token_env="GRAPH_TOKEN_FOR_TEST", token=TOKEN)
    caplog.set_level(logging.DEBUG)

    monkeypatch.setenv("AMYGDALA_MEMORY_TOKEN", TOKEN)
    src = McpSource(server.url)
    nodes, _ = src.fetch_nodes()
    assert nodes == expected(raws)
    assert src.graph_version().node_count == 3
    assert TOKEN not in repr(src) and TOKEN not in src.description and TOKEN not in repr(vars(src))

    monkeypatch.delenv("AMYGDALA_MEMORY_TOKEN")
    with pytest.raises(MemoryGraphError) as err:
        McpSource(server.url, retries=2, backoff=0.01).fetch_nodes()
    msg = str(err.value)
    assert "authentication failed" in msg and server.url in msg and "AMYGDALA_MEMORY_TOKEN" in msg

    monkeypatch.setenv("MY_WRONG_TOKEN", TOKEN + "-wrong")
    with pytest.raises(MemoryGraphError) as err:
        McpSource(server.url, token_env="MY_WRONG_TOKEN").graph_version()
    assert "authentication failed" in str(err.value) and "MY_WRONG_TOKEN" in str(err.value)
    assert "rejected" in str(err.value)

    assert TOKEN not in msg and TOKEN not in str(err.value)
    assert TOKEN not in caplog.text
    assert TOKEN not in server.output()


def test_mcp_auth_failure_is_not_retried(graph_server, monkeypatch):
    server = graph_server([node(1)], token_env="GRAPH_TOKEN_FOR_TEST", token=TOKEN)
    monkeypatch.delenv("AMYGDALA_MEMORY_TOKEN", raising=False)
    with flaky_proxy(server.url, fail_first=0) as proxy:
        with pytest.raises(MemoryGraphError, match="authentication failed"):
            McpSource(proxy.url, retries=3, backoff=0.01).fetch_nodes()
        assert proxy.posts == 1


def test_mcp_server_not_listening_names_url():
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(MemoryGraphError) as err:
        McpSource(url, retries=2, backoff=0.01, connect_timeout=2.0).fetch_nodes()
    assert str(err.value) == f"could not connect to {url} after 3 attempts: connection refused"
    with pytest.raises(MemoryGraphError, match="could not connect to .* after 1 attempts"):
        McpSource(url, retries=0).graph_version()


def test_mcp_retries_5xx_then_succeeds(graph_server, caplog):
    raws = [node(i) for i in range(7)]
    server = graph_server(raws)
    with flaky_proxy(server.url, fail_first=2) as proxy:
        with caplog.at_level(logging.WARNING):
            nodes, _ = McpSource(proxy.url, page_size=3, retries=3, backoff=0.01).fetch_nodes()
        assert nodes == expected(raws)
        assert proxy.failed == 2
        assert "HTTP 503" in caplog.text and "retrying" in caplog.text
    with flaky_proxy(server.url, fail_first=10) as proxy:
        with pytest.raises(MemoryGraphError) as err:
            McpSource(proxy.url, retries=2, backoff=0.01).graph_version()
        assert str(err.value) == f"server error from {proxy.url} after 3 attempts: HTTP 503 Service Unavailable"
        assert proxy.posts == 3


def test_mcp_read_timeout_is_retried_and_reported(graph_server):
    server = graph_server([node(1)])
    with flaky_proxy(server.url, fail_first=0, delay_first=4) as proxy:
        # The first answer comes after the read timeout, the retry answers at once.
        nodes, _ = McpSource(proxy.url, read_timeout=1.0, retries=2, backoff=0.01).fetch_nodes()
        assert [n.key for n in nodes] == ["node-001"]
    with flaky_proxy(server.url, fail_first=0, delay_first=3) as proxy, \
            pytest.raises(MemoryGraphError, match=r"no answer from .* after 1 attempts: read timeout after 0.5s"):
        McpSource(proxy.url, read_timeout=0.5, retries=0).graph_version()


# --- one graph version per read (Contract 4) -------------------------------------------


def test_mcp_read_of_a_changing_graph_restarts_and_returns_one_version(graph_server, caplog):
    """Issue 9 #5: deleting 50 already-read lines during a 2,200-node read gave 49 missing and 50 deleted nodes."""
    raws = [node(i) for i in range(2200)]
    server = graph_server(raws)
    kept = raws[:100] + raws[150:]  # 50 lines the first pages have already delivered
    changed: list[int] = []

    def progress(n: int) -> None:
        if n >= 1000 and not changed:
            write_jsonl(server.file, kept)
            changed.append(n)

    with caplog.at_level(logging.WARNING):
        nodes, report = McpSource(server.url, page_size=200).fetch_nodes(progress=progress)
    assert changed == [1000]
    assert nodes == expected(kept)
    assert report.version == JsonlSource(server.file).graph_version()
    assert "changed" in caplog.text and "reading again from the first page (restart 1 of 3)" in caplog.text


def test_mcp_read_gives_up_clearly_when_the_graph_keeps_changing(graph_server):
    server = graph_server([node(i) for i in range(30)])
    edits = iter(range(100, 200))

    def progress(n: int) -> None:  # every read sees a change after its first page
        if n == 10:
            with server.file.open("a") as f:
                f.write(json.dumps(node(next(edits))) + "\n")

    with pytest.raises(MemoryGraphError) as err:
        McpSource(server.url, page_size=10, max_restarts=2).fetch_nodes(progress=progress)
    assert str(err.value).startswith(f"{server.url}: the memory graph changed during the read 3 times in a row")
    assert "try again when it is quiet" in str(err.value)


def test_mcp_read_restarts_for_a_server_whose_cursors_ignore_changes():
    """Any server: the version read before the first page must still hold after the last one."""
    server = MCPServer("plain-offsets")
    data = [node(i) for i in range(9)]
    calls = {"list": 0}

    @server.tool()
    def list_nodes(cursor: str | None = None, limit: int = 200) -> dict:
        calls["list"] += 1
        if calls["list"] == 2:
            del data[0]  # the graph changes between the first and second page
        start = int(cursor or 0)
        return {"nodes": data[start:start + limit],
                "next_cursor": str(start + limit) if start + limit < len(data) else None}

    @server.tool()
    def graph_version() -> dict:
        return {"version": f"v{len(data)}", "node_count": len(data)}

    with serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as url:
        nodes, report = McpSource(url, page_size=4).fetch_nodes()
    assert nodes == expected(data) and len(nodes) == 8
    assert report.version == GraphVersion("v8", 8)


# --- MCP client against other real MCP servers ----------------------------------------


def test_mcp_client_speaks_sse_and_sessions_with_custom_tool_names():
    """A stateful SDK server answering with text/event-stream, tools under other names."""
    server = MCPServer("other-memory")
    data = [node(i) for i in range(5)]

    @server.tool()
    def page_of_memories(cursor: str | None = None, limit: int = 10) -> dict:
        start = int(cursor or 0)
        end = start + limit
        return {"nodes": data[start:end], "next_cursor": str(end) if end < len(data) else None}

    @server.tool()
    def memory_version() -> dict:
        return {"version": "v-abc", "node_count": len(data)}

    app = server.streamable_http_app(stateless_http=False, json_response=False)
    with serve_in_thread(app) as url:
        src = McpSource(url, list_tool="page_of_memories", version_tool="memory_version", page_size=2)
        nodes, _ = src.fetch_nodes()
        assert nodes == expected(data)
        assert src.graph_version() == GraphVersion("v-abc", 5)
        with pytest.raises(MemoryGraphError, match="tool graph_version failed: Unknown tool: graph_version"):
            McpSource(url).fetch_nodes()  # the default tool names do not exist there
        with pytest.raises(MemoryGraphError, match=r"tool list_nodes \(page 1\) failed: Unknown tool: list_nodes"):
            McpSource(url, version_tool="memory_version").fetch_nodes()


def test_mcp_client_rejects_misbehaving_servers():
    server = MCPServer("broken-memory")

    @server.tool()
    def list_nodes(cursor: str | None = None, limit: int = 200) -> dict:
        return {"nodes": [node(1)], "next_cursor": "same"}  # never advances

    @server.tool()
    def graph_version() -> dict:
        raise ValueError("index is rebuilding")

    from mcp.server.mcpserver.exceptions import ToolError

    @server.tool()
    def failing_list(cursor: str | None = None, limit: int = 200) -> dict:
        raise ToolError("graph store offline")

    @server.tool()
    def wrong_shape() -> dict:
        return {"version": 3}

    @server.tool()
    def steady_version() -> dict:
        return {"version": "v1", "node_count": 1}

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    with serve_in_thread(app) as url:
        with pytest.raises(MemoryGraphError, match="repeated cursor 'same'"):
            McpSource(url, version_tool="steady_version").fetch_nodes()
        with pytest.raises(MemoryGraphError, match=f"{url}: tool graph_version failed"):
            McpSource(url).graph_version()
        with pytest.raises(MemoryGraphError, match=f"{url}: tool graph_version failed"):
            McpSource(url).fetch_nodes()  # a read starts by asking for the version it belongs to
        with pytest.raises(MemoryGraphError, match=r"tool failing_list \(page 1\) failed: .*graph store offline"):
            McpSource(url, list_tool="failing_list", version_tool="steady_version").fetch_nodes()
        with pytest.raises(MemoryGraphError, match="must return"):
            McpSource(url, version_tool="wrong_shape").graph_version()


# --- helpers: loopback servers ---------------------------------------------------------


@contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its /mcp URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup")
            time.sleep(0.025)
        else:
            raise RuntimeError("uvicorn did not start within 10 s")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class _Proxy:
    def __init__(self, url: str, port: int):
        self.url = url
        self.port = port
        self.posts = 0
        self.failed = 0


@contextmanager
def flaky_proxy(upstream: str, *, fail_first: int, delay_first: float = 0.0) -> Iterator[_Proxy]:
    """A loopback HTTP proxy to ``upstream``: the first ``fail_first`` POSTs get 503,
    the first POST after those is answered only after ``delay_first`` seconds."""
    port = free_port()
    proxy = _Proxy(f"http://127.0.0.1:{port}/mcp", port)
    lock = threading.Lock()
    closing = threading.Event()
    client = httpx.Client(timeout=30)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output quiet
            pass

        def _forward(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with lock:
                proxy.posts += method == "POST"
                n = proxy.posts
                fail = method == "POST" and n <= fail_first
                proxy.failed += fail
            if fail:
                self.send_response(503)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if method == "POST" and n == fail_first + 1 and delay_first and closing.wait(delay_first):
                return  # the test is over; nobody waits for this answer
            keep = ("content-type", "accept", "authorization", "mcp-session-id", "mcp-protocol-version")
            headers = {k: v for k, v in self.headers.items() if k.lower() in keep}
            up = client.request(method, upstream, content=body, headers=headers)
            try:
                self.send_response(up.status_code)
                for k in ("content-type", "mcp-session-id", "www-authenticate"):
                    if k in up.headers:
                        self.send_header(k, up.headers[k])
                self.send_header("content-length", str(len(up.content)))
                self.end_headers()
                self.wfile.write(up.content)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (read-timeout test)

        def do_POST(self):
            self._forward("POST")

        def do_DELETE(self):
            self._forward("DELETE")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        closing.set()
        httpd.shutdown()
        httpd.server_close()
        client.close()
        thread.join(timeout=10)


# --- deeply nested answers --------------------------------------------------------------


@contextmanager
def raw_mcp_server(tool_result: str) -> Iterator[str]:
    """A bare HTTP server speaking just enough MCP (initialize, tools/list, tools/call) by hand.

    ``tool_result`` is spliced verbatim as the JSON of every tools/call result, so
    the test can send what no SDK server would serialize.
    """
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            msg = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if "id" not in msg:
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if msg["method"] == "initialize":
                result = json.dumps({"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                                     "serverInfo": {"name": "raw", "version": "0"}})
            elif msg["method"] == "tools/list":
                result = json.dumps({"tools": [{"name": n, "inputSchema": {"type": "object"}}
                                               for n in ("list_nodes", "graph_version")]})
            elif msg["method"] == "tools/call" and msg["params"]["name"] == "graph_version":
                result = json.dumps({"content": [], "structuredContent": {"version": "v", "node_count": 1}})
            elif msg["method"] == "tools/call":
                result = tool_result
            else:
                body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no"}})
                result = None
            if result is not None:
                body = f'{{"jsonrpc": "2.0", "id": {json.dumps(msg["id"])}, "result": {result}}}'
            data = body.encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mcp"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_mcp_client_deeply_nested_answers_are_clear_errors():
    """Issue 9: a RecursionError escaped the client's JSON handling."""
    deep = "[" * 100_000 + "]" * 100_000
    structured = ('{"content": [], "structuredContent": {"nodes": [{"key": "a", "content": "x", "created_at": '
                  + deep + '}], "next_cursor": null}}')
    with raw_mcp_server(structured) as url, pytest.raises(MemoryGraphError) as err:
        McpSource(url, retries=0).fetch_nodes()
    assert str(err.value) == (f"{url}: tool list_nodes (page 1) failed: MCP error -32700: "
                              "the answer is JSON nested too deeply")
    text = json.dumps({"content": [{"type": "text", "text": '{"nodes": ' + deep + "}"}]})
    with raw_mcp_server(text) as url, pytest.raises(MemoryGraphError) as err:
        McpSource(url, retries=0).fetch_nodes()
    assert str(err.value) == f"{url}: tool list_nodes (page 1) returned JSON nested too deeply"


def test_mcp_source_works_inside_a_running_event_loop(graph_server):
    """A notebook runs cells inside an event loop: the synchronous API must still work there."""
    import asyncio

    server = graph_server([node(i) for i in range(3)])

    async def in_a_loop():
        return McpSource(server.url).fetch_nodes()[0]

    assert asyncio.run(in_a_loop()) == expected([node(i) for i in range(3)])
