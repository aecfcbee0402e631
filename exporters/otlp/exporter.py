"""Exporter `otlp`: each event as a CLIENT span (and optionally a log record and GenAI
metrics) to Jaeger, Tempo, an OpenTelemetry Collector or any OTLP backend.

A batch is sent signal by signal (traces, then logs, then metrics), each in as few
requests as `max_request_mb` allows (long prompts travel in the spans). When a later
signal or part fails and the batch is retried, those already accepted are not sent
again. A partial success (the server rejected some items) is logged and counted
(`meterline_exporter_otlp_rejected_items_total`), not retried: the OTLP spec says
a retry would be rejected the same way. A backend without a signal's service (Jaeger
and Tempo take no logs) answers UNIMPLEMENTED (HTTP 404): that signal of the batch is
counted as unsupported (`meterline_exporter_otlp_unsupported_events_total`) and logged
once, and the other signals are delivered as usual. The batch is not dead-lettered:
replaying it would send its spans a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec
from google.protobuf.message import Message

from meterline.component import Context, ExportBatch, Exporter, Factory, PermanentError
from meterline.delivery import ExporterConfig, refuse_projection, requests_within
from meterline.event import Event
from meterline.exporters.otlp.encode import (
    DEFAULT_RESOURCE,
    to_logs_request,
    to_metrics_request,
    to_traces_request,
)
from meterline.exporters.otlp.transport import (
    GrpcTransport,
    HttpTransport,
    SignalUnsupported,
    Transport,
    split_endpoint,
)
from meterline.tls import TlsConfig
from meterline.units import Duration

_DEFAULT_ENDPOINTS = {"grpc": "http://127.0.0.1:4317", "http": "http://127.0.0.1:4318"}
_ENCODERS: dict[str, Callable[..., Message]] = {
    "traces": to_traces_request, "logs": to_logs_request, "metrics": to_metrics_request}
_REJECTED_FIELDS = {"traces": "rejected_spans", "logs": "rejected_log_records",
                    "metrics": "rejected_data_points"}


class OtlpTlsConfig(TlsConfig):
    """The client TLS every component takes (`meterline.tls`), and whether an endpoint
    written without a scheme is plaintext."""

    insecure: bool = False  # plaintext when the endpoint has no http:// or https:// scheme


class OtlpExporterConfig(ExporterConfig):
    endpoint: str | None = None  # default http://127.0.0.1:4317 (grpc) or :4318 (http)
    protocol: Literal["grpc", "http"] = "grpc"  # http: OTLP/HTTP protobuf
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # sent with every request
    tls: OtlpTlsConfig = msgspec.field(default_factory=OtlpTlsConfig)
    compression: Literal["gzip", "none"] = "gzip"  # of request bodies
    timeout: Duration = Duration(10)  # per request
    # the largest request sent, before compression: servers refuse bigger ones (4 MiB is
    # gRPC's default), so a batch of long prompts is sent in parts that fit
    max_request_mb: float = 4
    traces: bool = True  # one CLIENT span per event
    logs: bool = False  # one log record per event (gen_ai.client.inference.operation.details)
    metrics: bool = False  # the GenAI client histograms, delta temporality
    # resource attributes of everything sent (service.name...)
    resource: dict[str, str | int | float | bool] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_RESOURCE))

    def __post_init__(self) -> None:
        refuse_projection(self, "otlp", "sends OTLP spans, logs and metrics, whose shape "
                                        "the protocol fixes")
        if not (self.traces or self.logs or self.metrics):
            raise ValueError("enable at least one of traces, logs, metrics")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_request_mb <= 0:
            raise ValueError("max_request_mb must be positive")
        if self.protocol == "grpc" and (self.tls.key_password or self.tls.insecure_skip_verify):
            raise ValueError("tls.key_password and tls.insecure_skip_verify apply to protocol: "
                             "http only (gRPC reads an unencrypted key_file and always "
                             "verifies the server)")

    @property
    def signals(self) -> list[str]:
        return [s for s in ("traces", "logs", "metrics") if getattr(self, s)]


class OtlpExporter(Exporter):
    def __init__(self, config: OtlpExporterConfig, context: Context) -> None:
        self.config = config
        self.log = context.log
        self.id = context.id
        self._rejected = context.meter.create_counter(
            "meterline_exporter_otlp_rejected_items",
            description="Spans, log records or data points an OTLP server rejected "
                        "(partial success)")
        self._unsupported = context.meter.create_counter(
            "meterline_exporter_otlp_unsupported_events",
            description="Events whose signal the OTLP backend has no service for "
                        "(UNIMPLEMENTED, HTTP 404), by signal")
        self._transport: Transport | None = None
        self._done: tuple[str, set[str], dict[str, Event]] = ("", set(), {})  # see export
        self._said_unsupported: set[str] = set()  # signals logged as unsupported

    async def start(self) -> None:
        c = self.config
        endpoint, tls = split_endpoint(c.endpoint or _DEFAULT_ENDPOINTS[c.protocol],
                                       c.tls.insecure)
        transport = GrpcTransport if c.protocol == "grpc" else HttpTransport
        self._transport = transport(endpoint, c.tls if tls else None, c.headers,
                                    float(c.timeout), c.compression == "gzip")
        self.log.info("otlp exporter ready", endpoint=endpoint, protocol=c.protocol, tls=tls,
                      signals=c.signals)

    async def shutdown(self) -> None:
        if self._transport is not None:
            await self._transport.close()

    async def export(self, batch: ExportBatch) -> None:
        assert self._transport is not None
        if self._done[0] != batch.id:
            self._done = (batch.id, set(), {})
        # signals, and parts of a signal, of this batch sent already; its events too big
        _, done, too_big = self._done
        for signal in self.config.signals:
            if signal in done:
                continue
            parts, alone = self._parts(signal, batch.events)
            too_big.update((e.event_id, e) for e in alone)
            for index, (request, events) in enumerate(parts):
                if f"{signal}/{index}" in done:
                    continue
                try:
                    response = await self._transport.send(signal, request)
                except SignalUnsupported as e:
                    self._signal_unsupported(signal, len(batch.events), e)
                    break
                done.add(f"{signal}/{index}")
                self._partial_success(signal, response, events)
            done.add(signal)
        if too_big:
            raise PermanentError(
                f"{len(too_big)} event(s) of {len(batch.events)} make an OTLP request over "
                f"max_request_mb ({self.config.max_request_mb:g}) even alone; the others "
                f"were sent", events=list(too_big.values()))

    def _parts(self, signal: str, events: list[Event]
               ) -> tuple[list[tuple[bytes, list[Event]]], list[Event]]:
        """The requests, serialized, that send `events`' `signal` within `max_request_mb`,
        and the events too big even alone. Metrics are one request (none without points):
        their points are sums over the batch, and hold no prompts."""
        resource = self.config.resource
        if signal == "metrics":
            request = _ENCODERS[signal](events, resource)
            return ([(request.SerializeToString(), events)] if _has_points(request) else []), []
        return requests_within(
            events, lambda group: _ENCODERS[signal](group, resource).SerializeToString(), len,
            self.config.max_request_mb * (1 << 20))

    def _signal_unsupported(self, signal: str, events: int, error: SignalUnsupported) -> None:
        self._unsupported.add(events, {"exporter": self.id, "signal": signal})
        if signal not in self._said_unsupported:
            self._said_unsupported.add(signal)
            self.log.warning(f"the otlp backend takes no {signal}; they are not sent "
                             f"(set {signal}: false)", error=str(error))

    def _partial_success(self, signal: str, response: Any, events: list[Event]) -> None:
        partial = response.partial_success
        rejected = getattr(partial, _REJECTED_FIELDS[signal])
        if rejected:
            self._rejected.add(rejected, {"exporter": self.id, "signal": signal})
        if rejected or partial.error_message:
            self.log.warning("otlp server rejected part of a batch", signal=signal,
                             rejected=rejected, of=len(events), message=partial.error_message)


def _has_points(request: Any) -> bool:
    return any(scope.metrics for rm in request.resource_metrics for scope in rm.scope_metrics)


factory = Factory(kind="exporter", type="otlp", config=OtlpExporterConfig, create=OtlpExporter)
