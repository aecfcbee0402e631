"""How the gateway reads MCP traffic it cannot get from the SDK: batches, `_meta` trace
context, streams cut anywhere, the upstream's settings."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import pytest
from aiohttp import web

from meterline.config import convert
from meterline.event import Event
from meterline.gateway.config import ProxyConfig
from meterline.gateway.mcp import BATCH_MAX, UNPARSEABLE, _EventScanner
from tests.gateway_helpers import gateway

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
BATCH = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
          "params": {"name": "a", "arguments": {"x": 1}}},
         {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
         {"jsonrpc": "2.0", "id": "two", "method": "tools/call",
          "params": {"name": "b", "arguments": {}, "_meta": {
              "traceparent": f"00-{TRACE}-{PARENT}-01"}}}]
ANSWERS = [{"jsonrpc": "2.0", "id": "two", "error": {"code": -32601, "message": "no b"}},
           {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}}]


async def _answer(request: web.Request) -> web.StreamResponse:
    """Answers a batch as JSON (`?json`) or as one event per answer, the second later."""
    await request.read()
    headers = {"mcp-session-id": "s-1"}
    if "json" in request.query:
        return web.json_response(ANSWERS, headers=headers)
    response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
    await response.prepare(request)
    for answer in ANSWERS:
        await response.write(b"event: message\r\ndata: " + json.dumps(answer).encode()
                             + b"\r\n\r\n")
        await asyncio.sleep(0.05)
    return response


@pytest.fixture
async def upstream():
    app = web.Application()
    app.router.add_post("/mcp", _answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


async def batch(upstream: str, query: str = "") -> list[Event]:
    """The events of `BATCH` posted through the gateway."""
    async with gateway({"tools": {"base_url": upstream, "protocol": "mcp"}}) as gw, \
            aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/tools/mcp{query}", json=BATCH) as answer:
            assert answer.status == 200
            await answer.read()
        await asyncio.sleep(0.05)
    return gw.events


@pytest.mark.parametrize("query", ["", "?json"])
async def test_a_batch_is_one_event_per_request_and_notification(upstream, query):
    events = await batch(upstream, query)
    first, note, second = events
    assert [e.mcp_method for e in events] == ["tools/call", "notifications/progress",
                                              "tools/call"]
    assert (first.tool_name, first.tool_call_id, first.error_type) == ("a", "1", None)
    sizes = (len(json.dumps({"x": 1})), len(json.dumps(ANSWERS[1]["result"])))
    assert (first.request_bytes, first.response_bytes) == sizes  # as sent, spaces included
    assert (second.tool_name, second.tool_call_id, second.error_type) == ("b", "two",
                                                                          "not_found_error")
    assert note.tool_call_id is None and note.error_type is None
    assert {e.mcp_session_id for e in events} == {"s-1"}
    assert len({e.event_id for e in events}) == len({e.span_id for e in events}) == 3


async def test_a_batch_larger_than_the_bound_is_relayed_and_recorded_as_one_event(upstream):
    notes = [{"jsonrpc": "2.0", "method": "notifications/progress"}] * (BATCH_MAX + 1)
    async with gateway({"tools": {"base_url": upstream, "protocol": "mcp"}}) as gw, \
            aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/tools/mcp?json", json=notes) as answer:
            assert answer.status == 200  # relayed: the upstream answered
            await answer.read()
        await asyncio.sleep(0.05)
    [event] = gw.events
    assert event.attributes[UNPARSEABLE] == "request" and event.mcp_method is None


async def test_each_answer_of_a_streamed_batch_has_its_own_latency(upstream):
    first, _, second = await batch(upstream)
    assert first.duration_ms - second.duration_ms >= 40  # answered 50 ms after the other


async def test_trace_context_in_params_meta_parents_that_request(upstream):
    first, _, second = await batch(upstream)
    assert (second.trace_id, second.parent_span_id) == (TRACE, PARENT)
    assert first.trace_id != TRACE


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_stream_events_cut_anywhere_are_read_whole(size):
    stream = (b": keep-alive\n\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
              b"id: 3\ndata:[2]\n\n")
    scanner = _EventScanner(1 << 20)
    payloads = [p for i in range(0, len(stream), size) for p in scanner.feed(stream[i:i + size])]
    assert payloads == [b'{"a":\n1}', b"[2]"]


def test_a_stream_event_over_the_limit_is_skipped_not_kept():
    scanner = _EventScanner(10)
    payloads = scanner.feed(b"data: " + b"x" * 8)
    payloads += scanner.feed(b"y" * 100 + b"\ndata: more\n")
    assert scanner.data == scanner.line == []
    payloads += scanner.feed(b"\ndata: 1\n\n")
    assert payloads == [None, b"1"]


def _config(upstreams: dict) -> ProxyConfig:
    config = convert({"upstreams": upstreams}, ProxyConfig)
    assert isinstance(config, ProxyConfig)
    return config


def test_an_upstream_speaks_the_llm_apis_unless_told_mcp():
    config = _config({"a": {"base_url": "http://x"}, "b": {"base_url": "http://y",
                                                           "protocol": "mcp"}})
    assert [(u.protocol, u.provider) for u in config.upstreams.values()] == [
        ("llm", "openai"), ("mcp", "mcp")]


def test_an_mcp_upstream_may_name_its_provider():
    config = _config({"b": {"base_url": "http://y", "protocol": "mcp", "provider": "github"}})
    assert config.upstreams["b"].provider == "github"


def test_a_fallback_must_speak_the_same_protocol():
    with pytest.raises((ValueError, msgspec.ValidationError), match="same protocol"):
        _config({"a": {"base_url": "http://x", "fallback": ["b"]},
                 "b": {"base_url": "http://y", "protocol": "mcp"}})
