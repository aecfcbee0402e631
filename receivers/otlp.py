"""Receiver `otlp`: LLM calls from applications instrumented with OpenTelemetry.

Takes OTLP traces and logs over gRPC (`TraceService/Export`, `LogsService/Export`)
and over HTTP (`POST /v1/traces`, `POST /v1/logs`, protobuf or JSON, gzip, deflate,
zstd or not; decoded step by step within `max_message_mb`, see
`meterline.httpserver`). Spans and log records that describe an LLM call, an agent
(`invoke_agent`, `create_agent`), a tool call (`execute_tool`) or an MCP request
(`mcp.method.name`) become events (see `receivers/decoders/otlp.py`); other spans
are skipped and counted
(`meterline_receiver_refused_events_total{reason="not_llm_call"}`), not reported
back as rejected, so an application may send all its spans here. A call whose
attributes are malformed is rejected and reported in the OTLP partial-success
answer with the reason.

Protobuf refuses a whole request when one string in it is not UTF-8. Such a request
is parsed again item by item (`receivers/decoders/otlp_wire.py`): a span or log record
that does not parse is rejected alone in the partial-success answer, named by its
place (`resource_spans[0].scope_spans[1].spans[3]: String field had bad UTF-8`; never
its bytes), and so are all the items of a resource or scope that does not parse;
the others are taken. Bytes that are not protobuf (cut short, a length past the end)
still refuse the whole request (gRPC `INVALID_ARGUMENT`, HTTP 400), saying where.

An application may send both the span of a call and its
`gen_ai.client.inference.operation.details` log record (they carry the same
event id). So that the call counts once, the receiver remembers the ids of the
last `dedupe_ids` calls it queued, traces and logs alike, and drops a call it has
just had (`meterline_receiver_refused_events_total{reason="duplicate"}`) before any
processor sees it; the first of the two to arrive is the event. Spans alone or logs
alone are untouched.

A request's body is decoded off the event loop, in a worker process, when the daemon
has workers (`Consumer.consume_encoded`): a batch of 512 spans with kilobyte prompts
takes about 10 ms to decode, which the gateway's streams would otherwise wait out.
With `dedupe_ids`, the worker sends the events back packed with their ids, the ids
are claimed here, and a worker processes the new ones (two round trips).

The answer comes once the events are durably queued. When a queue is full,
nothing is queued and the client is told to retry: gRPC `RESOURCE_EXHAUSTED` with
`RetryInfo`, HTTP 429 with `Retry-After` (503 when the queue cannot be written).
The SDKs' OTLP exporters retry both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from aiohttp import web
from google.protobuf.duration_pb2 import Duration as ProtoDuration
from google.protobuf.json_format import MessageToJson
from google.protobuf.message import Message
from google.rpc import code_pb2
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meterline.auth import REFUSAL, BearerToken
from meterline.backpressure import Refused, refuse_encoded
from meterline.component import Consumer, Context, Factory, Receiver
from meterline.httpserver import (
    MAX_HEADER_BYTES,
    BearerListenerConfig,
    BodyRefused,
    read_body,
    serve,
)
from meterline.receivers.decoders import DecodeError, TooManyItems, loggable
from meterline.receivers.decoders.otlp import decode_request
from meterline.recent import RecentIds
from meterline.tls import ServerTlsConfig, read_pem
from meterline.units import Listen

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_MAX_REASONS = 5
# The google.rpc.Code an OTLP/HTTP error body carries, by HTTP status.
_RPC_CODES = {400: code_pb2.INVALID_ARGUMENT, 401: code_pb2.UNAUTHENTICATED,
              408: code_pb2.DEADLINE_EXCEEDED, 413: code_pb2.INVALID_ARGUMENT,
              415: code_pb2.INVALID_ARGUMENT, 429: code_pb2.RESOURCE_EXHAUSTED,
              503: code_pb2.UNAVAILABLE}


class OtlpReceiverConfig(BearerListenerConfig):
    """Also `auth_token`, `tls`, `read_timeout`, `keepalive_timeout` and `max_connections`
    (`BearerListenerConfig`), for both listeners."""

    grpc: Listen | None = Listen("127.0.0.1:4317")  # null turns gRPC off
    http: Listen | None = Listen("127.0.0.1:4318")  # null turns HTTP off
    max_message_mb: float = 16  # per request (HTTP: after decoding gzip, deflate, zstd)
    dedupe_ids: int = 100_000  # ids of recent calls remembered, across traces and logs; 0: off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grpc is None and self.http is None:
            raise ValueError("set grpc, http or both: with neither, nothing is received")
        if self.max_message_mb <= 0:
            raise ValueError("max_message_mb must be positive")
        if self.dedupe_ids < 0:
            raise ValueError("dedupe_ids must be >= 0")


def _grpc_credentials(tls: ServerTlsConfig) -> grpc.ServerCredentials:
    """The listener's TLS as gRPC takes it: PEM bytes, not an `ssl` context."""
    key, chain = read_pem(tls.key_file), read_pem(tls.cert_file)
    assert key is not None and chain is not None
    client_ca = read_pem(tls.client_ca_file)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class _Signal:
    """What differs between traces and logs."""

    name: str  # "spans" or "log records", for messages
    service: str  # the gRPC service's full name
    request: type[Message]
    kind: str  # what `decode_request` decodes: "traces" or "logs"
    response: Callable[[int, str], Message]  # (rejected, message) -> Export*ServiceResponse


_TRACES = _Signal(
    "spans", "opentelemetry.proto.collector.trace.v1.TraceService",
    trace_service_pb2.ExportTraceServiceRequest, "traces",
    lambda n, msg: trace_service_pb2.ExportTraceServiceResponse(
        partial_success=trace_service_pb2.ExportTracePartialSuccess(
            rejected_spans=n, error_message=msg)))
_LOGS = _Signal(
    "log records", "opentelemetry.proto.collector.logs.v1.LogsService",
    logs_service_pb2.ExportLogsServiceRequest, "logs",
    lambda n, msg: logs_service_pb2.ExportLogsServiceResponse(
        partial_success=logs_service_pb2.ExportLogsPartialSuccess(
            rejected_log_records=n, error_message=msg)))


class OtlpReceiver(Receiver):
    def __init__(self, config: OtlpReceiverConfig, context: Context, consumer: Consumer) -> None:
        super().__init__(consumer)
        self.config = config
        self.log = context.log
        self.auth = BearerToken(config.auth_token)
        self.grpc_server: grpc.aio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.recent = RecentIds(config.dedupe_ids) if config.dedupe_ids else None

    async def start(self) -> None:
        max_bytes = int(self.config.max_message_mb * (1 << 20))
        if self.config.grpc is not None:
            await self._start_grpc(self.config.grpc, max_bytes)
        if self.config.http is not None:
            app = web.Application(client_max_size=max_bytes)
            app.router.add_post("/v1/traces", self._http_traces)
            app.router.add_post("/v1/logs", self._http_logs)
            try:
                self.http_runner = await serve(app, self.config.http, self.config, self.log,
                                               decode_bodies=False, shutdown_timeout=5.0)
            except OSError:
                await self.shutdown()  # the gRPC listener, if it started
                raise
        self.log.info("otlp listening", grpc=self.config.grpc, http=self.config.http)

    async def _start_grpc(self, listen: Listen, max_bytes: int) -> None:
        server = grpc.aio.server(options=self._grpc_options(max_bytes))
        server.add_generic_rpc_handlers([self._grpc_service(_TRACES), self._grpc_service(_LOGS)])
        address = f"{listen.host}:{listen.port}"
        tls = self.config.tls
        try:
            port = (server.add_secure_port(address, _grpc_credentials(tls)) if tls is not None
                    else server.add_insecure_port(address))
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen on {listen} (gRPC): address in use or not available")
        await server.start()
        self.grpc_server = server

    def _grpc_options(self, max_bytes: int) -> list[tuple[str, int]]:
        """The listener limits, as gRPC core knows them (it decodes compressed messages
        within `max_receive_message_length` by itself). HTTP/2 pings keep a connection
        with a call in flight from being idle."""
        config = self.config
        options = [("grpc.max_receive_message_length", max_bytes), ("grpc.so_reuseport", 0),
                   ("grpc.max_allowed_incoming_connections", config.max_connections),
                   ("grpc.max_metadata_size", MAX_HEADER_BYTES)]
        if config.read_timeout:
            options.append(("grpc.server_handshake_timeout_ms", _ms(config.read_timeout)))
        if config.keepalive_timeout:
            options.append(("grpc.max_connection_idle_ms", _ms(config.keepalive_timeout)))
        return options

    async def shutdown(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5.0)
        if self.http_runner is not None:
            await self.http_runner.cleanup()

    # --- the same for both transports ----------------------------------------------
    async def _accept(self, body: bytes, json_body: bool, signal: _Signal) -> Message:
        """Queue the calls a request's body carries; the partial-success answer to give.
        `DecodeError` when the body is not such a request at all. The items refused are
        counted once the body is answered (one pushed back counts them when sent again)."""
        decode = functools.partial(decode_request, signal.kind, json_body)
        received = await refuse_encoded(self.consumer, decode, body, self.log, self.recent)
        rejected = [reason for _, reason in received.rejected]
        if received.skipped:
            self.consumer.refused(received.skipped, "not_llm_call")
        if rejected:
            self.consumer.refused(len(rejected), "undecodable")
            self.log.info(f"{signal.name} rejected", count=len(rejected),
                          first_reason=loggable(rejected[0]))
        if received.duplicates:
            self.consumer.refused(received.duplicates, "duplicate")
        distinct = list(dict.fromkeys(rejected))  # the items of a bad resource share one
        reasons = distinct[:_MAX_REASONS]
        more = len(distinct) - len(reasons)
        message = "; ".join(reasons) + (f"; and {more} more" if more else "")
        return signal.response(len(rejected), message)

    # --- gRPC ----------------------------------------------------------------------
    def _grpc_service(self, signal: _Signal) -> grpc.GenericRpcHandler:
        """The `Export` method of a signal's service. It takes the request as bytes and
        parses it here: with the generated servicer, gRPC parses it and answers a malformed
        one UNKNOWN, whereas a client must be told INVALID_ARGUMENT (not worth retrying)."""
        async def export(request: bytes, context: grpc.aio.ServicerContext) -> Message:
            return await self.export_grpc(request, context, signal)

        handler = grpc.unary_unary_rpc_method_handler(
            export, response_serializer=lambda message: message.SerializeToString())
        return grpc.method_handlers_generic_handler(signal.service, {"Export": handler})

    async def export_grpc(self, body: bytes, context: grpc.aio.ServicerContext,
                          signal: _Signal) -> Message:
        metadata = dict(context.invocation_metadata() or ())
        if not self.auth.admits(metadata.get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        try:
            return await self._accept(body, False, signal)
        except DecodeError as e:
            self.consumer.refused(1, "undecodable")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e) if isinstance(
                e, TooManyItems) else f"not a protobuf {signal.request.__name__}: {e}")
            raise  # not reached: abort raises
        except Refused as e:
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED if e.overloaded
                    else grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, str(e), _retry_metadata(e, code))
            raise  # not reached: abort raises

    # --- HTTP ----------------------------------------------------------------------
    async def _http_traces(self, request: web.Request) -> web.Response:
        return await self._handle_http(request, _TRACES)

    async def _http_logs(self, request: web.Request) -> web.Response:
        return await self._handle_http(request, _LOGS)

    async def _handle_http(self, request: web.Request, signal: _Signal) -> web.Response:
        json_body = request.content_type.lower() == _JSON
        if not self.auth.admits_request(request):
            return _http_error(401, REFUSAL, json_body)
        if request.content_type.lower() not in (_PROTOBUF, _JSON):
            return _http_error(415, f"unsupported Content-Type {request.content_type!r}: send "
                                    f"{_PROTOBUF} or {_JSON}", json_body)
        try:
            body = await read_body(request, int(self.config.max_message_mb * (1 << 20)),
                                   "max_message_mb", float(self.config.read_timeout))
        except BodyRefused as e:
            return _http_error(e.status, e.message, json_body)
        try:
            answer = await self._accept(body, json_body, signal)
        except TooManyItems as e:
            self.consumer.refused(1, "undecodable")
            return _http_error(413, str(e), json_body)
        except DecodeError as e:
            self.consumer.refused(1, "undecodable")
            return _http_error(400, f"not an OTLP {signal.request.__name__}: {e}", json_body)
        except Refused as e:
            return _http_error(e.status, str(e), json_body, e.headers)
        return _http_answer(200, answer, json_body)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _retry_metadata(refusal: Refused, code: grpc.StatusCode) -> tuple[tuple[str, bytes], ...]:
    """RetryInfo, both where gRPC's rich status puts it (`grpc-status-details-bin`, read by
    the Collector) and where the Python SDK reads it (`google.rpc.retryinfo-bin`)."""
    seconds = max(1, round(refusal.retry_after))
    info = RetryInfo(retry_delay=ProtoDuration(seconds=seconds))
    status = RpcStatus(code=code.value[0], message=str(refusal))
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),
            ("google.rpc.retryinfo-bin", info.SerializeToString()))


def _http_answer(status: int, message: Message, json_body: bool,
                 headers: dict[str, str] | None = None) -> web.Response:
    if json_body:
        return web.Response(status=status, body=MessageToJson(message, indent=None).encode(),
                            content_type=_JSON, headers=headers)
    return web.Response(status=status, body=message.SerializeToString(),
                        content_type=_PROTOBUF, headers=headers)


def _http_error(status: int, message: str, json_body: bool,
                headers: dict[str, str] | None = None) -> web.Response:
    """OTLP/HTTP errors carry a `google.rpc.Status` in the request's encoding."""
    return _http_answer(status, RpcStatus(code=_RPC_CODES[status], message=message), json_body,
                        headers)


factory = Factory(kind="receiver", type="otlp", config=OtlpReceiverConfig, create=OtlpReceiver)
