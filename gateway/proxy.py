"""The forwarding proxy: route, forward, relay, measure, and record one event per call.

`Proxy` is long-lived (listener, upstreams, routing). Each request is a `Call`:
it routes by path prefix (`/NAME/...` explicitly, else the default upstream),
reads what it needs from the headers and the JSON body, tries the upstream and
then its fallbacks (on connection errors, timeouts, 429 and 5xx, all before any
byte reached the client), relays the response as it arrives and, when the
response is over (or the client left), hands the event to `record`. `record`
must not block: the `gateway` receiver buffers events and delivers them to the
pipeline off the request path.

`finish` is the one way out for every call, so two things happen there: a stream cut
short (client gone, upstream broken off or silent, gateway stopping) gets the usage
known so far from its reader, marked estimated (`StreamReader.cut`); and the
`error_message`, whoever wrote it, is scrubbed of the call's credentials and of
key-shaped words (`scrub_secrets`), so that only calls with an error pay for it.

Times are `time.monotonic()` (the event loop's clock) throughout:
`provider_duration_ms` runs from the first byte sent upstream to the last byte
received from it (fallback attempts included), `overhead_ms` is the rest of
`duration_ms`: the gateway's own time before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

import msgspec
from structlog.typing import FilteringBoundLogger

from meterline import bounds
from meterline.event import Event, add_policy, api_key_id
from meterline.gateway.budgets import BUDGET_EXCEEDED, Block, BudgetBlocks
from meterline.gateway.config import ProxyConfig
from meterline.gateway.deadlines import Deadlines
from meterline.gateway.guardrails import Guardrails, text_slots
from meterline.gateway.mcp import McpRecorder
from meterline.gateway.server import ClientConnection, Request
from meterline.gateway.shapes import (
    DROP,
    TOKEN,
    Shape,
    StreamReader,
    input_chars,
    read_error,
    shape_for,
)
from meterline.gateway.shapes.base import set_attribute
from meterline.gateway.shapes.media import read_form
from meterline.gateway.streams import LineSplitter, SSESplitter, Unread
from meterline.gateway.upstream import UNHEALTHY_AFTER, Exchange, Upstream, UpstreamFailure
from meterline.genai import GUARDRAIL_BLOCKED, ROUTING_ATTRIBUTE, failure
from meterline.httpserver import ConnectionLimit
from meterline.tls import server_context

_HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host",
    b"content-length", b"expect"})
_CREDENTIALS: Final = frozenset({b"authorization", b"x-api-key", b"api-key"})
# Headers that tell a server behind us which host or URL to serve: a client must not choose
# them for the upstream (a path or host the gateway did not route)
_ROUTING_OVERRIDES: Final = frozenset({
    b"forwarded", b"x-forwarded-host", b"x-original-url", b"x-rewrite-url",
    b"x-http-method-override"})
_NOT_PROXIED: Final = frozenset({b"TRACE"})  # CONNECT is refused by the server (501)
_DOT_SEGMENTS: Final = frozenset({".", ".."})
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")  # CR, LF, NUL... in a metadata label
_TFY_METADATA: Final = b"x-tfy-metadata"
_RATELIMITS: Final = {
    b"x-ratelimit-limit-requests": "ratelimit_requests_limit",
    b"x-ratelimit-remaining-requests": "ratelimit_requests_remaining",
    b"x-ratelimit-limit-tokens": "ratelimit_tokens_limit",
    b"x-ratelimit-remaining-tokens": "ratelimit_tokens_remaining",
    b"anthropic-ratelimit-requests-limit": "ratelimit_requests_limit",
    b"anthropic-ratelimit-requests-remaining": "ratelimit_requests_remaining",
    b"anthropic-ratelimit-tokens-limit": "ratelimit_tokens_limit",
    b"anthropic-ratelimit-tokens-remaining": "ratelimit_tokens_remaining",
}
_NO_CONTENT_LENGTH: Final = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
_JSON: Final = b"content-type: application/json\r\n"
_MAX_PARSED_BODY: Final = 16 << 20  # a larger response is relayed but not read
_MAX_METADATA_VALUE: Final = 128


class _TooManyContainers(msgspec.DecodeError):
    """A JSON document of more objects and arrays than the loop should build."""


def _decode(data: bytes) -> Any:
    """JSON; a document nested past the interpreter's recursion limit is malformed JSON like
    any other (the client gets a 400, not a 500); one of more objects and arrays than the
    loop should build (`bounds.CONTAINERS_MAX`: a request, an upstream's answer) is not
    parsed (`_TooManyContainers`)."""
    if why := bounds.too_many_containers(data):
        raise _TooManyContainers(why)
    try:
        return msgspec.json.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("JSON nested too deeply") from None


_encode = msgspec.json.Encoder().encode


class LocalError(Exception):
    """A request the gateway answers itself, without reaching an upstream."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class Proxy:
    def __init__(self, config: ProxyConfig, record: Callable[[Event], None],
                 log: FilteringBoundLogger, budgets: BudgetBlocks | None = None) -> None:
        self.config = config
        self.record = record
        self.log = log
        self.budgets = budgets  # spent hard budgets (gateway/budgets.py); None: none checked
        self.deadlines = Deadlines()
        self.upstreams = {name: Upstream(name, cfg, self.deadlines)
                          for name, cfg in config.upstreams.items()}
        self.by_prefix = {name.encode(): up for name, up in self.upstreams.items()}
        default = config.default_upstream
        self.default = self.upstreams[default] if default else None
        self.fallbacks = {name: [self.upstreams[f] for f in cfg.fallback]
                          for name, cfg in config.upstreams.items()}
        self.max_body = int(config.max_body_mb * (1 << 20))
        self.read_timeout = float(config.read_timeout)
        self.keepalive_timeout = float(config.keepalive_timeout)
        self.connection_limit = ConnectionLimit(config.max_connections, config.listen, log)
        self.own_headers = frozenset({config.metadata_header.encode(), _TFY_METADATA,
                                      config.user_header.encode(),
                                      config.session_header.encode(), b"traceparent",
                                      b"accept-encoding"})
        self.guardrails = Guardrails(config.guardrails) if config.guardrails else None
        self.connections: set[ClientConnection] = set()
        self.inflight = 0  # requests being served
        self.stopping = False
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        try:
            self.server = await loop.create_server(
                lambda: ClientConnection(self), listen.host, listen.port, reuse_address=True,
                ssl=server_context(self.config.tls) if self.config.tls is not None else None)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {listen}: {e.strerror}") from e
        self.deadlines.start()

    async def shutdown(self) -> None:
        """Stop listening, let requests in flight finish within `drain_timeout`, then
        cancel the rest (each still recorded, as a 503)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=float(self.config.drain_timeout))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for conn in list(self.connections):
            conn.close()
        for upstream in self.upstreams.values():
            upstream.close()
        if self.guardrails is not None:
            self.guardrails.close()
        self.deadlines.stop()

    @property
    def port(self) -> int:
        """The port listened on (useful with `listen: 127.0.0.1:0`)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    # --- called by client connections --------------------------------------------
    async def handle(self, request: Request, client: ClientConnection) -> None:
        call = Call(self, request, client)
        self.inflight += 1
        try:
            await call.run()
        except asyncio.CancelledError:
            call.cancelled()
        except Exception as e:  # a bug: the client still gets an answer, the call an event
            self.log.exception("gateway request failed", error=str(e))
            call.fail(500, "server_error", f"internal gateway error: {type(e).__name__}")
        finally:
            self.inflight -= 1
            call.finish()

    def refuse(self, request: Request, client: ClientConnection, status: int,
               message: str) -> None:
        call = Call(self, request, client)
        with contextlib.suppress(LocalError):
            call.describe()
        call.fail(status, "invalid_request_error", message)
        call.finish()

    # --- upstream health -----------------------------------------------------------
    def failed(self, upstream: Upstream, error: UpstreamFailure) -> None:
        upstream.failures += 1
        if upstream.failures == UNHEALTHY_AFTER:
            self.log.warning("upstream unhealthy", upstream=upstream.name, error=str(error))

    def succeeded(self, upstream: Upstream) -> None:
        if not upstream.healthy:
            self.log.info("upstream healthy again", upstream=upstream.name)
        upstream.failures = 0


class Call:
    """One request through the gateway, from its arrival to its event."""

    __slots__ = ("begun", "body", "client", "drop_usage", "ended", "event", "exchange",
                 "first_token", "json", "last_token", "loop", "mcp", "output_checked", "parsed",
                 "path", "proxy", "query", "reader", "request", "sent", "serving", "shape",
                 "splitter", "tokens", "traceflags", "upstream", "upstream_end")

    def __init__(self, proxy: Proxy, request: Request, client: ClientConnection) -> None:
        self.proxy = proxy
        self.request = request
        self.client = client
        self.event = Event(source="gateway", timestamp=request.wall)
        self.loop = client.loop
        self.upstream: Upstream | None = None  # the route's choice
        self.serving: Upstream | None = None  # the one being tried, then the one serving
        self.exchange: Exchange | None = None
        self.shape: Shape | None = None
        self.mcp: McpRecorder | None = None  # (an MCP upstream) reads its JSON-RPC
        self.path = b"/"
        self.query = b""
        self.body = request.body
        self.json: dict[str, Any] | None = None  # the request body, parsed
        self.output_checked = False  # the output guardrails have read the answer
        self.drop_usage = False
        self.sent: float | None = None  # first byte sent upstream
        self.upstream_end: float | None = None  # last byte received from upstream
        self.begun = False  # the client's response has begun
        self.ended = False  # ... and was written to its end
        self.traceflags = "01"
        self.reader: StreamReader | None = None
        self.splitter: SSESplitter | None = None
        self.parsed: list[bytes] | None = None  # a response body kept to be read
        self.first_token = self.last_token = 0.0
        self.tokens = 0

    async def run(self) -> None:
        try:
            self.describe()
            self.read_body()
        except LocalError as e:
            self.fail(e.status, e.kind, str(e))
            return
        if self.proxy.budgets is not None and (
                block := self.proxy.budgets.check(self.event)) is not None:
            self.over_budget(block)
            return
        if self.proxy.guardrails is not None and await self.guard_input(self.proxy.guardrails):
            return
        assert self.upstream is not None
        chain = [self.upstream, *self.proxy.fallbacks[self.upstream.name]]
        headers = self.forward_headers()
        for attempt, upstream in enumerate(chain, 1):
            last = attempt == len(chain)
            self._serve_on(upstream)
            self.event.attempts, self.event.fallback = attempt, attempt > 1
            data = self.request_bytes(upstream, headers)
            if self.sent is None:
                self.sent = self.loop.time()
            try:
                self.exchange = await upstream.request(data, self.request.method == b"HEAD")
            except UpstreamFailure as e:
                self.upstream_end = self.loop.time()
                self.proxy.failed(upstream, e)
                if last:
                    self.fail(e.status, e.kind, str(e))
                    return
                continue
            self.proxy.succeeded(upstream)
            if last or (self.exchange.status != 429 and self.exchange.status < 500):
                break
            with contextlib.suppress(UpstreamFailure):  # it is being replaced anyway
                await self.exchange.read_body(0)  # drained, so the connection is reused
            self.upstream_end = self.exchange.last
            self.exchange = None
        await self.relay()
        if self.proxy.guardrails is not None and not self.output_checked:
            await self.monitor_output(self.proxy.guardrails)

    # --- the request -----------------------------------------------------------------
    def describe(self) -> None:
        """Route the request and read what the headers say about it."""
        path, _, self.query = self.request.target.partition(b"?")
        event = self.event
        _check_target(self.request.method, path)
        route = self._route(path)
        if route is None:
            event.endpoint = path.decode("latin-1")
            known = ", ".join(f"/{n}/..." for n in self.proxy.upstreams)
            raise LocalError(404, "not_found_error", f"no upstream serves {event.endpoint}: "
                             f"prefix the path with an upstream name ({known})")
        self.upstream, self.path, method = route
        event.route = self.upstream.name
        event.provider = self.upstream.provider
        event.endpoint = self.path.decode("latin-1")
        event.attributes = {ROUTING_ATTRIBUTE: method}
        self._read_headers(self.request.headers)

    def _route(self, path: bytes) -> tuple[Upstream, bytes, str] | None:
        end = path.find(b"/", 1)
        upstream = self.proxy.by_prefix.get(path[1:end] if end > 0 else path[1:])
        if upstream is not None:
            return upstream, (path[end:] if end > 0 else b"/"), "explicit"
        if self.proxy.default is not None:
            return self.proxy.default, path or b"/", "default"
        return None

    def _read_headers(self, headers: dict[bytes, bytes]) -> None:
        event = self.event
        config = self.proxy.config
        key = _client_key(headers)
        if key:
            event.api_key_id = api_key_id(key)
        raw = headers.get(config.metadata_header.encode()) or headers.get(_TFY_METADATA)
        if raw:
            event.metadata = _metadata(raw, config.metadata_header)
        if user := headers.get(config.user_header.encode()):
            event.user_id = user.decode("latin-1")
        if session := headers.get(config.session_header.encode()):
            event.session_id = session.decode("latin-1")
        if organization := headers.get(b"openai-organization"):
            event.organization = organization.decode("latin-1")
        ids = os.urandom(24).hex()
        parent = headers.get(b"traceparent", b"").decode("latin-1").split("-")
        if len(parent) == 4 and len(parent[1]) == 32 and len(parent[2]) == 16:
            event.trace_id, event.parent_span_id = parent[1], parent[2]
            self.traceflags = parent[3][:2]
        else:
            event.trace_id, self.traceflags = ids[16:], "01"
        event.span_id = ids[:16]

    def read_body(self) -> None:
        """Parse a JSON body the path's shape knows; refuse one that is not JSON."""
        if self.upstream is not None and self.upstream.config.protocol == "mcp":
            self.mcp = McpRecorder(self.request, self.proxy.max_body)  # reads, never refuses
            return
        if self.request.method != b"POST":
            return
        self.shape = shape = shape_for(self.event.endpoint or "/")
        if shape is None:
            return
        encoding = self.request.headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in (b"", b"identity"):  # unread, it would pass the guardrails
            raise LocalError(415, "invalid_request_error",
                             f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}: "
                             "the gateway reads this call's body (to record and guard it): "
                             "send it uncompressed")
        if shape.multipart:  # an upload: its small fields read, its files left alone
            form = read_form(self.body, self.request.headers.get(b"content-type", b""))
            if form is not None:
                self.event.operation = shape.operation
                shape.read_form_request(form, self.event, self.proxy.config.capture_content)
            return
        try:
            body = _decode(self.body)
        except _TooManyContainers as e:
            raise LocalError(413, "invalid_request_error", f"request body holds {e}: the "
                                                           "gateway reads the calls it records"
                             ) from None
        except msgspec.DecodeError as e:
            raise LocalError(400, "invalid_request_error",
                             f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise LocalError(400, "invalid_request_error",
                             "request body must be a JSON object")
        self.json = body
        self.event.operation = shape.operation
        shape.read_request(body, self.event, self.proxy.config.capture_content)
        if shape.ask_usage(body):
            self.drop_usage = True
            self.body = _encode(body)

    def over_budget(self, block: Block) -> None:
        """A spent hard budget: 429 in the API's error shape, never forwarded, and counted as
        the `budget` policy."""
        add_policy(self.event, "budget")
        wait = block.seconds_left(time.time())
        self.fail(429, BUDGET_EXCEEDED, block.message, b"retry-after: %d\r\n" % wait)

    async def guard_input(self, guardrails: Guardrails) -> bool:
        """The input rules on the prompt: True when one blocked the call (answered, then).
        A masked prompt is what goes upstream, and what the event records."""
        body, model = self.json, self.event.request_model
        if body is None or not guardrails.active("input", model):
            return False
        verdict = await guardrails.guard("input", body, model)
        verdict.record(self.event)
        if verdict.blocked_by is not None:
            self.fail(400, GUARDRAIL_BLOCKED, verdict.refusal())
            return True
        if verdict.masked:
            self.body = _encode(body)
            assert self.shape is not None
            self.shape.read_request(body, self.event, self.proxy.config.capture_content)
        return False

    async def guard_output(self, guardrails: Guardrails, status: int, head: bytes) -> None:
        """A whole answer held back for the output rules that may change or stop it."""
        exchange = self.exchange
        assert exchange is not None
        try:
            raw = await exchange.read_body(_MAX_PARSED_BODY)
        except UpstreamFailure as e:
            self.upstream_end, self.exchange = exchange.last, None
            self.fail(e.status, e.kind, str(e))
            return
        self.upstream_end, self.exchange = exchange.last, None  # (kept on cancellation)
        self.output_checked = True
        try:
            body = _decode(raw)
        except msgspec.DecodeError as e:
            self.fail(502, "bad_gateway", f"the upstream's answer cannot be read ({e}): the "
                                          "output guardrails cannot check it")
            return
        verdict = await guardrails.guard("output", body, self.event.request_model)
        verdict.record(self.event)
        if verdict.blocked_by is not None:
            self.fail(400, GUARDRAIL_BLOCKED, verdict.refusal())
            return
        if verdict.masked:
            raw = _encode(body)
        self.begun = self.ended = True
        self.client.respond(status, head, raw)
        self.parsed = [raw]
        self._read_response()

    async def monitor_output(self, guardrails: Guardrails) -> None:
        """The output rules on an answer already relayed (a stream, or rules that only
        monitor): recorded, nothing changed. The texts are the event's output messages,
        else the answer's body when it was kept."""
        event = self.event
        if not guardrails.active("output", event.request_model):
            return
        answer: Any = event.output_messages
        if answer is None and self.parsed:
            with contextlib.suppress(msgspec.DecodeError):
                answer = _decode(b"".join(self.parsed))
        if answer is not None:
            verdict = await guardrails.check(
                "output", [c[k] for c, k in text_slots(answer)], event.request_model)
            for outcome in verdict.fired:
                outcome.action = "monitor"  # the answer had gone: only recorded
            verdict.record(event)

    def forward_headers(self) -> tuple[bytes, bytes]:
        """The client's headers to forward: (everything but credentials, credentials)."""
        skip = self.proxy.own_headers
        common: list[bytes] = []
        credentials: list[bytes] = []
        for name, value in self.request.headers.items():
            if name in _HOP_BY_HOP or name in skip or name in _ROUTING_OVERRIDES:
                continue
            (credentials if name in _CREDENTIALS else common).append(
                b"%s: %s\r\n" % (name, value))
        event = self.event
        common.append(b"accept-encoding: identity\r\ntraceparent: 00-%s-%s-%s\r\n" % (
            event.trace_id.encode(), event.span_id.encode(),  # type: ignore[union-attr]
            self.traceflags.encode()))
        return b"".join(common), b"".join(credentials)

    def request_bytes(self, upstream: Upstream, headers: tuple[bytes, bytes]) -> bytes:
        common, credentials = headers
        method = self.request.method
        target = upstream.base_path.encode() + self.path
        if self.query:
            target += b"?" + self.query
        length = (b"content-length: %d\r\n" % len(self.body)
                  if self.body or method not in _NO_CONTENT_LENGTH else b"")
        return b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s%s\r\n%s" % (
            method, target, upstream.host_header, length, common,
            upstream.credentials or credentials, self.body)

    def _serve_on(self, upstream: Upstream) -> None:
        if self.serving is not None:
            self.serving.active -= 1
        self.serving = upstream
        upstream.active += 1
        self.event.upstream = upstream.name
        self.event.provider = upstream.provider
        # (OpenAI's regional hosts, eu.api.openai.com, bill its calls 10% more)
        set_attribute(self.event, "server.address", upstream.host)

    # --- the response ----------------------------------------------------------------
    async def relay(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        event = self.event
        event.status_code = status = exchange.status
        head, length, ctype = self._response_head(exchange.headers)
        if self.mcp is not None:
            self.mcp.respond(status, exchange.headers, ctype)
        shape = self.shape
        if shape is not None and status < 300 and ctype.startswith((b"text/event-stream",
                                                                     b"application/x-ndjson")):
            self.reader = shape.stream(event, self.proxy.config.capture_content,
                                       self.drop_usage)
            if self.reader is not None:
                sse = ctype.startswith(b"text/event-stream")
                self.splitter = SSESplitter() if sse else LineSplitter()
                if self.drop_usage:
                    length = None  # the body changes
        elif (status < 300 and shape is not None and shape.reads_response
              and self.proxy.guardrails is not None and self.request.method != b"HEAD"
              and self.proxy.guardrails.holds("output", event.request_model)):
            await self.guard_output(self.proxy.guardrails, status, head)
            return
        elif (shape is not None and shape.reads_response) or status >= 400:
            self.parsed = []
            key = self.serving.config.api_key if self.serving is not None else None
            if status >= 400 and key and self.request.method != b"HEAD":
                await self._relay_error_without(key.encode(), status, head)
                return
        client = self.client
        client.begin(status, head, length, self.request.http10)
        self.begun = True
        client.upstream = exchange.conn
        exchange.attach(self.on_body, self.on_flush)
        try:
            await exchange.done
        except UpstreamFailure as e:  # broke off or went silent mid-response
            client.close()
            event.status_code, event.error_type, event.error_message = e.status, e.kind, str(e)
            self.exchange = None
            return
        finally:
            self.upstream_end = exchange.last
        self.exchange = None  # (kept on cancellation, for `cancelled` to close it)
        self.complete()
        self._read_response()

    async def _relay_error_without(self, key: bytes, status: int, head: bytes) -> None:
        """An error answered to the key the gateway put in place of the client's: the body is
        read whole and that key, should the upstream echo it, replaced before the client
        sees it (the client never had it). Only such errors are held back this way."""
        exchange = self.exchange
        assert exchange is not None
        try:
            body = await exchange.read_body(_MAX_PARSED_BODY)  # (an error body is small)
        except UpstreamFailure as e:
            self.upstream_end, self.exchange = exchange.last, None
            self.fail(e.status, e.kind, str(e))
            return
        self.upstream_end, self.exchange = exchange.last, None  # (kept on cancellation)
        if key in body:
            body = body.replace(key, SECRET_MARKER.encode())
        self.begun = self.ended = True
        self.client.respond(status, head, body)
        self.parsed = [body]
        self._read_response()

    def on_flush(self) -> None:
        """After each read from the upstream: write what it brought, and the end of the
        response with it when it was the last read."""
        done = self.exchange.done if self.exchange is not None else None
        if done is not None and done.done() and not done.cancelled() and not done.exception():
            self.complete()
        else:
            self.client.flush()
        if self.mcp is not None:  # read once written out: recording never delays the relay
            self.mcp.scan(self.loop.time())

    def complete(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.splitter is not None and (rest := self.splitter.rest()):
            self._stream_blocks([rest])
        self.client.end()

    def _response_head(self, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, int | None,
                                                                           bytes]:
        """The head to send the client, the body length if known, the content type."""
        event = self.event
        out: list[bytes] = []
        length: int | None = None
        ctype = b""
        for name, value in headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                if lower == b"content-length" and value.isdigit():
                    length = int(value)
                continue
            out.append(b"%s: %s\r\n" % (name, value))
            if lower == b"content-type":
                ctype = value.lower()
            elif lower in _RATELIMITS and value.isdigit():
                setattr(event, _RATELIMITS[lower], int(value))
        return b"".join(out), length, ctype

    def on_body(self, data: bytes) -> None:
        """Each piece of the response body, as it comes from the upstream."""
        if self.splitter is not None:
            self._stream_blocks(self.splitter.feed(data))
            return
        self.client.send(data)
        if self.mcp is not None:
            self.mcp.feed(data)
        parsed = self.parsed
        if parsed is not None:
            parsed.append(data)
            if len(parsed) > 64 and sum(map(len, parsed)) > _MAX_PARSED_BODY:
                self.parsed = None

    def _stream_blocks(self, blocks: list[bytes]) -> None:
        """Read each whole stream message; forward those not dropped."""
        splitter, reader, event = self.splitter, self.reader, self.event
        assert splitter is not None and reader is not None
        for block in blocks:
            if type(block) is Unread:  # a message too long to read: relayed as it came
                self.client.send(block)
                continue
            flags = 0
            payload = splitter.payload(block)
            if payload is not None and payload[:1] == b"{":
                try:
                    message = _decode(payload)
                except msgspec.DecodeError:
                    message = None
                if isinstance(message, dict):
                    flags = reader.feed(message)
                    if message.get("error") or message.get("type") == "error":
                        read_error(message, event)
            if flags & TOKEN:
                now = self.loop.time()
                if not self.tokens:
                    self.first_token = now
                self.last_token = now
                self.tokens += 1
            if not flags & DROP:
                self.client.send(block)

    def _read_response(self) -> None:
        event = self.event
        if self.reader is not None:
            self.reader.finish()
            self.reader = None  # read to its end (`finish` sees no stream cut short)
            return
        if not self.parsed:
            return
        try:
            body: Any = _decode(b"".join(self.parsed))
        except msgspec.DecodeError:
            body = None
        if event.status_code is not None and event.status_code >= 400:
            read_error(body, event)
        elif self.shape is not None:
            self.shape.read_response(body, event, self.proxy.config.capture_content)

    # --- endings -----------------------------------------------------------------------
    def fail(self, status: int, kind: str, message: str, headers: bytes = b"") -> None:
        """Answer the client with an error of the gateway's own (`headers`: more of them,
        each ending in CRLF)."""
        event = self.event
        event.status_code, event.error_type, event.error_message = status, kind, message
        if self.begun:
            self.client.close()  # a response had begun: the client sees it cut off
            return
        body = (self.shape or _DEFAULT_SHAPE).error_body(kind, message)
        self.client.respond(status, _JSON + headers, body)

    def cancelled(self) -> None:
        """The task was cancelled: the client left (499), or the gateway is stopping."""
        if self.exchange is not None:
            self.upstream_end = self.exchange.last
            self.exchange.abort()
            self.exchange = None
        event = self.event
        if self.client.gone:
            event.status_code, event.error_type = 499, None
            event.error_message = "client closed the connection"
        else:
            event.status_code, event.error_type = 503, "service_unavailable"
            event.error_message = "the gateway stopped before the response ended"
            self.client.close()

    def finish(self) -> None:
        """Timings, and the event handed to `record`."""
        end = self.loop.time()
        event = self.event
        started = self.request.started
        event.duration_ms = (end - started) * 1000
        if self.sent is not None:
            upstream_end = end if self.upstream_end is None else min(end, self.upstream_end)
            event.provider_duration_ms = max(0.0, upstream_end - self.sent) * 1000
            event.overhead_ms = max(0.0, event.duration_ms - event.provider_duration_ms)
        if self.tokens:
            event.ttft_ms = (self.first_token - started) * 1000
            if self.tokens > 1:
                event.itl_ms = (self.last_token - self.first_token) * 1000 / (self.tokens - 1)
        if self.reader is not None:  # a stream cut short: the usage so far, estimated
            self.reader.cut(self._input_chars)
            self.reader = None
        if event.error_message:
            event.error_message = scrub_secrets(event.error_message, self._secrets())
        event.error_type = failure(event.error_type, event.status_code)
        if event.fallback:
            add_policy(event, "fallback")
        if self.serving is not None:
            self.serving.active -= 1
            self.serving = None
        if self.mcp is not None:  # one event per JSON-RPC request or notification
            for each in self.mcp.events(event, self.sent,
                                        lambda text: scrub_secrets(text, self._secrets())):
                self.proxy.record(each)
            return
        self.proxy.record(event)

    def _input_chars(self) -> int:
        """The characters of the request's text (read again: only a cut stream asks)."""
        try:
            return input_chars(_decode(self.body))
        except msgspec.DecodeError:
            return 0

    def _secrets(self) -> list[str]:
        """The credentials this call carried: the client's, and the key the gateway put in
        their place for the upstream that answered."""
        headers = self.request.headers
        secrets: list[str] = []
        for name in _CREDENTIALS:
            if value := headers.get(name, b"").decode("latin-1").strip():
                scheme, _, credential = value.partition(" ")
                secrets.append(credential.strip() if scheme.lower() in ("bearer", "basic")
                               and credential else value)
        for upstream in (self.serving, self.upstream):
            if upstream is not None and upstream.config.api_key:
                secrets.append(upstream.config.api_key)
        return secrets


_DEFAULT_SHAPE: Final = Shape()

SECRET_MARKER: Final = "[REDACTED:api_key]"
_MIN_SECRET: Final = 8  # shorter values are not told apart from words
_KEY_SHAPED: Final = re.compile(
    # an Authorization value (a word after Bearer with a digit or a symbol: not "Bearer token")
    r"(?P<scheme>\b(?i:bearer)\s+)(?=[A-Za-z.]*[0-9_\-~+/=*\u2026]|[A-Za-z]{20})"
    r"[A-Za-z0-9._~+/=*\u2026-]{8,}"
    # OpenAI, Anthropic (sk-ant-), DeepSeek...; Google. After no letter or digit: a key
    # joined to a name by `_` (`key_sk-...`) is a key all the same (as redact's detectors)
    r"|(?<![^\W_])sk-[A-Za-z0-9_\-*\u2026\u2022]{12,}"
    r"|(?<![^\W_])AIza[0-9A-Za-z_\-]{20,}"
    r"|[A-Za-z0-9_\-]+\*{4,}[A-Za-z0-9_\-]*|\*{4,}[A-Za-z0-9_\-]+")  # a masked key: ab***yz
_WORD: Final = re.compile(r"[^\s\"'`<>(),;]+")
_MASKS: Final = frozenset("*\u2026\u2022")  # *, …, •


def scrub_secrets(text: str, secrets: list[str]) -> str:
    """`text` (an error message, often an upstream's) without credentials: each of
    `secrets` where it appears whole, a word that echoes one of them in part (a fragment of
    8 characters or more, or its first 6 characters followed by a mask or by its last 4,
    as OpenAI's `sk-proj-abc***xyz0` does), and any key-shaped word (`Bearer ...`, `sk-...`,
    `AIza...`, a masked `ab****yz`), each replaced by `SECRET_MARKER`."""
    secrets = [s for s in secrets if len(s) >= _MIN_SECRET]
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, SECRET_MARKER)
    if secrets:
        text = _WORD.sub(lambda m: _scrub_word(m.group(), secrets), text)
    return _KEY_SHAPED.sub(lambda m: (m.group("scheme") or "") + SECRET_MARKER, text)


def _scrub_word(word: str, secrets: list[str]) -> str:
    core = word.rstrip(".:!?")
    if len(core) < _MIN_SECRET or SECRET_MARKER in core:
        return word
    for secret in secrets:
        if core in secret or (core[:6] == secret[:6] and (
                core[-4:] == secret[-4:] or not _MASKS.isdisjoint(core))):
            return SECRET_MARKER + word[len(core):]
    return word


def _client_key(headers: dict[bytes, bytes]) -> bytes | None:
    auth = headers.get(b"authorization")
    if auth and auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key") or headers.get(b"api-key") or None


def _check_target(method: bytes, path: bytes) -> None:
    """Refuse what a forwarding proxy must not pass on: TRACE, and targets that
    could reach another path than the one routed. An absolute-form target (`http://host/x`)
    is not a path; a dot segment (`/v1/../../admin`, percent-encoded too) would climb out of
    the upstream's base path on a server that resolves it."""
    if method in _NOT_PROXIED:
        raise LocalError(405, "invalid_request_error",
                         f"method {method.decode('latin-1')} is not proxied")
    if not path.startswith(b"/"):
        raise LocalError(400, "invalid_request_error",
                         "the request target must be a path (origin-form: /v1/...)")
    text = urllib.parse.unquote(path.decode("latin-1")).replace("\\", "/")
    if _DOT_SEGMENTS.intersection(text.split("/")):
        raise LocalError(400, "invalid_request_error",
                         "the path must not hold '.' or '..' segments")


def _metadata(raw: bytes, header: str) -> dict[str, str]:
    try:
        labels = _decode(raw)
    except msgspec.DecodeError as e:
        raise LocalError(400, "invalid_request_error",
                         f"header {header}: not valid JSON: {e}") from None
    if not isinstance(labels, dict) or any(isinstance(v, dict | list) for v in labels.values()):
        raise LocalError(400, "invalid_request_error",
                         f"header {header}: expected a JSON object of string values")
    metadata = {str(k): (v if isinstance(v, str) else _encode(v).decode())[:_MAX_METADATA_VALUE]
                for k, v in labels.items() if v is not None}
    if any(_CONTROL.search(text) for item in metadata.items() for text in item):
        raise LocalError(400, "invalid_request_error",
                         f"header {header}: keys and values must not hold control characters")
    return metadata
