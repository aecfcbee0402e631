"""Events as OTLP messages: spans, log records, GenAI metrics and the OTLP/JSON form."""

import json

from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meterline.event import Guardrail
from meterline.exporters.otlp.encode import (
    to_json,
    to_logs_request,
    to_metrics_request,
    to_traces_request,
)
from meterline.genai import INFERENCE_EVENT
from meterline.receivers.decoders.otlp import decode_spans
from tests.helpers import make_event

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def attributes(message):
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in message.attributes}


def only_span(events):
    return to_traces_request(events).resource_spans[0].scope_spans[0].spans[0]


def test_a_span_is_a_client_span_named_for_operation_and_model():
    span = only_span([make_event(1)])
    assert (span.name, span.kind) == ("chat gpt-4o-mini", Span.SPAN_KIND_CLIENT)
    assert span.end_time_unix_nano - span.start_time_unix_nano == 120_500_000


def test_a_span_joins_the_clients_trace():
    span = only_span([make_event(1, trace_id=TRACE, span_id="a1b2c3d4e5f60718",
                                 parent_span_id=PARENT)])
    assert (span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()) == (
        TRACE, "a1b2c3d4e5f60718", PARENT)


def test_ids_missing_from_the_event_are_derived_from_its_id_the_same_way_each_time():
    first, again, other = (only_span([make_event(i)]) for i in (1, 1, 2))
    assert (first.trace_id, first.span_id) == (again.trace_id, again.span_id)
    assert first.trace_id != other.trace_id and len(first.trace_id) == 16
    assert len(first.span_id) == 8 and first.parent_span_id == b""


def test_span_attributes_use_genai_names_and_meterline_names_for_the_rest():
    event = make_event(1, params={"temperature": 0.2, "n": 2}, cost_usd=0.0012,
                       api_key_id="k-1a2b", metadata={"customer": "acme-42"},
                       finish_reasons=["stop"], attributes={"server.address": "api.example"})
    attrs = attributes(only_span([event]))
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.request.temperature"] == 0.2
    assert attrs["gen_ai.request.choice.count"] == 2
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 20
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].values] == ["stop"]
    assert attrs["meterline.cost_usd"] == 0.0012
    assert attrs["meterline.api_key_id"] == "k-1a2b"
    assert attrs["meterline.metadata.customer"] == "acme-42"
    assert attrs["server.address"] == "api.example"
    assert "meterline.sample_weight" not in attrs  # 1.0 is the default


def test_no_attribute_key_repeats_when_the_events_attributes_name_its_own_fields():
    """OTLP keys are unique; a backend shown two `gen_ai.usage.input_tokens` picks one."""
    event = make_event(1, parent_span_id=PARENT, duration_ms=None, metadata={"team": "a"},
                       params={"stream": False},
                       attributes={"gen_ai.usage.input_tokens": 1, "gen_ai.request.stream": True,
                                   "meterline.metadata.team": "b",
                                   "meterline.duration_unknown": False,
                                   "meterline.parent_span_id": "1111111111111111"})
    record = to_logs_request([event]).resource_logs[0].scope_logs[0].log_records[0]
    for message in (only_span([event]), record):
        keys = [kv.key for kv in message.attributes]
        assert len(keys) == len(set(keys))
        attrs = attributes(message)
        assert (attrs["gen_ai.usage.input_tokens"], attrs["meterline.metadata.team"]) == (11, "a")


def test_a_cache_hit_its_saved_cost_and_tags_are_meterline_attributes_of_span_and_log():
    event = make_event(1, cache_hit=True, saved_cost_usd=4.8e-06, cost_usd=0.0,
                       tags=["prod", "checkout"])
    record = to_logs_request([event]).resource_logs[0].scope_logs[0].log_records[0]
    for attrs in (attributes(only_span([event])), attributes(record)):
        assert attrs["meterline.cache_hit"] is True
        assert attrs["meterline.saved_cost_usd"] == 4.8e-06
        assert [v.string_value for v in attrs["meterline.tags"].values] == ["prod", "checkout"]


def test_agent_tool_and_guardrail_fields_go_out_under_their_names_and_come_back_equal():
    event = make_event(1, operation="execute_tool", agent_name="planner", tool_name="search",
                       tool_call_id="c1", mcp_method="tools/call", mcp_session_id="s1",
                       request_bytes=12, response_bytes=340, policies=["guardrails"],
                       guardrails=[Guardrail(rule="no-pii", stage="input", action="redact",
                                             detector="email")])
    attrs = attributes(only_span([event]))
    assert (attrs["gen_ai.agent.name"], attrs["gen_ai.tool.name"], attrs["mcp.method.name"]) \
        == ("planner", "search", "tools/call")
    (back,) = decode_spans(to_traces_request([event])).events
    fields = ("agent_name", "tool_name", "tool_call_id", "mcp_method", "mcp_session_id",
              "request_bytes", "response_bytes", "policies", "guardrails")
    assert [getattr(back, f) for f in fields] == [getattr(event, f) for f in fields]


def test_messages_are_json_in_the_parts_form():
    event = make_event(1, input_messages=[{"role": "user", "content": "hi"}],
                       output_messages=[{"role": "assistant", "content": "hello",
                                         "finish_reason": "stop"}])
    attrs = attributes(only_span([event]))
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "hi"}]}]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {"role": "assistant", "finish_reason": "stop",
         "parts": [{"type": "text", "content": "hello"}]}]


def test_a_failed_call_has_an_error_status_and_error_type():
    span = only_span([make_event(1, status_code=429, error_type="rate_limit_error",
                                 error_message="slow down")])
    assert (span.status.code, span.status.message) == (Status.STATUS_CODE_ERROR, "slow down")
    assert attributes(span)["error.type"] == "rate_limit_error"


def test_a_call_the_client_cancelled_has_no_error_status_nor_error_type():
    event = make_event(1, status_code=499, error_message="client closed the connection")
    span = only_span([event])
    record = to_logs_request([event]).resource_logs[0].scope_logs[0].log_records[0]
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert "error.type" not in attributes(span)
    assert attributes(span)["http.response.status_code"] == 499
    assert record.severity_text == "INFO"


def test_a_log_record_carries_the_span_attributes_and_ids():
    event = make_event(1, trace_id=TRACE, span_id="a1b2c3d4e5f60718")
    record = to_logs_request([event]).resource_logs[0].scope_logs[0].log_records[0]
    assert record.event_name == INFERENCE_EVENT
    assert (record.trace_id.hex(), record.span_id.hex()) == (TRACE, "a1b2c3d4e5f60718")
    assert record.time_unix_nano == event.timestamp
    assert attributes(record) == attributes(only_span([event]))


def test_metrics_count_each_event_sample_weight_times():
    events = [make_event(1, duration_ms=30.0), make_event(2, duration_ms=30.0, sample_weight=4.0)]
    metrics = to_metrics_request(events).resource_metrics[0].scope_metrics[0].metrics
    duration = next(m for m in metrics if m.name == "gen_ai.client.operation.duration")
    point = duration.histogram.data_points[0]
    assert point.count == 5
    assert point.bucket_counts[2] == 5  # 0.03 s is in (0.02, 0.04]
    assert abs(point.sum - 0.15) < 1e-9


def test_token_usage_is_one_histogram_by_token_type():
    metrics = to_metrics_request([make_event(1)]).resource_metrics[0].scope_metrics[0].metrics
    usage = next(m for m in metrics if m.name == "gen_ai.client.token.usage")
    by_type = {attributes(p)["gen_ai.token.type"]: p.sum for p in usage.histogram.data_points}
    assert by_type == {"input": 11, "output": 20}


def test_otlp_json_has_hex_ids_and_camel_case_names():
    event = make_event(1, trace_id=TRACE, span_id="a1b2c3d4e5f60718", parent_span_id=PARENT)
    span = json.loads(to_json(to_traces_request([event])))["resourceSpans"][0][
        "scopeSpans"][0]["spans"][0]
    assert (span["traceId"], span["spanId"], span["parentSpanId"]) == (
        TRACE, "a1b2c3d4e5f60718", PARENT)
    assert span["kind"] == 3 and span["startTimeUnixNano"] == str(event.timestamp)
