"""Fuzzing the OTLP decoders and the `otlp` receiver: any ExportTraceServiceRequest /
ExportLogsServiceRequest (random GenAI attributes of any type), any protobuf bytes and any
OTLP/JSON body either becomes events in bounds and reasons, or is refused as malformed
(400 / INVALID_ARGUMENT); never a 500, UNKNOWN or INTERNAL."""

from __future__ import annotations

import http.client
import json
from typing import Any

import grpc
import msgspec
import pytest
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from meterline import bounds, otlpjson
from meterline.event import FIELDS, pack
from meterline.genai import ATTRIBUTES, INFERENCE_EVENT
from meterline.receivers.decoders import DecodeError
from meterline.receivers.decoders.otlp import decode_logs, decode_spans, parse_json
from meterline.receivers.decoders.otlp_wire import parse_request
from tests.fuzz_helpers import FLOATS, NUMERIC_STRINGS, TEXT, fuzz, service_in_thread, within
from tests.helpers import free_port

# --- building requests ---------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1) | st.sampled_from(
    [0, 1, 2**63, 2**64 - 1, 1_700_000_000_000_000_000, 946_684_800 * 10**9])
_SCALAR_VALUES = (st.booleans() | INT64 | st.integers(-5, 10**9 + 5) | FLOATS | TEXT
                  | NUMERIC_STRINGS | st.binary(max_size=20) | st.none())
VALUES = st.recursive(_SCALAR_VALUES, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(TEXT, children, max_size=4), max_leaves=15)

MESSAGES = st.lists(st.fixed_dictionaries({"role": TEXT}, optional={
    "parts": st.lists(st.fixed_dictionaries({"type": st.just("text") | TEXT},
                                            optional={"content": TEXT | st.integers()}),
                      max_size=3) | st.integers()}), max_size=3)
ATTRIBUTE_NAMES = (
    sorted(ATTRIBUTES.values())
    + ["gen_ai.system", "gen_ai.usage.prompt_tokens", "gen_ai.usage.completion_tokens",
       "gen_ai.usage.cache_read_input_tokens", "llm.request.type", "llm.is_streaming",
       "gen_ai.request.temperature", "gen_ai.request.choice.count", "service.name",
       "gen_ai.prompt.0.content", "gen_ai.prompt.0.role", "gen_ai.completion.1.content",
       "gen_ai.prompt.99999999999999999999.content", "gen_ai.prompt.٣.role",
       "meterline.metadata.team", "meterline.redactions.email", "meterline.metadata.",
       "meterline.attributes.x", "meterline.params",
       "gen_ai.agent.name", "gen_ai.agent.id", "gen_ai.tool.name", "gen_ai.tool.call.id",
       "gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "mcp.method.name",
       "mcp.session.id", "rpc.response.status_code", "rpc.jsonrpc.error_code"]
    + [f"meterline.{name}" for name in sorted(FIELDS)])
_TYPED = {
    "gen_ai.input.messages": MESSAGES.map(json.dumps) | MESSAGES | TEXT,
    "gen_ai.output.messages": MESSAGES | MESSAGES.map(json.dumps),
    "error.type": TEXT | NUMERIC_STRINGS | st.sampled_from(["429", "²", "9" * 5000, "timeout"]),
    "http.response.status_code": st.integers(-1, 70000) | FLOATS,
    "meterline.timestamp": UINT64, "meterline.sample_weight": FLOATS,
    "gen_ai.operation.name": st.sampled_from(["execute_tool", "invoke_agent", "create_agent",
                                              "chat"]) | TEXT,
    "mcp.method.name": st.sampled_from(["tools/call", "tools/list", "notifications/x"]) | TEXT,
    "rpc.response.status_code": st.sampled_from(["-32602", "-32001", "-99999999999"]) | TEXT,
}
ATTRIBUTE_VALUES = {name: (_TYPED[name] | VALUES) if name in _TYPED else VALUES
                    for name in ATTRIBUTE_NAMES}


@st.composite
def attributes(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(ATTRIBUTE_NAMES) | TEXT, max_size=8, unique=True))
    if draw(st.booleans()):  # most often a model call, so that decoding goes past the filter
        names.append("gen_ai.request.model")
    return {name: draw(ATTRIBUTE_VALUES.get(name, VALUES)) for name in names}


def any_value(value: Any, depth: int = 0) -> AnyValue:
    out = AnyValue()
    if value is None:
        pass
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = max(-(2**63), min(2**63 - 1, value))
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bytes):
        out.bytes_value = value
    elif isinstance(value, list):
        out.array_value.values.extend(any_value(v, depth + 1) for v in value)
    else:
        out.kvlist_value.values.extend(key_values(value, depth + 1))
    return out


def key_values(attrs: dict[str, Any], depth: int = 0) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v, depth)) for k, v in attrs.items()]


IDS = st.binary(max_size=20) | st.binary(min_size=16, max_size=16) | st.binary(min_size=8,
                                                                                max_size=8)


@st.composite
def trace_requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(key_values(draw(st.dictionaries(
            st.just("service.name") | TEXT, VALUES, max_size=2))))
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            for _ in range(draw(st.integers(0, 3))):
                span = ss.spans.add()
                span.name = draw(TEXT)
                span.trace_id, span.span_id = draw(IDS), draw(IDS)
                span.parent_span_id = draw(IDS)
                span.start_time_unix_nano = draw(UINT64)
                span.end_time_unix_nano = draw(UINT64)
                span.status.code = draw(st.integers(0, 2))
                span.status.message = draw(TEXT)
                span.attributes.extend(key_values(draw(attributes())))
    return request


@st.composite
def logs_requests(draw: st.DrawFn) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rl = request.resource_logs.add()
        rl.resource.attributes.extend(key_values(draw(st.dictionaries(
            st.just("service.name") | TEXT, VALUES, max_size=2))))
        sl = rl.scope_logs.add()
        for _ in range(draw(st.integers(0, 3))):
            record = sl.log_records.add()
            record.event_name = draw(st.just(INFERENCE_EVENT) | TEXT)
            record.time_unix_nano = draw(UINT64)
            record.observed_time_unix_nano = draw(UINT64)
            record.trace_id, record.span_id = draw(IDS), draw(IDS)
            record.body.CopyFrom(any_value(draw(VALUES)))
            record.attributes.extend(key_values(draw(attributes())))
    return request


@st.composite
def protobuf_bodies(draw: st.DrawFn, requests: st.SearchStrategy[Message]) -> bytes:
    """A request's bytes, the same with bytes flipped or cut, or any bytes."""
    kind = draw(st.sampled_from(["whole", "mutated", "cut", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(draw(requests).SerializeToString())
    if kind == "cut":
        return bytes(data[:draw(st.integers(0, len(data)))])
    if kind == "mutated" and data:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def _check(decoded: Any) -> None:
    pack(decoded.events)
    assert bounds.refused(decoded.events) == {}
    assert all(isinstance(r, str) and r.strip() for r in decoded.rejected), decoded.rejected


# --- the decoders, in process ----------------------------------------------------------
@fuzz(200)
@given(trace_requests())
def test_any_trace_request_gives_events_in_bounds_and_reasons_never_an_exception(
        request: ExportTraceServiceRequest) -> None:
    _check(within(2, decode_spans, request))


@fuzz(150)
@given(logs_requests())
def test_any_logs_request_gives_events_in_bounds_and_reasons_never_an_exception(
        request: ExportLogsServiceRequest) -> None:
    _check(within(2, decode_logs, request))


def _parse(body: bytes, cls: type[Message]) -> Message | None:
    try:
        request, unparsed = within(2, parse_request, body, cls)
    except DecodeError as e:  # what the receiver answers 400 for
        assert str(e).strip()
        return None
    assert all(r.strip() for r in unparsed)
    return request


@fuzz(200)
@given(protobuf_bodies(trace_requests()), protobuf_bodies(logs_requests()))
def test_any_protobuf_bytes_are_refused_as_malformed_or_decoded(traces: bytes,
                                                                logs: bytes) -> None:
    if (request := _parse(traces, ExportTraceServiceRequest)) is not None:
        _check(within(2, decode_spans, request))
    if (request := _parse(logs, ExportLogsServiceRequest)) is not None:
        _check(within(2, decode_logs, request))


@st.composite
def otlp_json_bodies(draw: st.DrawFn) -> bytes:
    """OTLP/JSON of a request (ids in hex), with a value replaced by any JSON; or nested deep,
    cut short, or any bytes."""
    kind = draw(st.sampled_from(["whole", "poked", "deep", "cut", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        n = draw(st.integers(50, 20_000))
        return b'{"resourceSpans": [{"scopeSpans": [{"spans": [' + b"[" * n + b"]" * n + b"]}]}]}"
    whole = otlpjson.to_json(draw(trace_requests()))
    if kind == "cut":
        return whole[:draw(st.integers(0, len(whole)))]
    if kind == "poked":
        data = msgspec.json.decode(whole)
        node: Any = data
        for _ in range(draw(st.integers(0, 6))):
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node)))
                if not isinstance(node[key], dict | list) or draw(st.booleans()):
                    node[key] = draw(VALUES.map(_jsonable))
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                node = node[draw(st.integers(0, len(node) - 1))]
        return json.dumps(data).encode()
    return whole


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@fuzz(200)
@given(otlp_json_bodies())
def test_any_otlp_json_body_is_refused_with_a_reason_or_decoded(body: bytes) -> None:
    try:
        request = within(2, parse_json, body, ExportTraceServiceRequest)
    except DecodeError as e:
        assert str(e).strip()
        return
    _check(within(2, decode_spans, request))


# --- end to end: the otlp receiver over HTTP and gRPC ------------------------------------


@pytest.fixture(scope="module")
def otlp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    grpc_port, http_port = free_port(), free_port()
    tmp = tmp_path_factory.mktemp("fuzz-otlp")
    with service_in_thread(
            {"otlp": {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}",
                      "max_message_mb": 0.25}}, tmp), \
            grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield http_port, channel


_SIGNALS = {"traces": "opentelemetry.proto.collector.trace.v1.TraceService",
            "logs": "opentelemetry.proto.collector.logs.v1.LogsService"}


@st.composite
def otlp_posts(draw: st.DrawFn) -> tuple[str, str, bytes]:
    signal = draw(st.sampled_from(["traces", "logs"]))
    encoding = draw(st.sampled_from(["protobuf", "json"]))
    if encoding == "json":
        body = draw(otlp_json_bodies()) if signal == "traces" else otlpjson.to_json(
            draw(logs_requests()))
    else:
        body = draw(protobuf_bodies(trace_requests() if signal == "traces"
                                    else logs_requests()))
    return signal, encoding, body


@fuzz(30)
@given(otlp_posts())
def test_otlp_http_answers_any_body_200_or_a_4xx_with_a_status_never_500(
        otlp: Any, post: tuple[str, str, bytes]) -> None:
    signal, encoding, body = post
    conn = http.client.HTTPConnection("127.0.0.1", otlp[0], timeout=10)
    try:
        conn.request("POST", f"/v1/{signal}", body=body,
                     headers={"Content-Type": f"application/x-{encoding}" if encoding ==
                              "protobuf" else "application/json"})
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status in (200, 400, 413, 429), (status, raw[:300])
    if status == 400:  # a google.rpc.Status saying why
        message = (msgspec.json.decode(raw)["message"] if encoding == "json"
                   else _rpc_status(raw))
        assert message.strip()


def _rpc_status(raw: bytes) -> str:
    from google.rpc.status_pb2 import Status
    return Status.FromString(raw).message


@fuzz(30)
@given(otlp_posts().filter(lambda p: p[1] == "protobuf"))
def test_otlp_grpc_answers_any_message_ok_or_invalid_argument_never_unknown_or_internal(
        otlp: Any, post: tuple[str, str, bytes]) -> None:
    signal, _, body = post
    export = otlp[1].unary_unary(f"/{_SIGNALS[signal]}/Export")  # bytes in, bytes out
    try:
        export(body, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.RESOURCE_EXHAUSTED), (e.code(), e.details())
        assert e.details().strip()

