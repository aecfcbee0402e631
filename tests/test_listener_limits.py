"""Every listener's limits against hostile clients: compression bombs, oversized heads,
slow clients, idle connections and connection floods (`meterline.httpserver`, the
gateway's `gateway/server.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
import types
import zlib
from collections.abc import AsyncIterator

import pytest
import yaml

from meterline import logs
from meterline.admin import AdminServer
from meterline.cli import raise_open_files_limit
from meterline.config import AdminConfig, convert
from meterline.gateway.config import ProxyConfig
from meterline.gateway.proxy import Proxy
from meterline.httpserver import ListenerConfig
from meterline.units import Listen
from tests.helpers import free_port, running
from tests.helpers import pipeline as pipeline_file

FAST = "read_timeout: 200ms, keepalive_timeout: 200ms"


def pipeline(port: int, receiver: str = "webhook", options: str = "") -> str:
    """`receiver` (webhook, or OTLP over HTTP only) on `port` with `options` (YAML flow
    mapping entries, `a: 1, b: 2s`) into the file exporter."""
    listen = ({"listen": f"127.0.0.1:{port}"} if receiver == "webhook"
              else {"grpc": None, "http": f"127.0.0.1:{port}"})
    settings = {**listen, **(yaml.safe_load(f"{{{options}}}") or {})}
    return pipeline_file({receiver: settings}, exporters={"file": {"path": "{data}/out.jsonl"}})


def gzip_bomb(gib: int = 1) -> bytes:
    """`gib` GiB of spaces as gzip (about 1 MB per GiB), built without compressing them
    all: after a full flush every 1 MiB block of spaces compresses to the same bytes. It
    has no gzip trailer, which the server must not need to reach to refuse it."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    return first + repeat * (1024 * gib - 1)


async def response(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """One response: its head and its body (by its Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await asyncio.wait_for(reader.readexactly(length), timeout)


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection; the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await response(reader, timeout)
    finally:
        writer.close()


def post(path: str, body: bytes, *headers: str, close: bool = True) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def closed_after(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent meanwhile."""
    start = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout)
    return time.monotonic() - start, data


# --- compression bombs ---------------------------------------------------------------------


@pytest.mark.parametrize(("receiver", "path", "setting"), [
    ("webhook", "/v1/events", "max_body_mb"), ("otlp", "/v1/logs", "max_message_mb")])
async def test_a_gzip_bomb_gets_413_while_another_request_is_answered_promptly(
        tmp_path, receiver, path, setting):
    port = free_port()
    bomb = gzip_bomb()
    async with running(pipeline(port, receiver), tmp_path):
        bombs = [asyncio.create_task(exchange(port, post(path, bomb, "Content-Encoding: gzip")))
                 for _ in range(4)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        answer = await exchange(port, post(path, b"{}"))
        latency = time.monotonic() - start
        answers = await asyncio.gather(*bombs)
    assert answer.split(b" ", 2)[1] in (b"200", b"400"), answer[:200]
    assert latency < 1.0
    for bomb_answer in answers:
        assert bomb_answer.startswith(b"HTTP/1.1 413"), bomb_answer[:200]
        assert b"expands more than 200 times" in bomb_answer
        assert setting.encode() in bomb_answer


async def test_a_bomb_sent_where_no_handler_reads_it_is_thrown_away_undecoded():
    bomb = gzip_bomb()
    async with admin() as port:
        bombs = [asyncio.create_task(exchange(port, post("/healthz", bomb,
                                                         "Content-Encoding: gzip")))
                 for _ in range(4)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        latency = time.monotonic() - start
        answers = await asyncio.gather(*bombs)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert latency < 1.0
    assert all(a.startswith(b"HTTP/1.1 405") for a in answers), answers[0][:200]


async def test_an_unknown_content_encoding_gets_415_naming_the_supported_ones(tmp_path):
    port = free_port()
    async with running(pipeline(port), tmp_path):
        answer = await exchange(port, post("/v1/events", b"{}", "Content-Encoding: compress"))
    assert answer.startswith(b"HTTP/1.1 415"), answer[:200]
    assert b"unsupported Content-Encoding 'compress'" in answer
    assert b"gzip, deflate" in answer


# --- request heads -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway(**options: object) -> AsyncIterator[Proxy]:
    """A gateway whose upstream is never reached: what these tests send is refused first."""
    config = convert({"listen": "127.0.0.1:0", "upstreams": {"u": {
        "base_url": "http://127.0.0.1:9", "default": True}}, **options}, ProxyConfig)
    assert isinstance(config, ProxyConfig)
    proxy = Proxy(config, lambda _: None, logs.get(component="gateway-test"))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.shutdown()


async def test_the_gateway_answers_431_to_more_than_100_headers():
    async with gateway() as proxy:
        headers = [f"x-h{i}: v" for i in range(101)]
        answer = await exchange(proxy.port, post("/v1/chat/completions", b"{}", *headers))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"more than 100 request headers" in answer


async def test_the_gateway_answers_431_to_headers_larger_than_64_kib_together():
    async with gateway() as proxy:
        headers = [f"x-h{i}: {'v' * 8000}" for i in range(9)]
        answer = await exchange(proxy.port, post("/v1/chat/completions", b"{}", *headers))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"larger than 65536 bytes" in answer


async def test_the_gateway_answers_431_to_one_huge_header_before_it_ends():
    async with gateway() as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nx-big: " + b"v" * (1 << 20))
        _, answer = await closed_after(reader)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


async def test_a_header_repeated_800_times_is_refused_at_once_not_joined():
    async with gateway() as proxy:
        headers = ["x-same: " + "v" * 65_000] * 800
        start = time.monotonic()
        answer = await exchange(proxy.port, post("/v1/chat/completions", b"{}", *headers))
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert elapsed < 1.5


async def test_the_gateway_answers_414_to_a_request_target_over_8190_bytes():
    async with gateway() as proxy:
        answer = await exchange(proxy.port, post("/v1/" + "a" * 9000, b"{}"))
    assert answer.startswith(b"HTTP/1.1 414"), answer[:200]


async def test_the_webhook_answers_431_to_headers_larger_than_64_kib_together(tmp_path):
    port = free_port()
    async with running(pipeline(port), tmp_path):
        headers = [f"x-h{i}: {'v' * 8000}" for i in range(9)]
        answer = await exchange(port, post("/v1/events", b"{}", *headers))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


async def test_the_webhook_refuses_more_than_100_headers(tmp_path):
    port = free_port()
    async with running(pipeline(port), tmp_path):
        headers = [f"x-h{i}: v" for i in range(101)]
        answer = await exchange(port, post("/v1/events", b"{}", *headers))
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]  # (aiohttp's, in HTTP/1.0)
    assert b"Too many headers" in answer


# --- slow and idle clients -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin(**limits: object) -> AsyncIterator[int]:
    port = free_port()
    service = types.SimpleNamespace(log=logs.get(component="admin-test"))
    config = AdminConfig(listen=Listen(f"127.0.0.1:{port}"), **limits)  # type: ignore[arg-type]
    server = AdminServer(service, config)  # type: ignore[arg-type]
    await server.start()
    try:
        yield port
    finally:
        await server.shutdown()


@contextlib.asynccontextmanager
async def listener(kind: str, tmp_path, options: str = FAST) -> AsyncIterator[int]:
    """The port of a webhook, OTLP/HTTP or admin listener with these limits."""
    if kind == "admin":
        limits = dict(part.split(": ") for part in options.split(", "))
        converted = convert(limits, ListenerConfig)
        async with admin(**{f: getattr(converted, f) for f in limits}) as port:
            yield port
        return
    port = free_port()
    async with running(pipeline(port, kind, options), tmp_path):
        yield port


@pytest.mark.parametrize("kind", ["webhook", "otlp", "admin"])
async def test_a_client_sending_half_a_request_line_is_cut_after_read_timeout(tmp_path, kind):
    async with listener(kind, tmp_path, "read_timeout: 200ms") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/ev")
        elapsed, answer = await closed_after(reader)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"read_timeout" in answer
    assert 0.15 < elapsed < 2.0


@pytest.mark.parametrize("kind", ["webhook", "otlp", "admin"])
async def test_an_idle_kept_alive_connection_is_closed_after_keepalive_timeout(tmp_path, kind):
    async with listener(kind, tmp_path, "keepalive_timeout: 200ms") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        elapsed, _ = await closed_after(reader)
        writer.close()
    assert head.startswith(b"HTTP/1.1 "), head
    assert elapsed < 2.0


# --- connection floods -----------------------------------------------------------------------


async def test_past_max_connections_a_new_connection_gets_503_and_open_ones_are_served(
        tmp_path):
    port = free_port()
    async with running(pipeline(port, options="max_connections: 2"), tmp_path):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        refused = await exchange(port, b"")
        reader, writer = held[0]
        writer.write(post("/v1/events", b"{}"))
        served = await response(reader)
        for _, w in held:
            w.close()
    assert refused.startswith(b"HTTP/1.1 503"), refused[:200]
    assert b"max_connections" in refused
    assert served.startswith(b"HTTP/1.1 400"), served[:200]  # (an empty object: no event)


async def test_a_connection_slot_freed_is_given_to_the_next_client(tmp_path):
    port = free_port()
    async with running(pipeline(port, options="max_connections: 1"), tmp_path):
        _, first = await asyncio.open_connection("127.0.0.1", port)
        first.close()
        await first.wait_closed()
        answer = b""
        for _ in range(40):  # the server sees the close a moment later
            answer = await exchange(port, post("/v1/events", b"{}"))
            if not answer.startswith(b"HTTP/1.1 503"):
                break
            await asyncio.sleep(0.05)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


async def test_past_max_connections_the_gateway_answers_503_and_serves_open_ones():
    async with gateway(max_connections=2) as proxy:
        held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
        refused = await exchange(proxy.port, b"")
        reader, writer = held[0]
        writer.write(post("/v1/" + "a" * 9000, b""))  # answered without an upstream
        served = await response(reader)
        for _, w in held:
            w.close()
    assert refused.startswith(b"HTTP/1.1 503"), refused[:200]
    assert b"max_connections" in refused
    assert served.startswith(b"HTTP/1.1 414"), served[:200]


# --- the process ------------------------------------------------------------------------------


async def test_a_handlers_error_is_logged_with_its_traceback_amid_a_flood_of_bad_requests(
        caplog):
    """One record a minute for a client's bad requests; a handler that raised (a bug) is
    logged besides, however many bad requests came just before."""
    from aiohttp import web

    from meterline.httpserver import serve

    async def broken(_: web.Request) -> web.Response:
        raise KeyError("a bug")

    app = web.Application()
    app.router.add_get("/broken", broken)
    port = free_port()
    runner = await serve(app, Listen(f"127.0.0.1:{port}"))
    try:
        for target in ["/" + "x" * 9000] * 3 + ["/broken"] * 2:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await reader.readline()).split()[1] in (b"400", b"414", b"500")
            writer.close()
    finally:
        await runner.cleanup()
    logged = [r for r in caplog.records if r.name == f"meterline.http.127.0.0.1:{port}"]
    assert [r.levelname for r in logged] == ["WARNING", "ERROR"], [r.msg for r in logged]
    assert logged[1].exc_info is not None and "a bug" in str(logged[1].exc_info[1])


def test_run_raises_the_open_files_soft_limit_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"hard limit {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
