"""Upstreams: kept-alive HTTP/1.1 connections, and one request's exchange on one.

This is asyncio's transport/protocol layer with httptools (the llhttp parser)
rather than a full HTTP client library: per request the gateway does a few
dozen microseconds of Python instead of several hundred, and that difference is
most of the latency a proxy adds (see `bench/gateway_bench.py`). The body of a
response goes from the upstream's `data_received` straight to the client's
transport in the same callback; nothing waits on a task switch per chunk.

The timeouts of an exchange (first byte, idle since the last chunk, total) are
checked by the proxy's `Deadlines` tick, so a chunk costs a clock read, not a
timer. An `Upstream` used without a ticking `Deadlines` has no timeouts but the
connect one (as in the benchmark's load generator).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

from meterline.gateway.config import TimeoutsConfig, UpstreamConfig
from meterline.gateway.deadlines import Deadlines

UNHEALTHY_AFTER = 3  # consecutive connection failures or timeouts


class UpstreamFailure(Exception):
    """The upstream could not be reached, broke off, or did not answer in time."""

    def __init__(self, status: int, kind: str, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.status = status  # what the client gets: 502 or 504
        self.kind = kind  # error category: service_unavailable or timeout
        self.stale = stale  # a reused connection closed before answering: safe to retry once


def _seconds(value: float) -> float:
    return float(value) if value > 0 else math.inf


class Exchange:
    """One request on one connection: the response head, then its body as it arrives.

    The body goes to `sink` once the proxy attaches one (what arrived before is
    replayed to it). `head` resolves when the status line and headers are in,
    `done` when the response is complete; both fail with `UpstreamFailure`.
    """

    __slots__ = ("conn", "deadlines", "done", "early", "flush", "head", "head_only", "headers",
                 "last", "loop", "received", "sink", "started", "status", "timeouts",
                 "until_close")

    def __init__(self, conn: UpstreamConnection, timeouts: TimeoutsConfig,
                 head_only: bool) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.head_only = head_only  # a HEAD request: the response has no body
        self.timeouts = (_seconds(timeouts.first_byte), _seconds(timeouts.idle),
                         _seconds(timeouts.total))
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.until_close = False  # body delimited by the connection closing
        self.sink: Callable[[bytes], None] | None = None
        self.flush: Callable[[], None] | None = None
        self.early: list[bytes] = []
        self.received = False  # any byte of the response came
        self.started = self.last = self.loop.time()
        self.deadlines = conn.upstream.deadlines
        self.deadlines.watched.add(self)

    # --- called by the proxy ---------------------------------------------------
    def attach(self, sink: Callable[[bytes], None],
               flush: Callable[[], None] | None = None) -> None:
        """Send the body to `sink` from now on (and what already came); `flush` is called
        after each read from the upstream, however many pieces `sink` got from it."""
        early, self.early = self.early, []
        for data in early:
            sink(data)
        self.sink, self.flush = sink, flush
        if flush is not None:
            flush()

    async def read_body(self, limit: int) -> bytes:
        """The whole body (up to `limit` bytes kept), for error bodies and fallbacks."""
        parts: list[bytes] = []
        size = 0

        def keep(data: bytes) -> None:
            nonlocal size
            if size < limit:
                parts.append(data[:limit - size])
                size += len(data)

        self.attach(keep)
        await self.done
        return b"".join(parts)

    def abort(self) -> None:
        """Give up on the exchange (the client left): close the upstream call."""
        self.deadlines.watched.discard(self)
        for future in (self.head, self.done):
            future.cancel()
        self.conn.detach()

    # --- called by the connection ----------------------------------------------
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.headers = status, headers
        self.last = self.loop.time()
        if not self.head_only and status >= 200 and status not in (204, 304):
            names = {name.lower() for name, _ in headers}
            self.until_close = b"content-length" not in names and not any(
                name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
                for name, value in headers)
        self.head.set_result(None)

    def on_body(self, data: bytes) -> None:
        self.last = self.loop.time()
        if self.sink is not None:
            self.sink(data)
        else:
            self.early.append(data)

    def on_complete(self) -> None:
        self.deadlines.watched.discard(self)
        if not self.done.done():
            self.done.set_result(None)

    def on_lost(self, exc: BaseException | None) -> None:
        if self.head.done() and self.until_close:
            self.on_complete()
            return
        where = "mid-response" if self.head.done() else "before answering"
        self.fail(UpstreamFailure(502, "service_unavailable",
                                  f"upstream {self.conn.upstream.name} closed the connection "
                                  f"{where}" + (f": {exc}" if exc else ""),
                                  stale=not self.received and self.conn.reused))

    def fail(self, error: UpstreamFailure) -> None:
        self.deadlines.watched.discard(self)
        future = self.head if not self.head.done() else self.done
        if not future.done():
            future.set_exception(error)
        self.conn.detach()

    def check(self, now: float) -> None:
        """Called on every `Deadlines` tick: fail with 504 once a timeout has passed."""
        first_byte, idle, total = self.timeouts
        if now - self.started >= total:
            kind, limit, what = "total", total, "end of the response"
        elif not self.head.done():
            if now - self.started < first_byte:
                return
            kind, limit, what = "first_byte", first_byte, "response"
        elif now - self.last >= idle:
            kind, limit, what = "idle", idle, "data"
        else:
            return
        self.fail(UpstreamFailure(504, "timeout", f"upstream {self.conn.upstream.name}: no "
                                  f"{what} within the {kind} timeout ({limit:g}s)"))


class UpstreamConnection(asyncio.Protocol):
    """One kept-alive connection to an upstream; one exchange at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.closed = False

    def start(self, exchange: Exchange, request: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        self.transport.write(request)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    def detach(self) -> None:
        """Close without telling the exchange (it already knows how it ended)."""
        self.exchange = None
        self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --- asyncio protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        exchange.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            exchange.fail(UpstreamFailure(502, "service_unavailable",
                                          f"upstream {self.upstream.name} sent a malformed "
                                          f"HTTP response: {e}"))
        if exchange.flush is not None:
            exchange.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.upstream.forget(self)
        if self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            exchange.on_lost(exc)

    # --- httptools callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.on_head(self.parser.get_status_code(), self.headers)
        if exchange.head_only:
            self.exchange = None
            exchange.on_complete()
            self.close()  # the parser would wait for a body that never comes

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_body(body)

    def on_message_complete(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        exchange.on_complete()
        if self.parser.should_keep_alive() and not self.closed:
            self.upstream.release(self)
        else:
            self.close()


class Upstream:
    """A named upstream: its address, credentials, connection pool and health."""

    def __init__(self, name: str, config: UpstreamConfig, deadlines: Deadlines) -> None:
        self.name = name
        self.config = config
        self.deadlines = deadlines
        self.provider = config.provider or "openai"  # (set by the config's validation)
        parts = urlsplit(config.base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.base_path = parts.path.rstrip("/")
        self.host_header = parts.netloc.rpartition("@")[2].encode()
        self.credentials = _credentials(self.provider, config.api_key)
        self.idle: deque[UpstreamConnection] = deque()
        self.failures = 0  # consecutive connection failures and timeouts
        self.active = 0  # requests being served
        self.attrs = {"provider": self.provider}

    @property
    def healthy(self) -> bool:
        return self.failures < UNHEALTHY_AFTER

    async def request(self, data: bytes, head_only: bool = False) -> Exchange:
        """Send a request; return once the response head is in. A kept-alive connection
        that turns out closed before answering is retried once on a fresh one."""
        while True:
            conn = await self._connection()
            exchange = Exchange(conn, self.config.timeouts, head_only)
            conn.start(exchange, data)
            try:
                await exchange.head
            except UpstreamFailure as e:
                if e.stale:
                    continue
                raise
            except asyncio.CancelledError:
                exchange.abort()
                raise
            return exchange

    async def _connection(self) -> UpstreamConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                conn.reused = True
                conn.resume_reading()  # in case a slow client paused it at the very end
                return conn
        loop = asyncio.get_running_loop()
        timeout = self.config.timeouts.connect
        try:
            async with asyncio.timeout(float(timeout) or None):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
        except TimeoutError:
            raise UpstreamFailure(504, "timeout", f"upstream {self.name}: cannot connect to "
                                  f"{self.host}:{self.port} within {timeout:g}s") from None
        except OSError as e:  # refused, unreachable, DNS, TLS
            raise UpstreamFailure(502, "service_unavailable", f"upstream {self.name}: cannot "
                                  f"connect to {self.host}:{self.port}: {e}") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.config.max_idle_connections:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def _credentials(provider: str, api_key: str | None) -> bytes | None:
    """The header line carrying a configured key, as the provider's API expects it."""
    if api_key is None:
        return None
    if provider == "anthropic":
        return b"x-api-key: " + api_key.encode() + b"\r\n"
    if provider == "azure.ai.openai":
        return b"api-key: " + api_key.encode() + b"\r\n"
    return b"authorization: Bearer " + api_key.encode() + b"\r\n"
