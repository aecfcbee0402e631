"""The gateway in front of an MCP server (`protocol: mcp`), driven by the official MCP SDK as
both client and server: what passes is untouched, and every JSON-RPC request is an event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

from meterline.event import Event
from meterline.gateway.mcp import UNPARSEABLE
from tests.gateway_helpers import Running, gateway

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@dataclass
class Exchange:
    """One HTTP request and the body of its answer, as one side saw it."""

    method: str
    request: bytes
    status: int = 0
    session: str | None = None
    body: bytearray = field(default_factory=bytearray)


class Server:
    """An MCPServer over Streamable HTTP (uvicorn, in a thread), keeping what it answered."""

    def __init__(self, json_response: bool) -> None:
        self.json_response = json_response
        self.sent: list[Exchange] = []
        self.release = threading.Event()  # lets the `slow` tool finish
        mcp = MCPServer("meterline-test")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            """Add two numbers."""
            return a + b

        @mcp.tool()
        def fail(reason: str) -> str:
            """Always fails."""
            raise ValueError(reason)

        @mcp.tool()
        def refuse() -> str:
            """Answers a JSON-RPC error."""
            raise MCPError(code=-32602, message="refused: bad arguments")

        @mcp.tool()
        def big(size: int) -> str:
            """A long text."""
            return "x" * size

        @mcp.tool()
        async def slow(ctx: Context) -> str:
            """Tells it started, then waits to be released."""
            await ctx.report_progress(0.5, 1.0, "started")
            await asyncio.to_thread(self.release.wait, 10)
            return "done"

        self.app = mcp.streamable_http_app(json_response=json_response)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self._tap, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on",
                                                    interface="asgi3"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _tap(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope["method"], b"")
        self.sent.append(exchange)

        async def received() -> Any:
            message = await receive()
            exchange.request += message.get("body", b"")
            return message

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.session = dict(message["headers"]).get(b"mcp-session-id", b"").decode()
            elif message["type"] == "http.response.body":
                exchange.body += message.get("body", b"")
            await send(message)

        await self.app(scope, received, sending)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the MCP server did not start"
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(10)


class Tap(httpx2.AsyncHTTPTransport):
    """The client's transport, keeping each answer's body as it arrived."""

    def __init__(self, seen: list[Exchange]) -> None:
        super().__init__()
        self.seen = seen

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        exchange = Exchange(request.method, request.content, response.status_code,
                            response.headers.get("mcp-session-id"))
        self.seen.append(exchange)
        inner = response.stream
        assert isinstance(inner, httpx2.AsyncByteStream)

        class Body(httpx2.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner:
                    exchange.body += chunk
                    yield chunk

            async def aclose(self) -> None:
                await inner.aclose()

        response.stream = Body()
        return response


@pytest.fixture(scope="module", params=["sse", "json"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with Server(json_response=request.param == "json") as running:
        yield running


@pytest.fixture
def sse_server(server: Server) -> Server:
    if server.json_response:
        pytest.skip("answers as JSON: nothing streams")
    return server


@contextlib.asynccontextmanager
async def mcp_gateway(server: Server, **upstream: Any) -> AsyncIterator[Running]:
    async with gateway({"tools": {"base_url": server.url, "protocol": "mcp", **upstream}}) as gw:
        yield gw


@contextlib.asynccontextmanager
async def session(gw: Running, seen: list[Exchange] | None = None,
                  headers: dict[str, str] | None = None,
                  **options: Any) -> AsyncIterator[ClientSession]:
    client = httpx2.AsyncClient(transport=Tap([] if seen is None else seen), headers=headers,
                                timeout=httpx2.Timeout(30, read=300))
    async with client, streamable_http_client(f"{gw.url}/tools/mcp", http_client=client) as (
            read, write), ClientSession(read, write, **options) as mcp:
        await mcp.initialize()
        yield mcp


async def settled(gw: Running, method: str, count: int = 1) -> list[Event]:
    """The events of `method`, once `count` of them were recorded."""
    for _ in range(200):
        events = [e for e in gw.events if e.mcp_method == method]
        if len(events) >= count:
            return events
        await asyncio.sleep(0.01)
    raise AssertionError(f"{method}: {[e.mcp_method for e in gw.events]}")


async def call(gw: Running, name: str, arguments: dict[str, Any]) -> Any:
    async with session(gw) as mcp:
        return await mcp.call_tool(name, arguments)


# --- what passes --------------------------------------------------------------------------
async def test_the_client_sees_exactly_the_bytes_the_server_sent(server):
    seen: list[Exchange] = []
    server.sent.clear()
    async with mcp_gateway(server) as gw, session(gw, seen) as mcp:
        await mcp.list_tools()
        await mcp.call_tool("add", {"a": 1, "b": 2})
        await mcp.call_tool("fail", {"reason": "boom"})
    posts = sorted((e.request, e.status, e.session, bytes(e.body)) for e in seen
                   if e.method == "POST")
    sent = sorted((e.request, e.status, e.session, bytes(e.body)) for e in server.sent
                  if e.method == "POST")
    assert posts == sent and len(posts) == 5  # initialize, initialized, list, 2 calls


async def test_tool_results_reach_the_client_as_the_server_gave_them(server):
    async with mcp_gateway(server) as gw, session(gw) as mcp:
        ok = await mcp.call_tool("add", {"a": 1, "b": 2})
        failed = await mcp.call_tool("fail", {"reason": "boom"})
    assert (ok.is_error, ok.structured_content, ok.content[0].text) == (False, {"result": 3},
                                                                         "3")
    assert failed.is_error and "fail" in failed.content[0].text


async def test_a_streamed_answer_is_relayed_as_it_arrives(sse_server):
    server = sse_server
    server.release.clear()
    told = asyncio.Event()

    async def progressed(progress: float, total: float | None, message: str | None) -> None:
        told.set()

    async with mcp_gateway(server) as gw, session(gw) as mcp:
        result = asyncio.create_task(mcp.call_tool("slow", {}, progress_callback=progressed))
        await asyncio.wait_for(told.wait(), 10)  # while the tool still runs
        assert not result.done()
        server.release.set()
        assert (await result).content[0].text == "done"


async def test_a_malformed_body_is_forwarded_untouched_and_recorded_unparseable(server):
    async with mcp_gateway(server) as gw, httpx2.AsyncClient() as client:
        direct = await client.post(f"{server.url}/mcp", content=b"{not json", headers=ACCEPT)
        through = await client.post(f"{gw.url}/tools/mcp", content=b"{not json",
                                    headers=ACCEPT)
        await asyncio.sleep(0.05)
    assert (through.status_code, through.content) == (direct.status_code, direct.content)
    assert through.status_code == 400
    assert gw.event.attributes[UNPARSEABLE] == "request"
    assert (gw.event.status_code, gw.event.mcp_method) == (400, None)


# --- what is recorded ---------------------------------------------------------------------
async def test_initialize_is_recorded_with_the_session_the_server_opened(server):
    async with mcp_gateway(server) as gw, session(gw) as mcp:
        version = mcp.initialize_result.protocol_version
    [event] = await settled(gw, "initialize")
    opened = [e.session for e in server.sent if b'"initialize"' in e.request][-1]
    assert (event.mcp_method, event.operation, event.status_code) == (
        "initialize", "mcp_initialize", 200)
    assert event.mcp_session_id == opened and opened
    assert (event.provider, event.upstream, event.route) == ("mcp", "tools", "tools")
    assert event.attributes["mcp.protocol.version"] == version
    assert event.duration_ms > 0 and event.error_type is None


async def test_tools_list_is_recorded(server):
    async with mcp_gateway(server) as gw, session(gw) as mcp:
        await mcp.list_tools()
        session_id = (await settled(gw, "initialize"))[0].mcp_session_id
    [event] = await settled(gw, "tools/list")
    assert (event.operation, event.status_code, event.error_type) == ("mcp_list", 200, None)
    assert event.mcp_session_id == session_id and event.response_bytes > 100
    assert event.tool_name is None


async def test_a_tool_call_is_recorded_as_execute_tool_with_its_sizes(server):
    async with mcp_gateway(server) as gw:
        await call(gw, "add", {"a": 1, "b": 2})
    [event] = await settled(gw, "tools/call")
    result = b'{"content":[{"text":"3","type":"text"}],"isError":false,"structuredContent":' \
             b'{"result":3}}'
    assert (event.operation, event.tool_name, event.status_code) == ("execute_tool", "add", 200)
    sent_id = json.loads([e.request for e in server.sent if b'"tools/call"' in e.request][-1])["id"]
    assert event.tool_call_id == event.attributes["jsonrpc.request.id"] == str(sent_id)
    assert (event.request_bytes, event.response_bytes) == (len(b'{"a":1,"b":2}'), len(result))
    assert event.error_type is None and event.mcp_session_id
    assert event.duration_ms > 0 and event.provider_duration_ms > 0


async def test_a_tool_that_fails_is_recorded_as_a_tool_error(server):
    async with mcp_gateway(server) as gw:
        await call(gw, "fail", {"reason": "boom"})
    [event] = await settled(gw, "tools/call")
    assert (event.tool_name, event.status_code, event.error_type) == ("fail", 200, "tool_error")
    assert event.error_message == "Error executing tool fail"


async def test_a_jsonrpc_error_is_recorded_with_its_category_and_code(server):
    async with mcp_gateway(server) as gw, session(gw) as mcp:
        with pytest.raises(MCPError, match="refused"):
            await mcp.call_tool("refuse", {})
    [event] = await settled(gw, "tools/call")
    assert (event.tool_name, event.error_type) == ("refuse", "invalid_request_error")
    assert event.attributes["rpc.response.status_code"] == "-32602"
    assert event.error_message == "refused: bad arguments"


async def test_a_notification_is_one_event_without_an_id(server):
    async with mcp_gateway(server) as gw, session(gw):
        pass
    [event] = await settled(gw, "notifications/initialized")
    assert (event.operation, event.status_code) == ("mcp_notification", 202)
    assert event.tool_call_id is None and "jsonrpc.request.id" not in event.attributes
    assert event.mcp_session_id


async def test_ending_the_session_is_recorded(server):
    async with mcp_gateway(server) as gw, session(gw):
        pass
    [event] = [e for e in gw.events if (e.attributes or {}).get("http.request.method") == "DELETE"]
    assert event.mcp_session_id == (await settled(gw, "initialize"))[0].mcp_session_id
    assert event.operation is None


async def test_trace_ids_come_from_the_traceparent_header(server):
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    async with mcp_gateway(server) as gw, session(gw, headers=headers) as mcp:
        await mcp.call_tool("add", {"a": 1, "b": 2})
    [event] = await settled(gw, "tools/call")
    assert (event.trace_id, event.parent_span_id) == (TRACE, PARENT)
    assert event.span_id and event.span_id != PARENT


async def test_a_tool_call_to_an_unreachable_server_is_a_502_event_naming_the_tool():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add"}}'
    async with gateway({"tools": {"base_url": f"http://127.0.0.1:{closed}",
                                  "protocol": "mcp"}}) as gw, httpx2.AsyncClient() as client:
        answer = await client.post(f"{gw.url}/tools/mcp", content=body, headers=ACCEPT)
        await asyncio.sleep(0.05)
    assert answer.status_code == 502
    event = gw.event
    assert (event.mcp_method, event.tool_name, event.tool_call_id) == ("tools/call", "add", "7")
    assert (event.status_code, event.error_type) == (502, "service_unavailable")


async def test_an_answer_larger_than_max_body_is_relayed_whole_but_not_read(server):
    async with gateway({"tools": {"base_url": server.url, "protocol": "mcp"}},
                       max_body_mb=0.01) as gw:  # 10 KB
        result = await call(gw, "big", {"size": 50_000})
    assert result.content[0].text == "x" * 50_000
    [event] = await settled(gw, "tools/call")
    assert event.attributes[UNPARSEABLE] == "response" and event.response_bytes is None
    assert (event.tool_name, event.status_code, event.error_type) == ("big", 200, None)
