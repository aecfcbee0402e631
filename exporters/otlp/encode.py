"""Events as OTLP messages: spans, log records and GenAI metrics.

The `otlp` exporter sends these; other exporters that write OTLP (Kafka's
`otlp_proto` and `otlp_json` encodings) use the same functions:

    to_traces_request(events)   -> ExportTraceServiceRequest   one CLIENT span per event
    to_logs_request(events)     -> ExportLogsServiceRequest    one log record per event
    to_metrics_request(events)  -> ExportMetricsServiceRequest the GenAI histograms (delta)
    to_json(message)            -> bytes, the OTLP/JSON form of any of them

Every function takes an optional `resource` (attributes of the OTLP resource;
`service.name: meterline` by default). A span and a log record carry the same
attributes: the GenAI names where the conventions have one (`gen_ai.*`,
`error.type`, `http.response.status_code`), `meterline.<field>` for the event's
other fields (`meterline.cost_usd`, `meterline.api_key_id`...),
`meterline.metadata.<key>` for its metadata, and the source's own `attributes`
under their own names. So the `otlp` receiver turns either back into the same
event. Messages (`gen_ai.input.messages` / `gen_ai.output.messages`) are JSON
strings in the conventions' `{role, parts: [{type, content}]}` form.

A span's ids are the event's (`trace_id` and `parent_span_id` come from the
client's `traceparent`, so the span joins the application's trace); an event
without them gets ids derived from its `event_id`, so a resent batch produces the
same spans.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_ERROR,
    SEVERITY_NUMBER_INFO,
    LogRecord,
    ResourceLogs,
    ScopeLogs,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_DELTA,
    Histogram,
    HistogramDataPoint,
    Metric,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from meterline import __version__
from meterline.event import FIELDS, Event
from meterline.genai import (
    ATTRIBUTES,
    DURATION_BUCKETS,
    INFERENCE_EVENT,
    MESSAGE_FIELDS,
    PARAM_ATTRIBUTES,
    TIME_PER_TOKEN_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
)

__all__ = ["event_attributes", "to_json", "to_logs_request", "to_metrics_request",
           "to_traces_request"]

DEFAULT_RESOURCE: Final = {"service.name": "meterline"}
_SCOPE: Final = InstrumentationScope(name="meterline", version=__version__)
# Fields carried by the span or log record itself, or as maps, not as scalar attributes.
_STRUCTURAL: Final = frozenset({"timestamp", "trace_id", "span_id", "parent_span_id", "params",
                                "metadata", "redactions", "attributes", "sample_weight"})
_MAPS: Final = (("metadata", "meterline.metadata."), ("redactions", "meterline.redactions."))
_GENAI: Final = tuple((f, a) for f, a in ATTRIBUTES.items() if f not in MESSAGE_FIELDS)
_OWN: Final = tuple((f, f"meterline.{f}") for f in sorted(FIELDS - _STRUCTURAL - set(ATTRIBUTES)))
_json = msgspec.json.Encoder()


# --- attributes ----------------------------------------------------------------------
def event_attributes(event: Event) -> list[KeyValue]:
    """The attributes of the span (and log record) of one event."""
    attrs = [_kv(name, value) for field, name in _GENAI
             if (value := getattr(event, field)) is not None]
    for key, value in (event.params or {}).items():
        attrs.append(_kv(f"gen_ai.request.{PARAM_ATTRIBUTES.get(key, key)}", value))
    for field in MESSAGE_FIELDS:
        messages = getattr(event, field)
        if messages is not None:
            attrs.append(_kv(ATTRIBUTES[field], _json.encode(
                [_with_parts(m) for m in messages]).decode()))
    attrs += [_kv(name, value) for field, name in _OWN
              if (value := getattr(event, field)) is not None]
    if event.sample_weight != 1.0:
        attrs.append(_kv("meterline.sample_weight", event.sample_weight))
    for field, prefix in _MAPS:
        attrs += [_kv(prefix + k, v) for k, v in (getattr(event, field) or {}).items()]
    attrs += [_kv(k, v) for k, v in (event.attributes or {}).items()]
    return attrs


def _with_parts(message: dict[str, Any]) -> dict[str, Any]:
    """`{role, content}` to the conventions' `{role, parts}` form; other keys kept."""
    out = {k: v for k, v in message.items() if k != "content"}
    content = message.get("content")
    if content is None:
        out["parts"] = []
    elif isinstance(content, list):
        out["parts"] = [_part(p) for p in content]
    else:
        out["parts"] = [_part(content)]
    return out


def _part(part: Any) -> Any:
    if isinstance(part, dict):
        if part.get("type") == "text" and "text" in part:  # OpenAI's content part
            return {"type": "text", "content": part["text"]}
        return part
    return {"type": "text", "content": part if isinstance(part, str) else str(part)}


def _kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=any_value(value))


def any_value(value: Any) -> AnyValue:
    """A Python value as an OTLP `AnyValue` (lists and dicts nest)."""
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(
            values=[_kv(str(k), v) for k, v in value.items()]))
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    return AnyValue() if value is None else AnyValue(string_value=str(value))


# --- ids -----------------------------------------------------------------------------
def _ids(event: Event) -> tuple[bytes, bytes, bytes]:
    """(trace id, span id, parent span id); missing or malformed ids derived from event_id."""
    trace_id = _id_bytes(event.trace_id, 16)
    span_id = _id_bytes(event.span_id, 8)
    if trace_id is None or span_id is None:
        digest = hashlib.blake2b(event.event_id.encode(), digest_size=24).digest()
        trace_id = trace_id or digest[:16]
        span_id = span_id or digest[16:]
    return trace_id, span_id, _id_bytes(event.parent_span_id, 8) or b""


def _id_bytes(value: str | None, size: int) -> bytes | None:
    if value is None or len(value) != 2 * size:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if any(raw) else None


def _failed(event: Event) -> bool:
    return event.error_type is not None or (event.status_code or 0) >= 400


def _resource(attributes: Mapping[str, Any] | None) -> Resource:
    return Resource(attributes=[_kv(k, v) for k, v in (attributes or DEFAULT_RESOURCE).items()])


# --- traces --------------------------------------------------------------------------
def to_span(event: Event) -> Span:
    trace_id, span_id, parent = _ids(event)
    name = " ".join(p for p in (event.operation, event.request_model) if p) or "llm call"
    status = (Status(code=Status.STATUS_CODE_ERROR, message=event.error_message or "")
              if _failed(event) else Status())
    return Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name,
                kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=event.timestamp,
                end_time_unix_nano=event.timestamp + round((event.duration_ms or 0) * 1e6),
                attributes=event_attributes(event), status=status)


def to_traces_request(events: Iterable[Event], resource: Mapping[str, Any] | None = None
                      ) -> ExportTraceServiceRequest:
    """One CLIENT span per event, named `{operation} {request_model}`."""
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=_resource(resource),
        scope_spans=[ScopeSpans(scope=_SCOPE, spans=[to_span(e) for e in events])])])


# --- logs ----------------------------------------------------------------------------
def to_log_record(event: Event) -> LogRecord:
    """A log record has no parent span id field: `meterline.parent_span_id` carries it."""
    trace_id, span_id, parent = _ids(event)
    failed = _failed(event)
    attrs = event_attributes(event)
    if parent:
        attrs.append(_kv("meterline.parent_span_id", parent.hex()))
    return LogRecord(time_unix_nano=event.timestamp, event_name=INFERENCE_EVENT,
                     severity_number=SEVERITY_NUMBER_ERROR if failed else SEVERITY_NUMBER_INFO,
                     severity_text="ERROR" if failed else "INFO",
                     attributes=attrs, trace_id=trace_id, span_id=span_id)


def to_logs_request(events: Iterable[Event], resource: Mapping[str, Any] | None = None
                    ) -> ExportLogsServiceRequest:
    """One log record per event: the GenAI `gen_ai.client.inference.operation.details`
    event, with the span's attributes and ids."""
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=_resource(resource),
        scope_logs=[ScopeLogs(scope=_SCOPE, log_records=[to_log_record(e) for e in events])])])


# --- metrics -------------------------------------------------------------------------
_METRIC_ATTRIBUTES: Final = ("operation", "provider", "request_model", "response_model",
                             "error_type")


class _Points:
    """Weighted observations of one histogram, by attribute set, for one batch."""

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...]):
        self.name, self.unit, self.description, self.bounds = name, unit, description, bounds
        self.points: dict[tuple[Any, ...], list[Any]] = {}

    def observe(self, key: tuple[Any, ...], value: float, weight: float) -> None:
        point = self.points.get(key)
        if point is None:  # buckets, sum, min, max
            point = self.points[key] = [[0.0] * (len(self.bounds) + 1), 0.0, value, value]
        point[0][bisect.bisect_left(self.bounds, value)] += weight
        point[1] += value * weight
        point[2] = min(point[2], value)
        point[3] = max(point[3], value)

    def metric(self, start: int, end: int) -> Metric:
        points = []
        for key, (buckets, total, low, high) in self.points.items():
            counts = [round(c) for c in buckets]
            attrs = [_kv(ATTRIBUTES[f], v) for f, v in zip(_METRIC_ATTRIBUTES, key[:-1],
                                                           strict=True) if v is not None]
            if key[-1] is not None:
                attrs.append(_kv("gen_ai.token.type", key[-1]))
            points.append(HistogramDataPoint(
                attributes=attrs, start_time_unix_nano=start, time_unix_nano=end,
                count=sum(counts), sum=total, bucket_counts=counts, explicit_bounds=self.bounds,
                min=low, max=high))
        return Metric(name=self.name, unit=self.unit, description=self.description,
                      histogram=Histogram(data_points=points,
                                          aggregation_temporality=AGGREGATION_TEMPORALITY_DELTA))


def to_metrics_request(events: list[Event], resource: Mapping[str, Any] | None = None
                       ) -> ExportMetricsServiceRequest:
    """The GenAI client histograms of a batch, as delta points spanning its events.

    Each event counts `sample_weight` times (bucket counts are rounded), so the
    figures of a sampled pipeline estimate the whole traffic.
    """
    duration = _Points("gen_ai.client.operation.duration", "s",
                       "GenAI operation duration", DURATION_BUCKETS)
    tokens = _Points("gen_ai.client.token.usage", "{token}",
                     "Input and output tokens used", TOKEN_BUCKETS)
    ttft = _Points("gen_ai.server.time_to_first_token", "s",
                   "Time to generate the first token", TTFT_BUCKETS)
    per_token = _Points("gen_ai.server.time_per_output_token", "s",
                        "Time per output token after the first", TIME_PER_TOKEN_BUCKETS)
    for e in events:
        attrs = tuple(getattr(e, f) for f in _METRIC_ATTRIBUTES)
        w = e.sample_weight
        if e.duration_ms is not None:
            duration.observe((*attrs, None), e.duration_ms / 1000, w)
        if e.input_tokens is not None:
            tokens.observe((*attrs, "input"), e.input_tokens, w)
        if e.output_tokens is not None:
            tokens.observe((*attrs, "output"), e.output_tokens, w)
        if e.ttft_ms is not None:
            ttft.observe((*attrs, None), e.ttft_ms / 1000, w)
        if e.itl_ms is not None:
            per_token.observe((*attrs, None), e.itl_ms / 1000, w)
    start = min((e.timestamp for e in events), default=0)
    end = max((e.timestamp + round((e.duration_ms or 0) * 1e6) for e in events), default=0)
    metrics = [h.metric(start, end) for h in (duration, tokens, ttft, per_token) if h.points]
    return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
        resource=_resource(resource), scope_metrics=[ScopeMetrics(scope=_SCOPE, metrics=metrics)])])


# --- OTLP/JSON -----------------------------------------------------------------------
_ID_KEYS: Final = frozenset({"traceId", "spanId", "parentSpanId"})


def to_json(message: Message) -> bytes:
    """The OTLP/JSON form: protobuf's JSON mapping, but ids in hex and enums as numbers."""
    data = MessageToDict(message, use_integers_for_enums=True)
    return _json.encode(_hex_ids(data))


def _hex_ids(node: Any) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)
    return node
