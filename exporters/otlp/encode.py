"""Events as OTLP messages: spans, log records and GenAI metrics.

The `otlp` exporter sends these; other exporters that write OTLP (Kafka's
`otlp_proto` and `otlp_json` encodings) use the same functions:

    to_traces_request(events)   -> ExportTraceServiceRequest   one CLIENT span per event
    to_logs_request(events)     -> ExportLogsServiceRequest    one log record per event
    to_metrics_request(events)  -> ExportMetricsServiceRequest the GenAI histograms (delta)
    to_json(message)            -> bytes, the OTLP/JSON form of any of them
    add_span(spans, event), add_log_record(records, event): one event into a repeated
        field of a message being built (one Kafka message per event, say)

The `to_*_request` functions take an optional `resource` (attributes of the OTLP
resource; `service.name: meterline` by default). A span and a log record carry the same
attributes: the GenAI names where the conventions have one (`gen_ai.*`,
`error.type`, `http.response.status_code`), `meterline.<field>` for the event's
other fields (`meterline.cost_usd`, `meterline.api_key_id`...),
`meterline.metadata.<key>` for its metadata, and the source's own `attributes`
under their own names. So the `otlp` receiver turns either back into the same
event. Attribute keys are unique in OTLP, and a reader of a repeated one takes one of
its values (the `otlp` receiver the last): so an `attributes` entry under a name the
event's own fields were written under (`gen_ai.usage.input_tokens`,
`meterline.cost_usd`, `meterline.metadata.team`...) is left out, as is a `params`
entry named for a field (`model`, `stream`), else a sender's value would stand for the
measured usage, the computed cost or the API key's labels. Messages
(`gen_ai.input.messages` / `gen_ai.output.messages`) are JSON strings in the
conventions' `{role, parts: [{type, content}]}` form.

A span lasts the event's `duration_ms`; that of an event without one ends where it
starts and carries `meterline.duration_unknown: true`, so that neither a trace backend's
reader nor the `otlp` receiver takes it for a call of 0 ms.

A span's ids are the event's (`trace_id` and `parent_span_id` come from the
client's `traceparent`, so the span joins the application's trace); an event
without them gets ids derived from its `event_id`, so a resent batch produces the
same spans.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

import msgspec
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
)
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_ERROR,
    SEVERITY_NUMBER_INFO,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_DELTA,
    Histogram,
    HistogramDataPoint,
    Metric,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meterline import __version__
from meterline.event import FIELDS, Event
from meterline.genai import (
    ATTRIBUTES,
    DURATION_BUCKETS,
    DURATION_UNKNOWN,
    INFERENCE_EVENT,
    MESSAGE_FIELDS,
    PARAM_ATTRIBUTES,
    TIME_PER_TOKEN_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    failure,
)
from meterline.otlpjson import to_json

__all__ = ["add_attributes", "add_log_record", "add_span", "any_value", "to_json",
           "to_logs_request", "to_metrics_request", "to_traces_request"]

DEFAULT_RESOURCE: Final = {"service.name": "meterline"}
_SCOPE: Final = InstrumentationScope(name="meterline", version=__version__)
# Fields carried by the span or log record itself, or as maps, not as scalar attributes.
_STRUCTURAL: Final = frozenset({"timestamp", "trace_id", "span_id", "parent_span_id", "params",
                                "metadata", "redactions", "attributes", "sample_weight"})
_MAPS: Final = (("metadata", "meterline.metadata."), ("redactions", "meterline.redactions."))
_GENAI: Final = tuple((f, a) for f, a in ATTRIBUTES.items() if f not in MESSAGE_FIELDS)
_OWN: Final = tuple((f, f"meterline.{f}") for f in sorted(FIELDS - _STRUCTURAL - set(ATTRIBUTES)))
_PARENT: Final = "meterline.parent_span_id"
# The names an event's own fields are written under (and the prefixes of its maps'): an
# attribute under one that the event wrote already is left out (see the module's doc).
_RESERVED: Final = frozenset({*ATTRIBUTES.values(), *(name for _, name in _OWN),
                              "meterline.sample_weight", DURATION_UNKNOWN, _PARENT})
_RESERVED_PREFIXES: Final = ("gen_ai.request.", *(prefix for _, prefix in _MAPS))
_json = msgspec.json.Encoder()


# --- attributes ----------------------------------------------------------------------
def add_attributes(attrs: Any, event: Event) -> None:
    """Append the attributes of an event's span (or log record) to `attrs`, a repeated
    `KeyValue` field. Built in place: creating messages and copying them in costs twice."""
    add = attrs.add
    for field, name in _GENAI:
        value = getattr(event, field)
        if value is not None:
            set_value(add(key=name).value, value)
    for key, value in (event.params or {}).items():
        name = f"gen_ai.request.{PARAM_ATTRIBUTES.get(key, key)}"
        if name not in _RESERVED:  # `model`, `stream`: fields of the event's own
            set_value(add(key=name).value, value)
    for field in MESSAGE_FIELDS:
        messages = getattr(event, field)
        if messages is not None:
            add(key=ATTRIBUTES[field]).value.string_value = _json.encode(
                [_with_parts(m) for m in messages]).decode()
    for field, name in _OWN:
        value = getattr(event, field)
        if value is not None:
            set_value(add(key=name).value, value)
    if event.sample_weight != 1.0:
        add(key="meterline.sample_weight").value.double_value = event.sample_weight
    for field, prefix in _MAPS:
        for key, value in (getattr(event, field) or {}).items():
            set_value(add(key=prefix + key).value, value)
    written: set[str] | None = None  # taken only when a name may repeat one (rare)
    for key, value in (event.attributes or {}).items():
        if key in _RESERVED or key.startswith(_RESERVED_PREFIXES):
            if written is None:
                written = {kv.key for kv in attrs}
            if key in written:
                continue
        set_value(add(key=key).value, value)


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


def set_value(target: AnyValue, value: Any) -> None:
    """Set an OTLP `AnyValue` to a Python value (lists and dicts nest); None leaves it empty."""
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, list | tuple):
        target.array_value.SetInParent()
        items = target.array_value.values
        for item in value:
            set_value(items.add(), item)
    elif isinstance(value, dict):
        target.kvlist_value.SetInParent()
        pairs = target.kvlist_value.values
        for key, item in value.items():
            set_value(pairs.add(key=str(key)).value, item)
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, msgspec.Struct):  # a guardrail outcome: a map of its fields
        set_value(target, msgspec.to_builtins(value))
    elif value is not None:
        target.string_value = str(value)


def any_value(value: Any) -> AnyValue:
    out = AnyValue()
    set_value(out, value)
    return out


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
    """An ERROR span, an ERROR log record. A call the client cancelled (499) is not one:
    its caller ended it, the operation did not fail (status left unset)."""
    return failure(event.error_type, event.status_code) is not None


def _set_resource(target: Resource, attributes: Mapping[str, Any] | None) -> None:
    for key, value in (attributes or DEFAULT_RESOURCE).items():
        set_value(target.attributes.add(key=key).value, value)


# --- traces --------------------------------------------------------------------------
def add_span(spans: Any, event: Event) -> None:
    """Append the span of one event to `spans`, a repeated `Span` field."""
    trace_id, span_id, parent = _ids(event)
    span = spans.add(
        trace_id=trace_id, span_id=span_id, parent_span_id=parent,
        name=" ".join(p for p in (event.operation, event.request_model) if p) or "llm call",
        kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=event.timestamp,
        end_time_unix_nano=event.timestamp + round((event.duration_ms or 0) * 1e6))
    if _failed(event):
        span.status.code = Status.STATUS_CODE_ERROR
        span.status.message = event.error_message or ""
    if event.duration_ms is None:  # else the receiver would read a call of 0 ms
        span.attributes.add(key=DURATION_UNKNOWN).value.bool_value = True
    add_attributes(span.attributes, event)


def to_traces_request(events: Iterable[Event], resource: Mapping[str, Any] | None = None
                      ) -> ExportTraceServiceRequest:
    """One CLIENT span per event, named `{operation} {request_model}`."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    _set_resource(resource_spans.resource, resource)
    scope_spans = resource_spans.scope_spans.add(scope=_SCOPE)
    for event in events:
        add_span(scope_spans.spans, event)
    return request


# --- logs ----------------------------------------------------------------------------
def add_log_record(records: Any, event: Event) -> None:
    """Append the log record of one event to `records`, a repeated `LogRecord` field. A
    log record has no parent span id field: `meterline.parent_span_id` carries it."""
    trace_id, span_id, parent = _ids(event)
    failed = _failed(event)
    record = records.add(
        time_unix_nano=event.timestamp, event_name=INFERENCE_EVENT,
        severity_number=SEVERITY_NUMBER_ERROR if failed else SEVERITY_NUMBER_INFO,
        severity_text="ERROR" if failed else "INFO", trace_id=trace_id, span_id=span_id)
    if parent:
        record.attributes.add(key=_PARENT).value.string_value = parent.hex()
    add_attributes(record.attributes, event)


def to_logs_request(events: Iterable[Event], resource: Mapping[str, Any] | None = None
                    ) -> ExportLogsServiceRequest:
    """One log record per event: the GenAI `gen_ai.client.inference.operation.details`
    event, with the span's attributes and ids."""
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    _set_resource(resource_logs.resource, resource)
    scope_logs = resource_logs.scope_logs.add(scope=_SCOPE)
    for event in events:
        add_log_record(scope_logs.log_records, event)
    return request


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
            point = HistogramDataPoint(
                start_time_unix_nano=start, time_unix_nano=end, count=sum(counts), sum=total,
                bucket_counts=counts, explicit_bounds=self.bounds, min=low, max=high)
            names = [ATTRIBUTES[f] for f in _METRIC_ATTRIBUTES] + ["gen_ai.token.type"]
            for name, value in zip(names, key, strict=True):
                if value is not None:
                    point.attributes.add(key=name).value.string_value = value
            points.append(point)
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
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    _set_resource(resource_metrics.resource, resource)
    resource_metrics.scope_metrics.add(scope=_SCOPE, metrics=metrics)
    return request
