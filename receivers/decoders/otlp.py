"""OTLP spans and log records that describe an LLM call, an agent, a tool or an MCP
request, to events.

A span (or log record) is an LLM call when it carries a model, usage or a GenAI
operation (`gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.*`,
`gen_ai.operation.name`, OpenLLMetry's `llm.request.type`). It is an agent or
tool span when its `gen_ai.operation.name` is `invoke_agent`, `create_agent` or
`execute_tool`, and an MCP span when it carries `mcp.method.name` (the
OpenTelemetry MCP conventions): these are events too, with `agent_name`,
`agent_id`, `tool_name`, `tool_call_id`, `mcp_method` and `mcp_session_id`, and
the sizes of a tool call's arguments and result (`request_bytes`,
`response_bytes`; the content itself is not kept). An MCP span's operation is
`genai.mcp_operation` of its method (`execute_tool` for `tools/call`), and its
JSON-RPC error code gives its error category (`genai.jsonrpc_error_type`; the
code itself stays in `attributes`). Other spans (HTTP handlers, database calls) are
skipped, and counted by the receiver. The current GenAI names are read, and
the older ones too: `gen_ai.system` for the provider,
`gen_ai.usage.prompt_tokens` / `completion_tokens`, OpenLLMetry's indexed
`gen_ai.prompt.N.*` / `gen_ai.completion.N.*` messages.

What the `otlp` exporter writes (see `exporters/otlp/encode.py`) comes back as
the same event: `meterline.<field>` attributes fill the event's fields, and a
span carrying `meterline.event_id` keeps that id. Other spans get the id
`<trace id>-<span id>`, so a resent span is recognisably the same call (a
span and its `gen_ai.client.inference.operation.details` log record share it
too). Attributes with no field are kept in `attributes`, with the resource's
`service.name` (the calling application).

A call whose attributes are malformed (a token count that is not a
non-negative integer, an agent name that is not a string, say) or out of the
bounds of `meterline.bounds` (a token count beyond 10^9, a control character
in a user id...) is rejected with the reason, so that the sender's
partial-success answer says what was wrong.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import msgspec
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from meterline import bounds, otlpjson
from meterline.component import Decoded
from meterline.event import FIELDS, Event, from_dict, uuid7
from meterline.genai import (
    ATTRIBUTES,
    DURATION_UNKNOWN,
    ERROR_TYPES,
    INFERENCE_EVENT,
    MESSAGE_FIELDS,
    NON_MODEL_OPERATIONS,
    PARAM_ATTRIBUTES,
    error_type_for_name,
    error_type_for_status,
    jsonrpc_error_type,
    mcp_operation,
    provider_name,
)
from meterline.lenient import as_metadata
from meterline.receivers.decoders.errors import DecodeError, TooManyItems
from meterline.receivers.decoders.otlp_wire import parse_request, too_many_items

__all__ = ["OtlpDecoded", "decode_logs", "decode_spans", "parse_json", "value_of"]

# Older names, and a provider's own, read when the current one is absent.
_LEGACY: Final = {
    "openai.response.service_tier": "service_tier",
    "gen_ai.system": "provider",
    "gen_ai.usage.prompt_tokens": "input_tokens",
    "gen_ai.usage.completion_tokens": "output_tokens",
    "gen_ai.usage.cache_read_input_tokens": "cache_read_tokens",  # OpenLLMetry
    "gen_ai.usage.cache_creation_input_tokens": "cache_creation_tokens",
    "llm.request.type": "operation",
    "llm.is_streaming": "streaming",
}
_CURRENT: Final = {name: f for f, name in ATTRIBUTES.items()}
_MARKERS: Final = frozenset({
    "gen_ai.operation.name", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens", "llm.request.type"})
_OPERATIONS: Final = {"completion": "text_completion", "embedding": "embeddings"}
# Agent runs: their usage is their model calls' (see `_keep_run_usage_aside`).
_AGENT_RUNS: Final = frozenset({"invoke_agent", "create_agent"})
_USAGE_FIELDS: Final = frozenset({"input_tokens", "output_tokens", "cache_read_tokens",
                                  "cache_creation_tokens", "reasoning_tokens"})
_RUN_COSTS: Final = frozenset({"cost_usd", "cost_input_usd", "cost_output_usd",
                               "actual_cost_usd"})
# A tool call's arguments and result: only their sizes are kept.
_SIZE_ATTRIBUTES: Final = {"gen_ai.tool.call.arguments": "request_bytes",
                           "gen_ai.tool.call.result": "response_bytes"}
_NAMES: Final = {**ATTRIBUTES, **{f: a for a, f in _SIZE_ATTRIBUTES.items()}}
_JSONRPC_CODE: Final = re.compile(r"-?[0-9]{1,9}")
_PARAMS: Final = {attr: key for key, attr in PARAM_ATTRIBUTES.items()}
# `meterline.parent_span_id` is on log records, which have no field for it.
_OWN_FIELDS: Final = FIELDS - {"trace_id", "span_id", "timestamp", "metadata", "redactions",
                               "params", "attributes", *MESSAGE_FIELDS}
_INT_FIELDS: Final = frozenset({"input_tokens", "output_tokens", "cache_read_tokens",
                                "cache_creation_tokens", "cache_creation_1h_tokens",
                                "reasoning_tokens", "status_code",
                                "attempts", "ratelimit_requests_limit",
                                "ratelimit_requests_remaining", "ratelimit_tokens_limit",
                                "ratelimit_tokens_remaining"})
_STATUS: Final = re.compile(r"[0-9]{3}")  # an HTTP status as an error.type
_INDEXED: Final = re.compile(r"^gen_ai\.(prompt|completion)\.([0-9]{1,9})\.(\w+)$")


@dataclass
class OtlpDecoded:
    events: list[Event] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why each rejected call was
    skipped: int = 0  # spans or records that are not LLM calls


def decode_spans(request: ExportTraceServiceRequest) -> OtlpDecoded:
    return _decode(((rs.resource, [s for ss in rs.scope_spans for s in ss.spans])
                    for rs in request.resource_spans),
                   _span_event, lambda span: f"span {span.name!r}")


def decode_logs(request: ExportLogsServiceRequest) -> OtlpDecoded:
    return _decode(((rl.resource, [r for sl in rl.scope_logs for r in sl.log_records])
                    for rl in request.resource_logs),
                   _record_event, lambda r: f"log record {r.event_name or INFERENCE_EVENT!r}")


def _decode(resources: Iterable[tuple[Any, list[Any]]],
            to_event: Callable[[Any, dict[str, Any], str | None], Event],
            describe: Callable[[Any], str]) -> OtlpDecoded:
    """The LLM calls, agent, tool and MCP spans among spans or log records, grouped by
    their resource."""
    out = OtlpDecoded()
    decoded = []  # the item each event came from
    for resource, items in resources:
        service = _service_name(resource.attributes)
        for item in items:
            attrs = _attributes(item.attributes)
            if not _is_model_call(attrs):
                out.skipped += 1
                continue
            try:
                out.events.append(to_event(item, attrs, service))
                decoded.append(item)
            except DecodeError as e:
                out.rejected.append(f"{describe(item)}: {e}")
    if bad := bounds.refused(out.events):
        out.events = [e for n, e in enumerate(out.events) if n not in bad]
        out.rejected += [f"{describe(decoded[n])}: {_out_of_bounds(reason)}"
                         for n, reason in bad.items()]
    return out


# --- one call ------------------------------------------------------------------------
def _is_model_call(attrs: dict[str, Any]) -> bool:
    """Whether a span or record becomes an event: an LLM call, an agent or tool span
    (`invoke_agent`, `create_agent`, `execute_tool`), an MCP request."""
    if "mcp.method.name" in attrs:
        return True
    operation = attrs.get("gen_ai.operation.name")
    if isinstance(operation, str) and operation in NON_MODEL_OPERATIONS:
        return True
    return not _MARKERS.isdisjoint(attrs)


def _span_event(span: Any, attrs: dict[str, Any], service: str | None) -> Event:
    if not span.start_time_unix_nano:
        raise DecodeError("no start time")
    timed = attrs.pop(DURATION_UNKNOWN, None) is not True
    fields = _fields(attrs, service)
    trace_id, span_id = span.trace_id.hex() or None, span.span_id.hex() or None
    fields.update(trace_id=trace_id, span_id=span_id,
                  parent_span_id=span.parent_span_id.hex() or None,
                  timestamp=span.start_time_unix_nano)
    if "duration_ms" not in fields and timed and \
            span.end_time_unix_nano >= span.start_time_unix_nano:
        fields["duration_ms"] = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
    if span.status.code == Status.STATUS_CODE_ERROR:
        fields.setdefault("error_type", error_type_for_status(fields.get("status_code"))
                          or "unknown")
        if span.status.message:
            fields.setdefault("error_message", span.status.message)
    fields.setdefault("event_id", f"{trace_id}-{span_id}" if trace_id and span_id else uuid7())
    return _event(fields)


def _record_event(record: Any, attrs: dict[str, Any], service: str | None) -> Event:
    stamp = record.time_unix_nano or record.observed_time_unix_nano
    if not stamp:
        raise DecodeError("no time")
    fields = _fields(attrs, service)
    trace_id, span_id = record.trace_id.hex() or None, record.span_id.hex() or None
    fields.update(trace_id=trace_id, span_id=span_id, timestamp=stamp)
    if "event_id" not in fields:
        fields["event_id"] = (f"{trace_id}-{span_id}" if trace_id and span_id else hashlib.blake2b(
            record.SerializeToString(), digest_size=16).hexdigest())
    return _event(fields)


def _fields(attrs: dict[str, Any], service: str | None) -> dict[str, Any]:
    """Event fields from a call's attributes; what has no field goes to `attributes`."""
    fields: dict[str, Any] = {}
    params: dict[str, Any] = {}
    maps: dict[str, dict[str, Any]] = {"metadata": {}, "redactions": {}}
    indexed: dict[tuple[str, int], dict[str, Any]] = {}
    rest: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in _CURRENT:
            fields[_CURRENT[key]] = value
        elif key.startswith("meterline."):
            name = key[10:]
            prefix, _, sub = name.partition(".")
            if name in _OWN_FIELDS:
                fields[name] = value
            elif prefix in maps and sub:
                maps[prefix][sub] = value
            else:
                rest[key] = value
        elif key in _SIZE_ATTRIBUTES:
            if (size := _size(value)) is not None:
                fields[_SIZE_ATTRIBUTES[key]] = size
        elif key.startswith("gen_ai.request."):
            param = key[15:]
            params[_PARAMS.get(param, param)] = value
        elif (m := _INDEXED.match(key)) is not None:
            indexed.setdefault((m[1], int(m[2])), {})[m[3]] = value
        elif key not in _LEGACY:
            rest[key] = value
    for key, name in _LEGACY.items():
        if name not in fields and key in attrs:
            fields[name] = attrs[key]
    for name in MESSAGE_FIELDS:
        if name in fields:
            fields[name] = _messages(fields[name], ATTRIBUTES[name])
    if indexed:
        for kind, name in (("prompt", "input_messages"), ("completion", "output_messages")):
            found = [m for (k, _), m in sorted(indexed.items()) if k == kind]
            if found and name not in fields:
                fields[name] = found
    if "mcp.method.name" in attrs:
        _mcp(fields, attrs, rest)
    _normalise(fields)
    if fields.get("operation") in _AGENT_RUNS:
        _keep_run_usage_aside(fields, rest)
    if params:
        fields["params"] = params
    if metadata := as_metadata(maps["metadata"]):
        fields["metadata"] = metadata
    if maps["redactions"]:
        fields["redactions"] = maps["redactions"]
    if service and "event_id" not in fields:  # the calling application, unless it is ours
        rest.setdefault("service.name", service)
    if rest:
        fields["attributes"] = rest
    fields.setdefault("source", "otlp")
    return fields


def _keep_run_usage_aside(fields: dict[str, Any], rest: dict[str, Any]) -> None:
    """An agent run's usage is the sum of its model calls' usage, which are events of
    their own: counted on the run as well, every token (and its cost) would count twice.
    The run keeps its figures in `attributes`, under their attribute names."""
    for name in _USAGE_FIELDS & fields.keys():
        rest[ATTRIBUTES[name]] = fields.pop(name)
    for name in _RUN_COSTS & fields.keys():
        rest[f"meterline.{name}"] = fields.pop(name)


def _normalise(fields: dict[str, Any]) -> None:
    """Check and convert values to the event's vocabulary and types."""
    for name in _INT_FIELDS & fields.keys():
        value = fields[name]
        if isinstance(value, float) and value.is_integer():
            value = fields[name] = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DecodeError(f"{_attribute(name)} must be a non-negative integer, "
                              f"got {value!r}")
    if "provider" in fields:
        fields["provider"] = provider_name(str(fields["provider"]))
    if "operation" in fields:
        op = str(fields["operation"])
        fields["operation"] = _OPERATIONS.get(op, op)
    if isinstance(fields.get("finish_reasons"), str):
        fields["finish_reasons"] = [fields["finish_reasons"]]
    error = fields.get("error_type")
    if error is not None and not (isinstance(error, str) and error in ERROR_TYPES):
        text = str(error)
        fields["error_type"] = (error_type_for_status(int(text)) if _STATUS.fullmatch(text)
                                else error_type_for_name(text))
    elif error is None and fields.get("status_code", 0) >= 400:
        fields["error_type"] = error_type_for_status(fields["status_code"])


def _mcp(fields: dict[str, Any], attrs: dict[str, Any], rest: dict[str, Any]) -> None:
    """An MCP span's operation, from its method, and its error category: from its JSON-RPC
    error code (`error.type`, `rpc.response.status_code` or `rpc.jsonrpc.error_code`) when
    it has one (a code is an error whether or not `error.type` or the span's status says
    so), else its `error.type` (`tool_error`: a tool that answered an error). An
    `error.type` the category replaced stays in `attributes`."""
    method = fields["mcp_method"]
    if isinstance(method, str):
        fields["operation"] = mcp_operation(method)
    error = fields.get("error_type")
    for value in (error, attrs.get("rpc.response.status_code"),
                  attrs.get("rpc.jsonrpc.error_code")):
        text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) \
            else ""
        if _JSONRPC_CODE.fullmatch(text) and int(text) < 0:  # a code says the most
            fields["error_type"] = jsonrpc_error_type(int(text))
            break
    if error is not None and fields["error_type"] != error:
        rest["error.type"] = error


def _size(value: Any) -> int | None:
    """The size in bytes of a tool call's arguments or result: a string's UTF-8, bytes
    as they are, a structured value's JSON."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if value is None:
        return None
    try:
        return len(msgspec.json.encode(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _event(fields: dict[str, Any]) -> Event:
    try:
        return from_dict(fields)
    except msgspec.ValidationError as e:
        path = re.search(r"\$\.(\w+)", str(e))
        where = f" ({_attribute(path[1])})" if path else ""
        raise DecodeError(f"invalid value{where}: {e}") from None


def _out_of_bounds(reason: str) -> str:
    """A reason of `meterline.bounds`, naming the attribute the field came from."""
    path = re.search(r"\$\.(\w+)", reason)
    return f"out of bounds{f' ({_attribute(path[1])})' if path else ''}: {reason}"


def _attribute(name: str) -> str:
    return _NAMES.get(name, f"meterline.{name}")


def _messages(value: Any, attribute: str) -> list[dict[str, Any]]:
    """The conventions' `{role, parts}` messages (a JSON string, or structured) to
    `{role, content}`: a single text part becomes a string."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value)
        except msgspec.DecodeError as e:
            raise DecodeError(f"{attribute} is not JSON: {e}") from None
        except RecursionError:
            raise DecodeError(f"{attribute} is JSON nested too deeply") from None
    if not isinstance(value, list):
        raise DecodeError(f"{attribute} must be a list of messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise DecodeError(f"{attribute} must be a list of objects")
        out = {k: v for k, v in message.items() if k != "parts"}
        parts = message.get("parts")
        if isinstance(parts, list) and parts:
            out["content"] = _content(parts)
        messages.append(out)
    return messages


def _content(parts: list[Any]) -> Any:
    if len(parts) == 1 and _is_text(parts[0]):
        return parts[0]["content"]
    return [{"type": "text", "text": p["content"]} if _is_text(p) else p for p in parts]


def _is_text(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and "content" in part


# --- OTLP values ---------------------------------------------------------------------
def value_of(value: AnyValue) -> Any:
    """An OTLP `AnyValue` as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in pairs}


def _service_name(pairs: Iterable[KeyValue]) -> str | None:
    for kv in pairs:
        if kv.key == "service.name":
            return str(value_of(kv.value))
    return None


# --- OTLP/JSON -----------------------------------------------------------------------
M = TypeVar("M", bound=Message)


def parse_json(data: bytes, message_class: type[M]) -> M:
    """An OTLP/JSON body (ids in hex) as a protobuf message, its items counted before
    protobuf builds them (`TooManyItems` past `bounds.ITEMS_MAX`, as `parse_request`), and
    not parsed at all past `bounds.CONTAINERS_MAX` objects and arrays."""
    if why := bounds.too_many_containers(data):
        raise TooManyItems(f"{why} in one request (send smaller batches)")
    try:
        return otlpjson.parse_json(data, message_class,
                                   functools.partial(_check_items, message_class.DESCRIPTOR))
    except TooManyItems:
        raise
    except ValueError as e:
        raise DecodeError(str(e)) from None


def _check_items(request: Descriptor, parsed: dict[str, Any]) -> None:
    """The items of a parsed OTLP/JSON request (spans or log records: field 1 of the
    request, then field 2 of a resource, then of a scope, under either JSON name)."""
    parts: list[Any] = [parsed]
    descriptor, number = request, 1
    for _ in range(3):
        field = descriptor.fields_by_number[number]
        parts = [item for part in parts if isinstance(part, dict)
                 for item in _as_list(part.get(field.json_name, part.get(field.name)))]
        descriptor, number = field.message_type, 2
    if len(parts) > bounds.ITEMS_MAX:
        raise too_many_items()


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --- a request's body ------------------------------------------------------------------
_SIGNALS: Final[dict[str, tuple[type[Message], Callable[[Any], OtlpDecoded]]]] = {
    "traces": (ExportTraceServiceRequest, decode_spans),
    "logs": (ExportLogsServiceRequest, decode_logs)}


def decode_request(signal: str, json_body: bool, body: bytes) -> Decoded:
    """The body of an `Export*ServiceRequest` of `signal` ("traces" or "logs"), protobuf
    or OTLP/JSON, to events: what the `otlp` receiver hands the pipeline with the body, to
    be decoded in a worker process (bound with `functools.partial`, it pickles by name).
    The items that do not parse (`parse_request`) and the malformed calls are `rejected`,
    each reason naming its item (their positions are only the order of the reasons).
    `DecodeError` when the body as a whole is not such a request."""
    request_class, decode = _SIGNALS[signal]
    unparsed: list[str] = []
    if json_body:
        message = parse_json(body, request_class)
    else:
        message, unparsed = parse_request(body, request_class)
    decoded = decode(message)
    return Decoded(decoded.events, list(enumerate(unparsed + decoded.rejected)),
                   decoded.skipped)
