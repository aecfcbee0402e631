"""The client side: HTTP/1.1 connections from applications, parsed with httptools.

A `ClientConnection` reads requests (keep-alive, pipelined ones in order),
refuses what cannot be served before any upstream is involved (malformed HTTP,
a body over the limit, a request too slow to arrive, protocol upgrades; the rest
of a body refused while it arrives is read and discarded after the answer, so
that the client sees the answer rather than a reset), and hands each complete
request to the proxy. Request heads are bounded as on every listener
(`meterline.httpserver`): a request target over `MAX_LINE_BYTES` gets 414, more than
`MAX_HEADERS` header lines or `MAX_HEADER_BYTES` of them 431, and past
`max_connections` open connections a new one gets 503 and is closed. It writes the
response as the proxy
gives it: the head is held back and sent with the first body bytes, so that a
small response leaves in one write, and what one read from the upstream brought
leaves in one write however many chunks it held. When the client goes away, the request's
task is cancelled (the proxy closes the upstream call and records a 499), and
when the client reads slower than the upstream writes, the upstream connection
stops being read until the client catches up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

import httptools

from meterline.httpserver import MAX_HEADER_BYTES, MAX_HEADERS, MAX_LINE_BYTES, ConnectionLimit

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from meterline.gateway.config import ProxyConfig
    from meterline.gateway.deadlines import Deadlines
    from meterline.gateway.upstream import UpstreamConnection

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})
# After refusing a body while the client still sends it: at most this much more is
# read (and thrown away) before the connection is closed anyway.
_LINGER_BYTES = 256 << 20
# A request head still incomplete after this many bytes is refused (431) before the
# parser, which keeps a header's pieces until it is whole, holds more of it.
_MAX_HEAD_BYTES = MAX_LINE_BYTES + MAX_HEADER_BYTES + 4 * MAX_HEADERS


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


class Request:
    """A complete request as received: what the proxy needs, nothing more."""

    __slots__ = ("body", "headers", "http10", "keep_alive", "method", "started", "target",
                 "wall")

    def __init__(self) -> None:
        self.started = time.monotonic()  # request start (the event loop clock)
        self.wall = time.time_ns()  # request start, for the event's timestamp
        self.method = b""
        self.target = b""  # path and query as sent
        self.headers: dict[bytes, bytes] = {}  # lower-case names; repeats joined by ", "
        self.body = b""
        self.http10 = False
        self.keep_alive = True


class Handler(Protocol):
    """What a connection hands requests to (the proxy)."""

    config: ProxyConfig
    log: FilteringBoundLogger
    max_body: int
    stopping: bool
    read_timeout: float
    keepalive_timeout: float
    connections: set[ClientConnection]
    connection_limit: ConnectionLimit
    deadlines: Deadlines

    async def handle(self, request: Request, client: ClientConnection) -> None: ...

    def refuse(self, request: Request, client: ClientConnection, status: int,
               message: str) -> None: ...


class _Refusal(Exception):
    """Raised in a parser callback: answer `status` with `message` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientConnection(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None  # being received
        self.body: list[bytes] = []
        self.body_size = 0
        self.queued: deque[Request] = deque()  # pipelined, waiting for the current one
        self.task: asyncio.Task[None] | None = None  # serving the current request
        self.closed = False  # nothing more is written (the client left, or we closed)
        self.gone = False  # the client closed the connection first
        self.upstream: UpstreamConnection | None = None  # paused when the client is slow
        self.pending_head = b""
        self.out: list[bytes] = []  # body bytes queued for the next write
        self.chunked = False
        self.must_close = False  # the response ends with the connection
        self.deadline = math.inf  # for the request to arrive, or for the next one to begin
        self.linger: int | None = None  # answered, closing: bytes still to read and discard
        self.repeated: dict[bytes, list[bytes]] = {}  # values of headers sent more than once
        self.header_count = 0
        self.header_bytes = 0
        self.in_head = False  # between a request's first byte and the end of its head
        self.head_seen = 0  # bytes received while in the head (a lower bound of its size)

    # --- asyncio protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.handler.connection_limit.admits(len(self.handler.connections)):
            self.closed = True
            self.handler.connection_limit.refuse(transport)
            return
        self.transport = transport  # type: ignore[assignment]
        self.handler.connections.add(self)
        self.handler.deadlines.watched.add(self)
        self._arm(self.handler.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        if self.linger is not None:
            self.linger -= len(data)
            if self.linger <= 0:
                self.close()
            return
        if self.closed:
            return  # (a refused connection, closing)
        began_in_head = self.in_head
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(501, "CONNECT tunnels and protocol upgrades (WebSocket) are not "
                               "supported by the gateway")
            return
        except httptools.HttpParserError as e:
            if isinstance(e.__context__, _Refusal) and not self.closed:  # from a callback
                self._refuse(e.__context__.status, e.__context__.message, linger=True)
            elif not self.closed:
                self._refuse(400, f"malformed HTTP request: {e}")
            return
        if self.in_head and began_in_head:  # (all of `data` belongs to one head)
            self.head_seen += len(data)
            if self.head_seen > _MAX_HEAD_BYTES and not self.closed:
                self._refuse(431, f"request head larger than {MAX_HEADER_BYTES} bytes of "
                                  "headers", linger=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = not self.closed
        self.closed = True
        self.handler.connections.discard(self)
        self.handler.deadlines.watched.discard(self)
        if self.gone and self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.exchange is not None:
            self.upstream.pause_reading()  # (not once its response is over: it may be reused)

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- httptools callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self.request = Request()
        self.body = []
        self.body_size = 0
        self.in_head = True
        self.head_seen = 0
        self.header_count = self.header_bytes = 0
        if self.task is None:
            self._arm(self.handler.read_timeout)

    def on_url(self, url: bytes) -> None:
        assert self.request is not None
        self.request.target += url
        if len(self.request.target) > MAX_LINE_BYTES:
            raise _Refusal(414, f"request target longer than {MAX_LINE_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.request is not None
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > MAX_HEADERS:
            raise _Refusal(431, f"more than {MAX_HEADERS} request headers")
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Refusal(431, f"request headers larger than {MAX_HEADER_BYTES} bytes "
                                "together")
        headers = self.request.headers
        name = name.lower()
        if name not in headers:
            headers[name] = value
        elif name in self.repeated:
            self.repeated[name].append(value)
        else:
            self.repeated[name] = [headers[name], value]

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        self.in_head = False
        if self.repeated:  # joined once here: joining at each repeat would be quadratic
            for name, values in self.repeated.items():
                request.headers[name] = b", ".join(values)
            self.repeated = {}
        length = request.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.handler.max_body:
            self._too_large(request)
            return
        if request.headers.get(b"expect", b"").lower() == b"100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.request is None:
            return
        self.body_size += len(body)
        if self.body_size > self.handler.max_body:
            self._too_large(self.request)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        if request is None or self.closed:
            return
        request.method = self.parser.get_method()
        request.http10 = self.parser.get_http_version() == "1.0"
        request.keep_alive = self.parser.should_keep_alive()
        request.body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body = []
        if self.task is None:
            self._serve(request)
        else:
            self.queued.append(request)

    # --- serving -----------------------------------------------------------------
    def _serve(self, request: Request) -> None:
        self.deadline = math.inf
        self.task = self.loop.create_task(self.handler.handle(request, self))
        self.task.add_done_callback(lambda _: self._served(request))

    def _served(self, request: Request) -> None:
        self.task = None
        self.upstream = None
        if self.closed:
            return
        if not request.keep_alive or self.must_close or self.handler.stopping:
            self.close()
        elif self.queued:
            self._serve(self.queued.popleft())
        else:
            self._arm(self.handler.keepalive_timeout)

    def _arm(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds if seconds > 0 else math.inf

    def check(self, now: float) -> None:
        """Called on every `Deadlines` tick: 408 for a request too slow to arrive, close a
        kept-alive connection idle too long."""
        if now < self.deadline or self.task is not None:
            return
        self.deadline = math.inf
        if self.request is not None:  # a request started but did not arrive in time
            self._refuse(408, f"request not received within {self.handler.read_timeout:g}s")
        else:
            self.close()

    def _too_large(self, request: Request) -> None:
        self.request = None
        self.handler.refuse(request, self, 413, "request body larger than max_body_mb "
                            f"({self.handler.max_body / (1 << 20):g} MB)")
        self._linger()

    def _linger(self) -> None:
        """Close after an answer given while the client is still sending its body.
        Closing at once would reset the connection (a socket closed with unread data
        sends RST), and a client still writing would see the reset instead of the
        answer. So nothing more is written, the write side is shut down once the answer
        has left, and what still arrives is read and thrown away (never kept) until the
        client closes, `read_timeout` (else 30 s) passes or `_LINGER_BYTES` were
        discarded."""
        if self.closed or self.transport is None:
            return
        self.closed = True
        self.must_close = True
        self.linger = _LINGER_BYTES
        self._arm(self.handler.read_timeout or 30.0)
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def _refuse(self, status: int, message: str, linger: bool = False) -> None:
        """Answer an error that no request can be built for, and close; with `linger`
        (a head over the limits, which the client may still be sending), once what it
        still sends has been read and thrown away unparsed (see `_linger`)."""
        body = b'{"error": {"message": "%s", "type": "invalid_request_error"}}' % (
            message.replace('"', "'").encode())
        self.respond(status, b"content-type: application/json\r\nconnection: close\r\n", body)
        if linger:
            self.request = None
            self._linger()
        else:
            self.close()

    # --- writing the response ----------------------------------------------------
    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole response in one write."""
        self._write(b"%scontent-length: %d\r\n%s\r\n%s" % (status_line(status), len(body),
                                                          headers, body))

    def begin(self, status: int, headers: bytes, length: int | None, http10: bool) -> None:
        """Start a response whose body follows through `send`; sent with its first bytes.
        `length` None means the length is unknown: chunked (or, for HTTP/1.0, until close)."""
        self.chunked = length is None and not http10 and status not in _NO_BODY
        if length is not None:
            framing = b"content-length: %d\r\n" % length
        elif self.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b"connection: close\r\n"
            self.must_close = status not in _NO_BODY
        self.pending_head = b"%s%s%s\r\n" % (status_line(status), framing, headers)

    def send(self, data: bytes) -> None:
        """Queue body bytes; `flush` writes what was queued (one write per upstream read,
        however many chunks it held)."""
        if data:
            self.out.append(data)

    def flush(self) -> None:
        if not self.out:
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.pending_head:
            data, self.pending_head = self.pending_head + data, b""
        self._write(data)

    def end(self) -> None:
        self.flush()
        data, self.pending_head = self.pending_head, b""
        if self.chunked:
            data += b"0\r\n\r\n"
        self._write(data)

    def _write(self, data: bytes) -> None:
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close once what was written has been sent."""
        if self.transport is not None and (not self.closed or self.linger is not None):
            self.closed = True
            self.linger = None
            self.transport.close()
