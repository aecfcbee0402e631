"""Receiver `otlp`: the OpenTelemetry SDK's exporters (gRPC and HTTP) send GenAI spans."""

import asyncio
import contextlib
import dataclasses
import gzip
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc import LogsServiceStub
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meterline.event import from_dict
from meterline.exporters.otlp.encode import to_json, to_logs_request, to_traces_request
from tests.helpers import (
    eventually,
    free_port,
    make_event,
    metric_value,
    post_raw,
    read_jsonl,
    running,
    sent_until_taken,
)

PIPELINE = """
receivers:
  otlp: {{grpc: "127.0.0.1:{grpc}", http: "127.0.0.1:{http}"{extra}}}
exporters:
  file:
    path: {out}
    batch: {{timeout: 10ms}}
    {queue}
service:
  data_dir: {{data}}
  admin: null
  workers: 1  # no processor to run (tests/helpers.py, INLINE)
  shutdown_timeout: 200ms
  pipelines:
    p: {{receivers: [otlp], exporters: [file]}}
"""

GENAI = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
         "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 12,
         "gen_ai.usage.output_tokens": 30, "gen_ai.request.temperature": 0.5}


class Ports:
    def __init__(self):
        self.grpc, self.http = free_port(), free_port()


def running_receiver(ports, tmp_path, extra="", queue="", out=None):
    return running(pipeline(ports, tmp_path, extra=extra, queue=queue, out=out), tmp_path)


def pipeline(ports, tmp_path, extra="", queue="", out=None):
    return PIPELINE.format(grpc=ports.grpc, http=ports.http, extra=extra, queue=queue,
                           out=out or tmp_path / "out.jsonl")


def recorded_spans():
    """Two finished spans from the SDK: an LLM call and an HTTP handler."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER) as parent, \
            tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=GENAI):
        pass
    provider.shutdown()
    return memory.get_finished_spans(), parent.get_span_context()


async def received(tmp_path, count):
    return await eventually(lambda: (r := read_jsonl(tmp_path / "out.jsonl"))
                            and len(r) >= count and r)


@pytest.mark.parametrize("make_exporter", [
    lambda p: GrpcSpanExporter(endpoint=f"127.0.0.1:{p.grpc}", insecure=True),
    lambda p: HttpSpanExporter(endpoint=f"http://127.0.0.1:{p.http}/v1/traces"),
], ids=["grpc", "http"])
async def test_the_sdks_otlp_exporters_send_genai_spans_that_become_events(
        tmp_path, make_exporter):
    ports = Ports()
    spans, parent = recorded_spans()
    async with running_receiver(ports, tmp_path) as service:
        exporter = make_exporter(ports)
        assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
        [event] = await received(tmp_path, 1)
        assert event["source"] == "otlp"
        assert (event["provider"], event["operation"], event["request_model"]) == (
            "openai", "chat", "gpt-4o")
        assert (event["input_tokens"], event["output_tokens"]) == (12, 30)
        assert event["params"] == {"temperature": 0.5}
        assert event["trace_id"] == f"{parent.trace_id:032x}"
        assert event["parent_span_id"] == f"{parent.span_id:016x}"
        assert event["attributes"]["service.name"] == "checkout"
        registry = service.telemetry.registry
        assert metric_value(registry, "meterline_receiver_refused_events_total",
                            reason="not_llm_call") == 1


async def test_otlp_json_over_http_is_answered_in_json(tmp_path):
    ports = Ports()
    event = make_event(1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="a1b2c3d4e5f60718")
    async with running_receiver(ports, tmp_path):
        status, answer, headers = await post_raw(
            f"http://127.0.0.1:{ports.http}/v1/traces", to_json(to_traces_request([event])),
            headers={"Content-Type": "application/json"})
        assert (status, headers["Content-Type"]) == (200, "application/json")
        assert answer == {"partialSuccess": {}}
        [got] = await received(tmp_path, 1)
        assert from_dict(got) == event


async def test_gzipped_protobuf_over_http_is_read(tmp_path):
    ports = Ports()
    async with running_receiver(ports, tmp_path):
        status, _, _ = await post_raw(
            f"http://127.0.0.1:{ports.http}/v1/traces",
            gzip.compress(to_traces_request([make_event(1)]).SerializeToString()),
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"})
        assert status == 200
        [got] = await received(tmp_path, 1)
        assert got["event_id"] == "evt-00000001"


async def test_log_records_over_grpc_become_events(tmp_path):
    ports = Ports()
    event = make_event(1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="a1b2c3d4e5f60718",
                       parent_span_id="00f067aa0ba902b7")
    async with running_receiver(ports, tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        answer = await LogsServiceStub(channel).Export(to_logs_request([event]))
        assert answer.partial_success.rejected_log_records == 0
        [got] = await received(tmp_path, 1)
        assert from_dict(got) == event


async def test_a_call_sent_as_a_span_and_as_a_log_record_becomes_one_event(tmp_path):
    ports = Ports()
    event = make_event(1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="a1b2c3d4e5f60718")
    async with running_receiver(ports, tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        await TraceServiceStub(channel).Export(to_traces_request([event]))
        await LogsServiceStub(channel).Export(to_logs_request([event]))
        duplicates = metric_value(service.telemetry.registry,
                                  "meterline_receiver_refused_events_total", reason="duplicate")
        [got] = await received(tmp_path, 1)
    assert duplicates == 1 and from_dict(got) == event


async def test_malformed_calls_are_reported_as_partial_success(tmp_path):
    ports = Ports()
    request = to_traces_request([make_event(1), make_event(2)])
    bad = request.resource_spans[0].scope_spans[0].spans[1]
    next(a for a in bad.attributes if a.key == "gen_ai.usage.input_tokens").value.int_value = -3
    async with running_receiver(ports, tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        answer = await TraceServiceStub(channel).Export(request)
        assert answer.partial_success.rejected_spans == 1
        assert "gen_ai.usage.input_tokens must be a non-negative integer, got -3" in (
            answer.partial_success.error_message)
        [got] = await received(tmp_path, 1)
        assert got["event_id"] == "evt-00000001"


async def test_a_secret_in_a_rejected_attribute_is_masked_in_the_log(tmp_path):
    """The reason names the value for the client that sent it; the daemon's log line
    about it must not carry it in clear."""
    from structlog.testing import capture_logs
    ports = Ports()
    key = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78St90Uv12Wx34"
    request = to_traces_request([make_event(1)])
    bad = request.resource_spans[0].scope_spans[0].spans[0]
    next(a for a in bad.attributes if a.key == "gen_ai.usage.input_tokens").value.string_value = (
        f"jane.doe@acme-corp.com {key}")
    async with running_receiver(ports, tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        with capture_logs() as logged:
            answer = await TraceServiceStub(channel).Export(request)
    assert answer.partial_success.rejected_spans == 1
    [line] = [e for e in logged if e["event"] == "spans rejected"]
    assert "gen_ai.usage.input_tokens" in line["first_reason"]
    assert "jane.doe" not in line["first_reason"] and key not in line["first_reason"]


async def test_a_body_that_is_not_otlp_gets_400_with_a_status_saying_why(tmp_path):
    ports = Ports()
    async with running_receiver(ports, tmp_path), aiohttp.ClientSession() as session, \
            session.post(f"http://127.0.0.1:{ports.http}/v1/traces", data=b"\xff\xff not otlp",
                         headers={"Content-Type": "application/x-protobuf"}) as response:
        assert response.status == 400
        status = RpcStatus.FromString(await response.read())
        assert status.message.startswith("not an OTLP ExportTraceServiceRequest")


async def test_the_bearer_token_is_required_when_set(tmp_path):
    ports = Ports()
    body = to_traces_request([make_event(1)])
    async with running_receiver(ports, tmp_path, extra=", auth_token: s3cret"), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        stub = TraceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(body)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.Export(body, metadata=(("authorization", "Bearer s3cret"),))
        status, _, _ = await post_raw(f"http://127.0.0.1:{ports.http}/v1/traces",
                                      body.SerializeToString(),
                                      headers={"Content-Type": "application/x-protobuf"})
        assert status == 401
        assert len(await received(tmp_path, 1)) == 1


def blocked_queue(tmp_path):
    """A file exporter that cannot write, behind a one-event memory queue: the first
    request fills it and the next ones are pushed back."""
    blocker = tmp_path / "blocked"
    blocker.write_text("not a directory")
    return {"out": blocker / "out.jsonl",
            "queue": "queue: {type: memory, max_events: 1}\n"
                     "    retry: {initial_interval: 20ms, max_interval: 50ms}"}


@contextlib.asynccontextmanager
async def pushed_back(tmp_path):
    """A gRPC stub to a receiver whose queue is full; event 1 was taken, event 2 refused
    (the refusal is yielded too)."""
    ports = Ports()
    async with running_receiver(ports, tmp_path, **blocked_queue(tmp_path)), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        stub = TraceServiceStub(channel)
        await stub.Export(to_traces_request([make_event(1)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Export(to_traces_request([make_event(2)]))
        yield stub, refused


async def test_a_full_queue_answers_grpc_resource_exhausted_with_retry_info(tmp_path):
    async with pushed_back(tmp_path) as (_, refused):
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(refused.value.trailing_metadata())
        assert RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]).retry_delay.seconds == 1
        status = RpcStatus.FromString(trailers["grpc-status-details-bin"])
        assert status.details[0].Is(RetryInfo.DESCRIPTOR)


async def test_a_full_queue_answers_http_429_with_retry_after(tmp_path):
    ports = Ports()
    url = f"http://127.0.0.1:{ports.http}/v1/traces"
    headers = {"Content-Type": "application/json"}
    async with running_receiver(ports, tmp_path, **blocked_queue(tmp_path)):
        first = await post_raw(url, to_json(to_traces_request([make_event(1)])), headers=headers)
        assert first[0] == 200
        status, answer, answer_headers = await post_raw(
            url, to_json(to_traces_request([make_event(2)])), headers=headers)
        assert (status, answer_headers["Retry-After"]) == (429, "1")
        assert answer["message"].startswith("back-pressure")


async def test_a_call_pushed_back_is_taken_when_sent_again(tmp_path):
    async with pushed_back(tmp_path) as (stub, _):
        (tmp_path / "blocked").unlink()  # the exporter can write: the queue drains
        await sent_until_taken(lambda: stub.Export(to_traces_request([make_event(2)])),
                               grpc.aio.AioRpcError)  # as the SDK's exporter does
        out = await eventually(lambda: len(r := read_jsonl(tmp_path / "blocked/out.jsonl")) == 2
                               and r)
    assert [e["event_id"] for e in out] == [make_event(1).event_id, make_event(2).event_id]


@pytest.mark.parametrize("service", ["opentelemetry.proto.collector.trace.v1.TraceService",
                                     "opentelemetry.proto.collector.logs.v1.LogsService"])
async def test_a_malformed_protobuf_over_grpc_is_answered_invalid_argument(tmp_path, service):
    ports = Ports()
    async with running_receiver(ports, tmp_path) as running_service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        export = channel.unary_unary(f"/{service}/Export")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await export(b"\xff\xff\xff\xff not protobuf")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a protobuf Export" in e.value.details()
        refused = metric_value(running_service.telemetry.registry,
                               "meterline_receiver_refused_events_total", reason="undecodable")
        assert refused == 1
        event = make_event(1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                           span_id="a1b2c3d4e5f60718")
        answer = await TraceServiceStub(channel).Export(to_traces_request([event]))
        assert answer.partial_success.rejected_spans == 0  # the next request is taken


async def test_otlp_json_nested_too_deeply_is_a_400(tmp_path):
    ports = Ports()
    deep = b'{"resourceSpans": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    async with running_receiver(ports, tmp_path):
        status, body, _ = await post_raw(f"http://127.0.0.1:{ports.http}/v1/traces", deep,
                                         headers={"Content-Type": "application/json"})
    assert status == 400 and "not an OTLP ExportTraceServiceRequest" in str(body)


# --- an item protobuf refuses (a string that is not UTF-8) is refused alone -------------
BAD_UTF8 = "String field had bad UTF-8"


@dataclasses.dataclass
class Signal:
    """What tells traces and logs apart, for the tests below."""

    name: str  # as in /v1/traces
    service: str
    request: Any  # events -> its Export*ServiceRequest
    levels: tuple[str, str, str]  # resource_spans, scope_spans, spans
    response: Any
    rejected: str  # the partial-success answer's count

    def items(self, request):
        resources, scopes, items = self.levels
        return getattr(getattr(getattr(request, resources)[0], scopes)[0], items)


TRACES = Signal("traces", "opentelemetry.proto.collector.trace.v1.TraceService",
                to_traces_request, ("resource_spans", "scope_spans", "spans"),
                ExportTraceServiceResponse, "rejected_spans")
LOGS = Signal("logs", "opentelemetry.proto.collector.logs.v1.LogsService",
              to_logs_request, ("resource_logs", "scope_logs", "log_records"),
              ExportLogsServiceResponse, "rejected_log_records")


def with_invalid_utf8(request, *attributes):
    """`request`'s bytes with an attribute whose string is not UTF-8 added to each of
    `attributes` (the attributes of a span, a log record or a resource of it)."""
    for pairs in attributes:
        pairs.add(key="note").value.string_value = "utf-8?"
    return request.SerializeToString().replace(b"utf-8?", b"utf-8\xff")


def three_calls_the_second_bad(signal=TRACES):
    request = signal.request([make_event(1), make_event(2), make_event(3)])
    return with_invalid_utf8(request, signal.items(request)[1].attributes)


async def grpc_export(ports, body, signal=TRACES):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        return await channel.unary_unary(
            f"/{signal.service}/Export", response_deserializer=signal.response.FromString)(body)


async def http_export(ports, body, signal):
    async with aiohttp.ClientSession() as session, \
            session.post(f"http://127.0.0.1:{ports.http}/v1/{signal.name}", data=body,
                         headers={"Content-Type": "application/x-protobuf"}) as response:
        assert response.status == 200
        return signal.response.FromString(await response.read())


@pytest.mark.parametrize("signal", [TRACES, LOGS], ids=lambda s: s.name)
@pytest.mark.parametrize("export", [grpc_export, http_export], ids=["grpc", "http"])
async def test_a_call_that_is_not_utf8_is_rejected_alone(tmp_path, export, signal):
    ports = Ports()
    async with running_receiver(ports, tmp_path):
        answer = await export(ports, three_calls_the_second_bad(signal), signal)
        assert getattr(answer.partial_success, signal.rejected) == 1
        resources, scopes, items = signal.levels
        assert answer.partial_success.error_message == (
            f"{resources}[0].{scopes}[0].{items}[1]: {BAD_UTF8}")
        got = await received(tmp_path, 2)
    assert [e["event_id"] for e in got] == ["evt-00000001", "evt-00000003"]


async def test_a_resource_that_is_not_utf8_has_its_spans_rejected_and_the_others_taken(tmp_path):
    ports = Ports()
    request = to_traces_request([make_event(1), make_event(2)], resource={"service.name": "a"})
    request.resource_spans.extend(
        to_traces_request([make_event(3)], resource={"service.name": "b"}).resource_spans)
    body = with_invalid_utf8(request, request.resource_spans[0].resource.attributes)
    async with running_receiver(ports, tmp_path):
        answer = await grpc_export(ports, body)
        assert answer.partial_success.rejected_spans == 2
        assert answer.partial_success.error_message == f"resource_spans[0].resource: {BAD_UTF8}"
        [got] = await received(tmp_path, 1)
    assert got["event_id"] == "evt-00000003"


async def test_a_truncated_request_is_refused_whole_naming_where_it_ends(tmp_path):
    ports = Ports()
    body = three_calls_the_second_bad()[:-10]
    where = "the request: field 1 at byte 0 runs past the end"
    async with running_receiver(ports, tmp_path), \
            grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel, \
            aiohttp.ClientSession() as session:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(f"/{TRACES.service}/Export")(body)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert where in refused.value.details()
        async with session.post(f"http://127.0.0.1:{ports.http}/v1/traces", data=body,
                                headers={"Content-Type": "application/x-protobuf"}) as response:
            assert response.status == 400
            assert where in RpcStatus.FromString(await response.read()).message
