"""An OTLP request that protobuf refuses whole is parsed item by item
(`receivers/decoders/otlp_wire.py`): what the `otlp` receiver's tests do not show."""

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meterline.exporters.otlp.encode import to_logs_request, to_traces_request
from meterline.receivers.decoders.otlp_wire import parse_request
from meterline.receivers.kafka.messages import decode_values
from tests.helpers import make_event
from tests.test_event_bounds import kafka_batch
from tests.test_otlp_receiver import BAD_UTF8, with_invalid_utf8


def test_a_scope_that_is_not_utf8_has_its_spans_rejected_and_the_other_scopes_kept():
    request = to_traces_request([make_event(1), make_event(2)])
    request.resource_spans[0].scope_spans.extend(
        to_traces_request([make_event(3)]).resource_spans[0].scope_spans)
    scope = request.resource_spans[0].scope_spans[0].scope
    body = with_invalid_utf8(request, scope.attributes)
    parsed, rejected = parse_request(body, ExportTraceServiceRequest)
    assert rejected == [f"resource_spans[0].scope_spans[0].scope: {BAD_UTF8}"] * 2
    [resource] = parsed.resource_spans
    assert [len(s.spans) for s in resource.scope_spans] == [1]


def test_the_reason_never_quotes_the_string_that_is_not_utf8():
    request = to_traces_request([make_event(1)])
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.add(key="user").value.string_value = "jane.doe@acme-corp.com\x01"
    body = request.SerializeToString().replace(b"com\x01", b"com\xff")
    _, [reason] = parse_request(body, ExportTraceServiceRequest)
    assert "jane.doe" not in reason and "acme" not in reason


def test_a_kafka_otlp_message_with_a_record_that_is_not_utf8_is_a_dead_letter_naming_it():
    """The message is a dead letter whole (replaying it once fixed duplicates nothing),
    its reason the record's place."""
    request = to_logs_request([make_event(1), make_event(2)])
    record = request.resource_logs[0].scope_logs[0].log_records[1]
    decoded = decode_values(kafka_batch(with_invalid_utf8(request, record.attributes)),
                            "otlp_proto")
    assert decoded.events == []
    [(_, reason)] = decoded.rejected
    assert reason == f"resource_logs[0].scope_logs[0].log_records[1]: {BAD_UTF8}"

