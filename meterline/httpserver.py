"""HTTP listeners: one way to start them, and the limits every one of them applies.

A listener faces clients that may be slow, numerous or hostile, and one of them
must not be able to starve the others or the process. What is bounded, and how:

- **Connections**: at most `max_connections` open at once per listener; past it a
  new connection gets a 503 saying so and is closed (one log line per
  `_REFUSAL_LOG_INTERVAL` however many are refused), so the process never runs
  out of file descriptors, which its exporters need too.
- **Time**: a request's head must arrive within `read_timeout` of its first byte
  (else 408 and close); a kept-alive connection idle for `keepalive_timeout` is
  closed. Handlers bound the body's time themselves (`read_body` does).
- **Heads**: at most `MAX_HEADERS` header lines and `MAX_HEADER_BYTES` of them
  (431), a request line of at most `MAX_LINE_BYTES` (aiohttp answers 400; the
  gateway, which parses its own, 414).
- **Bodies**: `read_body` decodes `Content-Encoding` itself, step by step, and
  stops at the size limit or when the body expands more than `MAX_EXPANSION`
  times (413). What a handler leaves unread of a body is thrown away undecoded
  and the connection closed after the answer: aiohttp would read it for up to
  10 s, decoding a compression bomb's whole gigabyte on the event loop.

`serve` applies these to an aiohttp application; the gateway's own HTTP/1.1
server (`gateway/server.py`) applies the same numbers with `ConnectionLimit` and
the constants here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from structlog.typing import FilteringBoundLogger

from meterline import logs
from meterline.component import Config
from meterline.tls import ServerTlsConfig, server_context
from meterline.units import Duration, Listen

try:  # Python 3.14+, else the backport (a dependency of aiokafka[zstd])
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd  # type: ignore[no-redef]
    except ImportError:
        zstd = None  # type: ignore[assignment]
_DECODE_ERRORS: tuple[type[Exception], ...] = (zlib.error, EOFError) + (
    (zstd.ZstdError,) if zstd is not None else ())

MAX_HEADERS = 100  # header lines per request
MAX_HEADER_BYTES = 64 << 10  # names and values of a request's headers together
MAX_LINE_BYTES = 8190  # the request line (so the request target), and one header line
MAX_EXPANSION = 200  # a compressed body decoding to more than this many times its size
_EXPANSION_FLOOR = 1 << 20  # ... is refused once past 1 MiB decoded (small bodies never are)
_DECODE_STEP = 256 << 10  # decoded bytes per step; the loop runs other tasks in between
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between two log lines about refused connections
_CONNECTIONS_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s")


class ListenerConfig(Config):
    """The settings every listener takes; a component's config class derives from it (the
    gateway, and through `BearerListenerConfig` the `webhook` and `otlp` receivers and the
    admin server). Defaults are safe without config."""

    read_timeout: Duration = Duration(30)  # for a request to arrive (head, then body): 408
    keepalive_timeout: Duration = Duration(75)  # idle client connections are closed after
    max_connections: int = 1024  # open at once; more are answered 503 and closed
    tls: ServerTlsConfig | None = None  # serve HTTPS (gRPC: TLS); none: plain HTTP

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


class BearerListenerConfig(ListenerConfig):
    """A listener whose clients are services holding a token shared with the daemon (the
    webhook and OTLP receivers, the admin server; the check is `meterline.auth`)."""

    auth_token: str | None = None  # when set, requests need `Authorization: Bearer <token>`


# --- connections ----------------------------------------------------------------------


class ConnectionLimit:
    """The bound on a listener's open connections, and the refusal past it."""

    def __init__(self, max_connections: int, listen: str, log: FilteringBoundLogger) -> None:
        self.max_connections = max_connections
        self.listen = listen
        self.log = log
        self._refusals = logs.Sparse(_REFUSAL_LOG_INTERVAL)
        message = (b'{"error": "too many connections: this listener serves at most %d at '
                   b'once (max_connections); retry later"}' % max_connections)
        self._answer = _CONNECTIONS_FULL % (len(message), message)

    def admits(self, open_connections: int) -> bool:
        """Whether one more connection may open; counts and logs a refusal otherwise."""
        if open_connections < self.max_connections:
            return True
        if (refused := self._refusals.due()) is not None:  # a line per interval, whatever
            self.log.warning("connections refused: max_connections reached",  # the flood
                             listen=self.listen, max_connections=self.max_connections,
                             refused=refused, refused_total=self.refused)
        return False

    @property
    def refused(self) -> int:
        """Connections refused since the start."""
        return self._refusals.total

    def refuse(self, transport: asyncio.BaseTransport) -> None:
        """Answer 503 and close, without reading the request: refusing must cost little.
        (A client that already sent its request may see the connection reset instead.)"""
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(self._answer)
        transport.close()


class _Refused(asyncio.Protocol):
    def __init__(self, limit: ConnectionLimit) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.limit.refuse(transport)


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, plus what aiohttp lacks:

    - the deadline for a request head to arrive once it started (aiohttp only closes
      connections idle past `keepalive_timeout`, and a client sending a byte now and then
      is never idle);
    - throwing away, unparsed, the rest of a body its handler did not read (refused, say):
      aiohttp would read it for `lingering_time` and decode it if compressed, a bomb's
      gigabyte included, at a few seconds of the event loop each;
    - the count of open connections.

    The `_track_requests` middleware tells it when a request is being served (its head
    has arrived: what comes next is its body) and when that ends."""

    def __init__(self, inner: asyncio.Protocol, site: _Site) -> None:
        self.inner = inner
        self.site = site
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.serving = False
        self.discarding = False  # the rest of an unread body: thrown away until the close
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        self.inner.data_received(data)
        if not self.serving and self.head_timer is None and self.site.read_timeout:
            self.head_timer = self.loop.call_later(self.site.read_timeout, self._head_late)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.site.open -= 1
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        self.serving = True
        self._disarm()

    def request_ended(self, request: web.Request, response: web.StreamResponse | None) -> None:
        """The handler is done; if it left part of the body unread, the rest is thrown
        away and the connection ends with this response (aiohttp closes it once its
        `lingering_time` has passed, if the client has not by then)."""
        self.serving = False
        if not request.content.is_eof():
            self.discarding = True
            if response is not None and not response.prepared:
                response.force_close()

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        message = b'{"error": "request head not received within %gs (read_timeout)"}' % (
            self.site.read_timeout)
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json"
                             b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(message), message))
        self.transport.close()


@web.middleware
async def _track_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the connection when a request is served, and refuses heads too large."""
    connection = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(connection, _Connection):
        return await handler(request)
    connection.request_started()
    response: web.StreamResponse | None = None
    try:
        size = sum(len(name) + len(value) for name, value in request.raw_headers)
        if size > MAX_HEADER_BYTES:
            response = web.json_response(
                {"error": f"request headers too large: {size} bytes, at most "
                          f"{MAX_HEADER_BYTES} together"}, status=431)
        else:
            response = await handler(request)
        return response
    except web.HTTPException as e:  # (a response too)
        response = e
        raise
    finally:
        connection.request_ended(request, response)


class _Site(web.BaseSite):
    """aiohttp's `TCPSite`, with the connection bound and the head deadline."""

    def __init__(self, runner: web.AppRunner, listen: Listen, limits: ListenerConfig,
                 log: FilteringBoundLogger, tls: ServerTlsConfig | None) -> None:
        super().__init__(runner)
        self.listen = listen
        self.ssl = server_context(tls) if tls is not None else None
        self.read_timeout = float(limits.read_timeout)  # 0: none
        self.limit = ConnectionLimit(limits.max_connections, listen, log)
        self.open = 0

    @property
    def name(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.listen}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.listen.host, self.listen.port, reuse_address=True,
            ssl=self.ssl, ssl_handshake_timeout=(self.read_timeout or None) if self.ssl else None)

    def _protocol(self) -> asyncio.Protocol:
        if not self.limit.admits(self.open):
            return _Refused(self.limit)
        self.open += 1
        server = self._runner.server
        assert server is not None
        return _Connection(server(), self)


async def serve(app: web.Application, listen: Listen, limits: ListenerConfig | None = None,
                log: FilteringBoundLogger | None = None, decode_bodies: bool = True,
                tls: ServerTlsConfig | None = None, **runner_options: Any) -> web.AppRunner:
    """Start `app` on `listen` with `limits` (else the defaults) and TLS when `limits` or
    `tls` has it; call `cleanup()` on the result to stop it. `decode_bodies=False` leaves
    request bodies as sent, for handlers that read them with `read_body` (which decodes
    them within limits); else aiohttp decodes them as they arrive, for `request.read()`
    (bounded by `client_max_size`)."""
    limits = limits if limits is not None else ListenerConfig()
    if _track_requests not in app.middlewares:
        app.middlewares.insert(0, _track_requests)
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, auto_decompress=decode_bodies,
        keepalive_timeout=float(limits.keepalive_timeout) or float("inf"),
        max_headers=MAX_HEADERS, max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES,
        logger=_server_logger(listen), **runner_options)
    await runner.setup()
    try:
        await _Site(runner, listen, limits, log or logs.get(), tls or limits.tls).start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"cannot listen on {listen}: {e.strerror}") from e
    return runner


class _Throttle(logging.Filter):
    """aiohttp logs every malformed request with its traceback: a client sending them in
    a loop would flood the log. This lets one record through per `_REFUSAL_LOG_INTERVAL`
    of each kind, saying how many of that kind were left out: a client's error, without
    the traceback (its reason will do), and a handler's that raised (a 500: a bug, with
    its traceback), so that a flood of bad requests never hides one."""

    def __init__(self) -> None:
        super().__init__()
        self.next = {True: 0.0, False: 0.0}  # by kind (the client's fault?): when next
        self.left_out = {True: 0, False: 0}

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        clients = isinstance(error, HttpProcessingError)
        now = time.monotonic()
        if now < self.next[clients]:
            self.left_out[clients] += 1
            return False
        self.next[clients] = now + _REFUSAL_LOG_INTERVAL
        if isinstance(error, HttpProcessingError):
            record.msg = f"{record.msg}: {error.message.replace('%', '%%')}"
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if self.left_out[clients]:
            record.msg = f"{record.msg} (and {self.left_out[clients]} more not logged)"
            self.left_out[clients] = 0
        return True


def _server_logger(listen: Listen) -> logging.Logger:
    logger = logging.getLogger(f"meterline.http.{listen}")
    if not logger.filters:
        logger.addFilter(_Throttle())
    return logger


# --- bodies -----------------------------------------------------------------------------


class BodyRefused(Exception):
    """A request body that is not read: `status` (400, 408, 413, 415) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Decoder(Protocol):
    consumed: int  # encoded bytes decoded so far

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of `data`, at most `_DECODE_STEP` at a time."""

    def complete(self) -> bool: ...


class _Zlib:
    """gzip (several members too), zlib-wrapped deflate, or raw deflate as some send it."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self.consumed = 0
        self._d: zlib._Decompress | None = None

    def _new(self, first: int) -> zlib._Decompress:
        if self.encoding == "deflate":  # RFC 1950 says zlib; a raw stream has no header
            return zlib.decompressobj(zlib.MAX_WBITS if first & 0x0F == 8 else -zlib.MAX_WBITS)
        return zlib.decompressobj(16 + zlib.MAX_WBITS)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._d is None or (self._d.eof and self.encoding != "deflate"):
                self._d = self._new(data[0])  # the first member, or the next one
            elif self._d.eof:
                return  # trailing bytes after a deflate stream: ignored, as zlib does
            out = self._d.decompress(data, _DECODE_STEP)
            rest = self._d.unconsumed_tail or self._d.unused_data
            self.consumed += len(data) - len(rest)
            data = rest
            yield out

    def complete(self) -> bool:
        return self._d is None or self._d.eof


class _Zstd:
    def __init__(self) -> None:
        self.consumed = 0
        self._d = zstd.ZstdDecompressor()

    def pieces(self, data: bytes) -> Iterator[bytes]:
        self.consumed += len(data)  # (taken in whole; decoded step by step below)
        while True:
            if self._d.eof:  # a frame ended: the next one, if any
                data = self._d.unused_data + data
                if not data:
                    return
                self._d = zstd.ZstdDecompressor()
            elif not data and self._d.needs_input:
                return
            yield self._d.decompress(data, _DECODE_STEP)
            data = b""

    def complete(self) -> bool:
        return self._d.eof


def _decoder(encoding: str) -> _Decoder | None:
    """The decoder for a `Content-Encoding` (None for identity); BodyRefused(415) if it is
    not one this server decodes."""
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(encoding)
    if encoding == "zstd" and zstd is not None:
        return _Zstd()
    supported = "gzip, deflate" + (", zstd" if zstd is not None else "")
    raise BodyRefused(415, f"unsupported Content-Encoding {encoding!r}: send the body "
                           f"uncompressed or encoded with one of {supported}")


async def read_body(request: web.Request, max_bytes: int, setting: str,
                    timeout: float, timeout_setting: str = "read_timeout") -> bytes:
    """The request's body (on a listener started with `decode_bodies=False`), decoded per
    its `Content-Encoding`; refused (`BodyRefused`) when it or what it decodes to is
    larger than `max_bytes` (`setting` names the limit in the answer), when it expands
    like a compression bomb, or when it takes longer than `timeout` seconds to arrive
    (`timeout_setting` names that limit).
    Decoding goes step by step, the event loop serving other requests in between, and
    stops at the first limit: no body costs more than `max_bytes` of memory or its
    decoding time, however large it claims to be."""
    limit = f"{setting} ({max_bytes / (1 << 20):g} MB)"
    decoder = _decoder(request.headers.get("Content-Encoding", "").strip().lower())
    if request.content_length is not None and request.content_length > max_bytes:
        raise BodyRefused(413, f"body larger than {limit}")
    try:
        async with asyncio.timeout(timeout or None):
            return await _read(request, decoder, max_bytes, limit)
    except TimeoutError:
        raise BodyRefused(408, f"body not received within {timeout:g}s "
                               f"({timeout_setting})") from None


async def _read(request: web.Request, decoder: _Decoder | None, max_bytes: int,
                limit: str) -> bytes:
    parts: list[bytes] = []
    received = decoded = 0
    while chunk := await request.content.readany():
        received += len(chunk)
        if received > max_bytes:
            raise BodyRefused(413, f"body larger than {limit}")
        if decoder is None:
            parts.append(chunk)
            continue
        for piece in _decode(decoder, chunk):
            decoded += len(piece)
            _check_expansion(decoded, decoder.consumed, max_bytes, limit)
            parts.append(piece)
            await asyncio.sleep(0)  # let the loop serve others between two steps
    if decoder is not None and not decoder.complete():
        raise BodyRefused(400, "truncated body: its Content-Encoding stream does not end")
    return b"".join(parts)


def _decode(decoder: _Decoder, chunk: bytes) -> Iterator[bytes]:
    try:
        yield from decoder.pieces(chunk)
    except _DECODE_ERRORS as e:
        raise BodyRefused(400, f"body does not decode per its Content-Encoding: {e}") from e


def _check_expansion(decoded: int, consumed: int, max_bytes: int, limit: str) -> None:
    if decoded > max_bytes:
        raise BodyRefused(413, f"body larger than {limit} once decoded")
    if decoded > _EXPANSION_FLOOR and decoded > MAX_EXPANSION * max(consumed, 1):
        raise BodyRefused(413, f"body expands more than {MAX_EXPANSION} times when decoded "
                               f"(a compression bomb?): refused before reaching {limit}")

