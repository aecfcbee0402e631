"""OTLP spans and log records to events: GenAI names old and new, what is skipped."""

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from meterline.exporters.otlp.encode import any_value, to_json, to_logs_request, to_traces_request
from meterline.receivers.decoders.errors import DecodeError
from meterline.receivers.decoders.otlp import decode_logs, decode_spans, parse_json
from tests.helpers import make_event

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
START = 1_700_000_000_000_000_000


def request(*spans, service="checkout"):
    resource = Resource(attributes=[KeyValue(key="service.name", value=any_value(service))])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource, scope_spans=[ScopeSpans(spans=list(spans))])])


def span(attrs, span_id="a1b2c3d4e5f60718", **kw):
    return Span(trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(span_id),
                name=kw.pop("name", "chat gpt-4o"), start_time_unix_nano=START,
                end_time_unix_nano=START + 250_000_000,
                attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()], **kw)


def one(decoded):
    assert not decoded.rejected
    [event] = decoded.events
    return event


def full_event():
    return make_event(1, trace_id=TRACE, span_id="a1b2c3d4e5f60718",
                      parent_span_id="00f067aa0ba902b7", params={"temperature": 0.2, "n": 2},
                      metadata={"customer": "acme-42"}, sample_weight=4.0, ttft_ms=80.0,
                      input_messages=[{"role": "user", "content": "hi"}],
                      output_messages=[{"role": "assistant", "content": "hello"}],
                      finish_reasons=["stop"], cost_usd=0.002, redactions={"email": 1},
                      audio_input_tokens=6, audio_output_tokens=4, service_tier="flex",
                      cache_creation_tokens=5, cache_creation_1h_tokens=3,
                      attributes={"server.address": "api.example", "tags": ["a", "b"]})


def test_what_the_otlp_exporter_writes_as_spans_comes_back_as_the_same_event():
    event = full_event()
    assert one(decode_spans(to_traces_request([event]))) == event


def test_what_the_otlp_exporter_writes_as_log_records_comes_back_as_the_same_event():
    event = full_event()
    assert one(decode_logs(to_logs_request([event]))) == event


def test_otlp_json_comes_back_as_the_same_event():
    event = full_event()
    body = to_json(to_traces_request([event]))
    assert one(decode_spans(parse_json(body, ExportTraceServiceRequest))) == event


def test_a_genai_span_becomes_an_event():
    event = one(decode_spans(request(span({
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 30,
        "gen_ai.request.max_tokens": 100, "gen_ai.response.id": "chatcmpl-1"},
        parent_span_id=bytes.fromhex("00f067aa0ba902b7")))))
    assert (event.source, event.provider, event.operation) == ("otlp", "openai", "chat")
    assert (event.request_model, event.response_model) == ("gpt-4o", "gpt-4o-2024-08-06")
    assert (event.input_tokens, event.output_tokens) == (12, 30)
    assert (event.timestamp, event.duration_ms) == (START, 250.0)
    assert (event.trace_id, event.parent_span_id) == (TRACE, "00f067aa0ba902b7")
    assert event.event_id == f"{TRACE}-a1b2c3d4e5f60718"
    assert event.params == {"max_tokens": 100}
    assert event.attributes == {"gen_ai.response.id": "chatcmpl-1", "service.name": "checkout"}


def test_older_genai_names_are_read():
    event = one(decode_spans(request(span({
        "gen_ai.system": "OpenAI", "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.prompt_tokens": 7, "gen_ai.usage.completion_tokens": 9}))))
    assert (event.provider, event.input_tokens, event.output_tokens) == ("openai", 7, 9)
    assert "gen_ai.system" not in (event.attributes or {})


def test_the_openai_service_tier_of_a_span_is_the_tier_that_served_it():
    event = one(decode_spans(request(span({
        "gen_ai.provider.name": "openai", "gen_ai.request.model": "o3",
        "openai.request.service_tier": "auto", "openai.response.service_tier": "flex",
        "gen_ai.usage.input_tokens": 5}))))
    assert event.service_tier == "flex"
    assert "openai.response.service_tier" not in (event.attributes or {})


def test_current_names_win_over_older_ones():
    event = one(decode_spans(request(span({
        "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.prompt_tokens": 7}))))
    assert event.input_tokens == 5


def test_openllmetry_indexed_messages_are_read():
    event = one(decode_spans(request(span({
        "gen_ai.system": "openai", "gen_ai.request.model": "gpt-4o", "llm.request.type": "chat",
        "gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": "be brief",
        "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": "hi",
        "gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": "hello"}))))
    assert event.operation == "chat"
    assert event.input_messages == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}]
    assert event.output_messages == [{"role": "assistant", "content": "hello"}]


def test_spans_that_are_neither_llm_calls_nor_agent_tool_or_mcp_spans_are_skipped_and_counted():
    decoded = decode_spans(request(
        span({"http.request.method": "GET"}, span_id="0000000000000001"),
        span({"db.system.name": "postgresql", "gen_ai.tool.name": "search"},
             span_id="0000000000000002"),
        span({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"},
             span_id="0000000000000003"),
        span({"gen_ai.request.model": "gpt-4o"}, span_id="0000000000000004")))
    assert (len(decoded.events), decoded.skipped) == (2, 2)


def test_a_malformed_token_count_rejects_the_span_with_the_attribute_named():
    decoded = decode_spans(request(
        span({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": "many"}),
        span({"gen_ai.request.model": "gpt-4o"}, span_id="0000000000000002")))
    assert len(decoded.events) == 1
    assert decoded.rejected == ["span 'chat gpt-4o': gen_ai.usage.input_tokens must be a "
                                "non-negative integer, got 'many'"]


def test_an_error_status_sets_the_error_category():
    event = one(decode_spans(request(span(
        {"gen_ai.request.model": "gpt-4o", "error.type": "openai.RateLimitError"},
        status=Status(code=Status.STATUS_CODE_ERROR, message="Rate limit reached")))))
    assert (event.error_type, event.error_message) == ("rate_limit_error", "Rate limit reached")


def test_an_error_status_without_error_type_is_unknown():
    event = one(decode_spans(request(span(
        {"gen_ai.request.model": "gpt-4o"}, status=Status(code=Status.STATUS_CODE_ERROR)))))
    assert event.error_type == "unknown"


def test_a_log_record_without_trace_context_gets_a_stable_id():
    record = LogRecord(time_unix_nano=START, attributes=[
        KeyValue(key="gen_ai.request.model", value=any_value("gpt-4o"))])
    req = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        scope_logs=[ScopeLogs(log_records=[record])])])
    assert one(decode_logs(req)).event_id == one(decode_logs(req)).event_id


def test_old_content_log_events_are_not_calls():
    record = LogRecord(time_unix_nano=START, event_name="gen_ai.user.message", attributes=[
        KeyValue(key="gen_ai.system", value=any_value("openai"))])
    req = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        scope_logs=[ScopeLogs(log_records=[record])])])
    decoded = decode_logs(req)
    assert (decoded.events, decoded.skipped) == ([], 1)


def test_otlp_json_with_a_malformed_id_is_refused_with_the_reason():
    body = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}'
    with pytest.raises(DecodeError, match="traceId must be hex"):
        parse_json(body, ExportTraceServiceRequest)


def test_a_span_with_a_token_count_out_of_bounds_is_rejected_naming_its_attribute():
    decoded = decode_spans(request(span({"gen_ai.request.model": "gpt-4o",
                                         "gen_ai.usage.output_tokens": 2**40}),
                                   span({"gen_ai.request.model": "gpt-4o"},
                                        span_id="0000000000000002")))
    [event] = decoded.events
    assert event.span_id == "0000000000000002"
    [reason] = decoded.rejected
    assert reason.startswith("span 'chat gpt-4o': out of bounds (gen_ai.usage.output_tokens)")


@pytest.mark.parametrize(("levels", "reason"), [
    (150, "out of bounds (gen_ai.input.messages): nested deeper than 100 levels"),
    (5000, "gen_ai.input.messages is JSON nested too deeply")])  # (deeper than json goes)
def test_a_span_whose_messages_nest_too_deeply_is_rejected_alone(levels, reason):
    messages = '[{"role": "user", "parts": [{"type": "text", "content": ' + (
        "[" * levels + "]" * levels) + "}]}]"
    decoded = decode_spans(request(span({"gen_ai.request.model": "gpt-4o",
                                         "gen_ai.input.messages": messages}),
                                   span({"gen_ai.request.model": "gpt-4o"},
                                        span_id="0000000000000002")))
    assert [e.span_id for e in decoded.events] == ["0000000000000002"]
    [rejected] = decoded.rejected
    assert rejected.startswith(f"span 'chat gpt-4o': {reason}"), rejected


def test_a_log_record_whose_user_holds_a_control_character_is_rejected():
    decoded = decode_logs(to_logs_request([make_event(1, user_id="eve\x00")]))
    assert not decoded.events
    [reason] = decoded.rejected
    assert "control characters" in reason and "$.user_id" in reason
