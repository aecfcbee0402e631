"""Sending OTLP export requests over gRPC or HTTP/protobuf, with the OTLP spec's
rules for what may be retried.

gRPC: `UNAVAILABLE`, `CANCELLED`, `DEADLINE_EXCEEDED`, `ABORTED`, `OUT_OF_RANGE`
and `DATA_LOSS` are retried; `RESOURCE_EXHAUSTED` only when the server sent
`RetryInfo` (without it, it may mean "message too large", which a retry cannot
fix). HTTP: 429, 502, 503 and 504 are retried, honouring `Retry-After`. A
server's retry delay becomes the `retry_after` of the `RetryableError`, which the
delivery loop waits at least. Anything else is a `PermanentError`.
"""

from __future__ import annotations

import gzip
import ssl
from typing import Any, Final, Protocol

import aiohttp
import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from meterline.backoff import retry_after as retry_after_seconds
from meterline.component import PermanentError, RetryableError
from meterline.httpclient import answer_start
from meterline.tls import TlsConfig, client_context, read_pem

_RETRYABLE_CODES: Final = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS})
_RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
# signal -> (gRPC service, HTTP path, response class)
_SIGNALS: Final[dict[str, tuple[str, str, type[Message]]]] = {
    "traces": ("opentelemetry.proto.collector.trace.v1.TraceService", "/v1/traces",
               trace_service_pb2.ExportTraceServiceResponse),
    "logs": ("opentelemetry.proto.collector.logs.v1.LogsService", "/v1/logs",
             logs_service_pb2.ExportLogsServiceResponse),
    "metrics": ("opentelemetry.proto.collector.metrics.v1.MetricsService", "/v1/metrics",
                metrics_service_pb2.ExportMetricsServiceResponse),
}


class SignalUnsupported(PermanentError):
    """The backend has no service for this signal (gRPC UNIMPLEMENTED, HTTP 404/405): Jaeger
    and Tempo take traces but not logs. Sending it again would fail the same way."""


class Transport(Protocol):
    async def send(self, signal: str, request: bytes) -> Message:
        """Export `request` (a serialized export request: the exporter measured it against
        `max_request_mb`, and nothing serializes it again); the server's response (which
        may report partial success)."""

    async def close(self) -> None: ...


def split_endpoint(endpoint: str, insecure: bool) -> tuple[str, bool]:
    """(host:port or base URL without scheme, use TLS). `http://` means plaintext,
    `https://` TLS, and no scheme TLS unless `tls.insecure`."""
    if endpoint.startswith("http://"):
        return endpoint[7:].rstrip("/"), False
    if endpoint.startswith("https://"):
        return endpoint[8:].rstrip("/"), True
    return endpoint.rstrip("/"), not insecure


class GrpcTransport:
    """`tls` None: plaintext. gRPC takes PEM files, not an `ssl.SSLContext`: it verifies
    the server always, and reads unencrypted keys (the config refuses the other options)."""

    def __init__(self, endpoint: str, tls: TlsConfig | None, headers: dict[str, str],
                 timeout: float, gzip_: bool) -> None:
        if tls is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(tls.ca_file), private_key=read_pem(tls.key_file),
                certificate_chain=read_pem(tls.cert_file))
            self.channel = grpc.aio.secure_channel(endpoint, credentials)
        else:
            self.channel = grpc.aio.insecure_channel(endpoint)
        self.endpoint = endpoint
        self.metadata = tuple((k.lower(), v) for k, v in headers.items())
        self.timeout = timeout
        self.compression = grpc.Compression.Gzip if gzip_ else grpc.Compression.NoCompression
        # the requests come serialized: no request serializer
        self.exports = {signal: self.channel.unary_unary(
            f"/{service}/Export", response_deserializer=response_class.FromString)
            for signal, (service, _, response_class) in _SIGNALS.items()}

    async def send(self, signal: str, request: bytes) -> Message:
        try:
            response: Message = await self.exports[signal](
                request, metadata=self.metadata, timeout=self.timeout,
                compression=self.compression)
        except grpc.aio.AioRpcError as e:
            code, delay = e.code(), _retry_delay(e.trailing_metadata() or ())
            message = f"{self.endpoint}: {code.name}: {e.details()}"
            if code in _RETRYABLE_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                            and delay is not None):
                raise RetryableError(message, retry_after=delay) from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise SignalUnsupported(message) from None
            raise PermanentError(message) from None
        return response

    async def close(self) -> None:
        await self.channel.close()


def _retry_delay(trailers: Any) -> float | None:
    """The server's RetryInfo delay, from a rich status or the bare RetryInfo header."""
    info: RetryInfo | None = None
    for key, value in trailers:
        if key == "google.rpc.retryinfo-bin":
            info = RetryInfo.FromString(value)
        elif key == "grpc-status-details-bin" and info is None:
            for detail in RpcStatus.FromString(value).details:
                if detail.Is(RetryInfo.DESCRIPTOR):
                    info = RetryInfo()
                    detail.Unpack(info)
    if info is None:
        return None
    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


class HttpTransport:
    """`tls` None: plaintext."""

    def __init__(self, base_url: str, tls: TlsConfig | None, headers: dict[str, str],
                 timeout: float, gzip_: bool) -> None:
        self.base = f"{'https' if tls is not None else 'http'}://{base_url}"
        self.ssl: ssl.SSLContext | bool = client_context(tls) if tls is not None else False
        self.headers = {**headers, "Content-Type": "application/x-protobuf"}
        if gzip_:
            self.headers["Content-Encoding"] = "gzip"
        self.gzip = gzip_
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.session: aiohttp.ClientSession | None = None

    async def send(self, signal: str, request: bytes) -> Message:
        _, path, response_class = _SIGNALS[signal]
        url = self.base + path
        body = gzip.compress(request, compresslevel=6) if self.gzip else request
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self.session.post(url, data=body, headers=self.headers,
                                         ssl=self.ssl) as answer:
                data = await answer_start(answer)  # (a status, a partial success)
                status, retry_after = answer.status, answer.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RetryableError(f"{url}: {type(e).__name__}: {e}") from None
        if status == 200:
            try:
                return response_class.FromString(data)
            except ProtobufDecodeError:
                return response_class()  # a server that answers 200 without a body
        message = f"{url}: HTTP {status}{_status_message(data)}"
        if status in _RETRYABLE_STATUSES:
            raise RetryableError(message, retry_after=retry_after_seconds(retry_after))
        if status in (404, 405):
            raise SignalUnsupported(message)
        raise PermanentError(message)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _status_message(data: bytes) -> str:
    try:
        message = RpcStatus.FromString(data).message
    except ProtobufDecodeError:
        message = ""
    return f": {message}" if message else ""

