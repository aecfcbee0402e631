"""Exporter `otlp`: to a gRPC sink built on opentelemetry-proto's services, and over HTTP."""

import asyncio
import contextlib
import shutil
import subprocess

import grpc
import msgspec
import pytest
from aiohttp import web
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from meterline.component import ExportBatch, PermanentError, RetryableError
from meterline.config import convert
from meterline.event import from_dict
from meterline.exporters.otlp.exporter import OtlpExporter, OtlpExporterConfig
from meterline.httpserver import serve
from meterline.receivers.decoders.otlp import value_of
from meterline.units import Listen
from tests.helpers import (
    endless_server,
    event_dicts,
    eventually,
    free_port,
    long_prompts,
    make_context,
    make_event,
    metric_value,
    post_json,
    read_jsonl,
    running,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Sink:
    """An OTLP gRPC server that records what it gets and fails when told to."""

    def __init__(self, tls=None, max_receive=None):
        self.port = free_port()
        self.tls = tls  # (key PEM, certificate PEM) to serve TLS
        self.max_receive = max_receive  # bytes of a request it takes (gRPC's default: 4 MiB)
        self.requests = {"traces": [], "logs": [], "metrics": []}
        self.metadata = []
        self.failures = []  # (signal, grpc code, retry delay seconds or None), in order
        self.rejected = 0  # items to report as rejected (partial success)

    async def handle(self, signal, request, context, response):
        self.metadata.append(dict(context.invocation_metadata()))
        if self.failures and self.failures[0][0] == signal:
            _, code, delay = self.failures.pop(0)
            trailers = ()
            if delay is not None:
                info = RetryInfo(retry_delay=Duration(seconds=delay))
                status = RpcStatus(code=code.value[0], message="busy")
                status.details.add().Pack(info)
                trailers = (("grpc-status-details-bin", status.SerializeToString()),)
            await context.abort(code, "busy", trailers)
        self.requests[signal].append(request)
        return response

    def spans(self):
        return [s for r in self.requests["traces"] for rs in r.resource_spans
                for ss in rs.scope_spans for s in ss.spans]

    async def __aenter__(self):
        sink = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request, context):
                return await sink.handle("traces", request, context,
                                         trace_service_pb2.ExportTraceServiceResponse(
                                             partial_success=trace_service_pb2.
                                             ExportTracePartialSuccess(
                                                 rejected_spans=sink.rejected,
                                                 error_message="no" if sink.rejected else "")))

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            async def Export(self, request, context):
                return await sink.handle("logs", request, context,
                                         logs_service_pb2.ExportLogsServiceResponse())

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            async def Export(self, request, context):
                return await sink.handle("metrics", request, context,
                                         metrics_service_pb2.ExportMetricsServiceResponse())

        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length",
                                                self.max_receive or 4 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        if self.tls:
            self.server.add_secure_port(f"127.0.0.1:{self.port}",
                                        grpc.ssl_server_credentials([self.tls]))
        else:
            self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(None)


@contextlib.asynccontextmanager
async def exporter(tmp_path, **config):
    context = make_context(tmp_path, "otlp")
    instance = OtlpExporter(convert(config, OtlpExporterConfig), context)
    await instance.start()
    try:
        yield instance, context.telemetry.registry
    finally:
        await instance.shutdown()


def attributes(span):
    return {kv.key: value_of(kv.value) for kv in span.attributes}


async def test_spans_reach_the_sink_with_genai_attributes_and_the_clients_parent(tmp_path):
    event = make_event(1, trace_id=TRACE, parent_span_id=PARENT, cost_usd=0.004,
                       api_key_id="k-1a2b", metadata={"customer": "acme-42"})
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, _):
        await otlp.export(ExportBatch("b1", [event]))
    [span] = sink.spans()
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (TRACE, PARENT)
    assert span.name == "chat gpt-4o-mini"
    attrs = attributes(span)
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["meterline.cost_usd"] == 0.004
    assert attrs["meterline.api_key_id"] == "k-1a2b"
    assert attrs["meterline.metadata.customer"] == "acme-42"
    resource = sink.requests["traces"][0].resource_spans[0].resource
    assert attributes(resource) == {"service.name": "meterline"}


async def test_headers_go_as_grpc_metadata(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        headers={"Authorization": "Bearer t0k"}) as (otlp, _):
        await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert sink.metadata[0]["authorization"] == "Bearer t0k"


async def test_logs_and_metrics_are_sent_when_enabled(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        logs=True, metrics=True) as (otlp, _):
        await otlp.export(ExportBatch("b1", [make_event(1), make_event(2)]))
    records = sink.requests["logs"][0].resource_logs[0].scope_logs[0].log_records
    metrics = sink.requests["metrics"][0].resource_metrics[0].scope_metrics[0].metrics
    assert len(records) == 2
    assert {m.name for m in metrics} == {"gen_ai.client.operation.duration",
                                         "gen_ai.client.token.usage"}


async def test_unavailable_is_retried_after_the_servers_retry_delay(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, _):
        sink.failures.append(("traces", grpc.StatusCode.UNAVAILABLE, 7))
        with pytest.raises(RetryableError) as failed:
            await otlp.export(ExportBatch("b1", [make_event(1)]))
        assert failed.value.retry_after == 7
        await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert len(sink.spans()) == 1


async def test_resource_exhausted_with_retry_info_is_retried(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, _):
        sink.failures.append(("traces", grpc.StatusCode.RESOURCE_EXHAUSTED, 2))
        with pytest.raises(RetryableError) as failed:
            await otlp.export(ExportBatch("b1", [make_event(1)]))
        assert failed.value.retry_after == 2


async def test_resource_exhausted_without_retry_info_is_permanent(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, _):
        sink.failures.append(("traces", grpc.StatusCode.RESOURCE_EXHAUSTED, None))
        with pytest.raises(PermanentError, match="RESOURCE_EXHAUSTED"):
            await otlp.export(ExportBatch("b1", [make_event(1)]))


async def test_invalid_argument_is_permanent(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, _):
        sink.failures.append(("traces", grpc.StatusCode.INVALID_ARGUMENT, None))
        with pytest.raises(PermanentError, match="INVALID_ARGUMENT: busy"):
            await otlp.export(ExportBatch("b1", [make_event(1)]))


async def test_an_unreachable_endpoint_is_retryable(tmp_path):
    async with exporter(tmp_path, endpoint=f"http://127.0.0.1:{free_port()}",
                        timeout="2s") as (otlp, _):
        with pytest.raises(RetryableError, match="UNAVAILABLE"):
            await otlp.export(ExportBatch("b1", [make_event(1)]))


async def test_a_retried_batch_does_not_resend_the_signals_already_accepted(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        logs=True) as (otlp, _):
        sink.failures.append(("logs", grpc.StatusCode.UNAVAILABLE, None))
        with pytest.raises(RetryableError):
            await otlp.export(ExportBatch("b1", [make_event(1)]))
        await otlp.export(ExportBatch("b1", [make_event(1)]))
        await otlp.export(ExportBatch("b2", [make_event(2)]))
    assert (len(sink.requests["traces"]), len(sink.requests["logs"])) == (2, 2)


async def test_a_partial_success_is_counted_and_not_retried(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}") as (
            otlp, registry):
        sink.rejected = 1
        await otlp.export(ExportBatch("b1", [make_event(1), make_event(2)]))
        assert metric_value(registry, "meterline_exporter_otlp_rejected_items_total",
                            signal="traces") == 1
    assert len(sink.requests["traces"]) == 1


async def test_a_batch_over_max_request_mb_is_sent_in_requests_the_server_takes(tmp_path):
    async with Sink(max_receive=256 << 10) as sink, exporter(
            tmp_path, endpoint=f"http://127.0.0.1:{sink.port}", max_request_mb=0.25) as (otlp, _):
        await otlp.export(ExportBatch("b1", long_prompts(20, 40_000)))  # 800 KB of prompts
    assert sorted(attributes(s)["meterline.event_id"] for s in sink.spans()) == sorted(
        e.event_id for e in long_prompts(20, 40_000))
    assert len(sink.requests["traces"]) >= 4
    assert all(r.ByteSize() <= 256 << 10 for r in sink.requests["traces"])


async def test_a_retried_batch_does_not_resend_the_parts_already_accepted(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        max_request_mb=0.25) as (otlp, _):
        record, calls = sink.handle, []

        async def second_request_fails_once(signal, request, context, response):
            calls.append(signal)
            if len(calls) == 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
            return await record(signal, request, context, response)

        sink.handle = second_request_fails_once
        batch = long_prompts(20, 40_000)
        with pytest.raises(RetryableError):
            await otlp.export(ExportBatch("b1", batch))
        await otlp.export(ExportBatch("b1", batch))
    assert sorted(attributes(s)["meterline.event_id"] for s in sink.spans()) == sorted(
        e.event_id for e in batch)  # each span once


async def test_an_event_too_big_even_alone_is_refused_and_the_others_sent(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        max_request_mb=0.25) as (otlp, _):
        batch = [*long_prompts(3, size=1000), *long_prompts(1, size=1_000_000, start=3)]
        with pytest.raises(PermanentError, match="over max_request_mb") as refused:
            await otlp.export(ExportBatch("b1", batch))
    assert [e.event_id for e in refused.value.events] == ["evt-00000003"]
    assert len(sink.spans()) == 3


async def test_an_event_too_big_is_still_refused_when_a_later_signal_was_retried(tmp_path):
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        max_request_mb=0.25, metrics=True) as (otlp, _):
        sink.failures.append(("metrics", grpc.StatusCode.UNAVAILABLE, None))
        batch = [*long_prompts(2, size=1000), *long_prompts(1, size=1_000_000, start=2)]
        with pytest.raises(RetryableError):
            await otlp.export(ExportBatch("b1", batch))
        with pytest.raises(PermanentError) as refused:
            await otlp.export(ExportBatch("b1", batch))
    assert [e.event_id for e in refused.value.events] == ["evt-00000002"]
    assert len(sink.spans()) == 2 and len(sink.requests["metrics"]) == 1


@contextlib.asynccontextmanager
async def http_sink(status=200, headers=None, body=b""):
    """An OTLP/HTTP endpoint that records requests and answers as told."""
    seen = []

    async def handle(request):
        seen.append((request.path, dict(request.headers), await request.read()))
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_post("/{path:.*}", handle)
    port = free_port()
    runner = await serve(app, Listen(f"127.0.0.1:{port}"))
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def test_http_protobuf_is_posted_gzipped_with_the_headers(tmp_path):
    async with http_sink() as (port, seen), exporter(
            tmp_path, protocol="http", endpoint=f"http://127.0.0.1:{port}",
            headers={"X-Tenant": "acme"}) as (otlp, _):
        await otlp.export(ExportBatch("b1", [make_event(1)]))
    [(path, headers, body)] = seen
    assert (path, headers["X-Tenant"]) == ("/v1/traces", "acme")
    assert headers["Content-Type"] == "application/x-protobuf"
    # aiohttp's server undoes the gzip; the header says it was sent compressed
    assert headers["Content-Encoding"] == "gzip"
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    assert request.resource_spans[0].scope_spans[0].spans[0].name == "chat gpt-4o-mini"


async def test_http_429_is_retried_after_retry_after(tmp_path):
    async with http_sink(429, {"Retry-After": "3"}) as (port, _), exporter(
            tmp_path, protocol="http", endpoint=f"http://127.0.0.1:{port}") as (otlp, _):
        with pytest.raises(RetryableError) as failed:
            await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert failed.value.retry_after == 3


async def test_http_400_is_permanent_and_says_why(tmp_path):
    status = RpcStatus(code=3, message="bad span").SerializeToString()
    async with http_sink(400, body=status) as (port, _), exporter(
            tmp_path, protocol="http", endpoint=f"http://127.0.0.1:{port}") as (otlp, _):
        with pytest.raises(PermanentError, match="HTTP 400: bad span"):
            await otlp.export(ExportBatch("b1", [make_event(1)]))


async def test_http_an_answer_that_never_ends_is_read_no_further_than_its_status(tmp_path):
    """A collector that accepts (200) and then sends without end: the send is done once
    the answer's start is read (a partial success fits in it), not retried for ever."""
    async with endless_server(200, "application/x-protobuf") as base, exporter(
            tmp_path, protocol="http", endpoint=base) as (otlp, _):
        await asyncio.wait_for(otlp.export(ExportBatch("b1", [make_event(1)])), 10)


def self_signed(tmp_path):
    """A certificate for 127.0.0.1, made with the openssl command."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_a_ca_file_verifies_the_server(tmp_path):
    cert, key = self_signed(tmp_path)
    async with Sink(tls=(key.read_bytes(), cert.read_bytes())) as sink, exporter(
            tmp_path, endpoint=f"127.0.0.1:{sink.port}", tls={"ca_file": str(cert)}) as (otlp, _):
        await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert len(sink.spans()) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_refuses_a_server_it_cannot_verify(tmp_path):
    cert, key = self_signed(tmp_path)
    async with Sink(tls=(key.read_bytes(), cert.read_bytes())) as sink, exporter(
            tmp_path, endpoint=f"https://127.0.0.1:{sink.port}", timeout="2s") as (otlp, _):
        with pytest.raises(RetryableError, match="UNAVAILABLE"):
            await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert sink.spans() == []


ROUND_TRIP = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
  otlp: {{grpc: "127.0.0.1:{grpc}", http: null}}
exporters:
  otlp:
    endpoint: http://127.0.0.1:{grpc}
    logs: {logs}
    batch: {{timeout: 10ms}}
  file:
    path: {{data}}/out.jsonl
    batch: {{timeout: 10ms}}
service:
  data_dir: {{data}}
  admin: null
  pipelines:
    send: {{receivers: [webhook], exporters: [otlp]}}
    receive: {{receivers: [otlp], exporters: [file]}}
"""


async def test_an_otlp_exporter_to_otlp_receiver_round_trip_keeps_the_event(tmp_path):
    webhook, grpc_port = free_port(), free_port()
    sent = event_dicts(0, 3, trace_id=TRACE, parent_span_id=PARENT, cost_usd=0.01,
                       metadata={"team": "search"},
                       input_messages=[{"role": "user", "content": "hi"}])
    for i, event in enumerate(sent):
        event["span_id"] = f"{i + 1:016x}"
    async with running(ROUND_TRIP.format(webhook=webhook, grpc=grpc_port, logs="true"),
                       tmp_path) as service:
        status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events", sent)
        assert status == 200
        # traces and logs each bring the calls back; the second copy of each is dropped
        await eventually(lambda: metric_value(service.telemetry.registry,
                                              "meterline_receiver_refused_events_total",
                                              reason="duplicate") == 3)
        out = await eventually(lambda: len(r := read_jsonl(tmp_path / "data/out.jsonl")) >= 3
                               and r)
    got = sorted((from_dict(e) for e in out), key=lambda e: e.event_id)
    assert got == sorted([from_dict(e) for e in sent], key=lambda e: e.event_id)


async def test_a_senders_attributes_named_like_the_events_fields_do_not_come_back_as_them(
        tmp_path):
    """An `attributes` entry (or a parameter) under a name the event's own fields go out
    under would repeat that key in the span, and the receiver reads the last value: a
    webhook sender's forged usage, cost, model and team would replace the event's."""
    webhook, grpc_port = free_port(), free_port()
    sent = event_dicts(0, 1, input_tokens=1000, cost_usd=2.0, metadata={"team": "search"},
                       params={"model": "gpt-4o-mini", "temperature": 0.5},
                       attributes={"gen_ai.usage.input_tokens": 1, "meterline.cost_usd": 0.0,
                                   "meterline.metadata.team": "other",
                                   "server.address": "api.example"})
    sent[0]["request_model"] = "gpt-5"
    config = ROUND_TRIP.format(webhook=webhook, grpc=grpc_port, logs="false")
    async with running(config, tmp_path):
        status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events", sent)
        assert status == 200
        (back,) = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
    assert (back["request_model"], back["input_tokens"], back["cost_usd"], back["metadata"]) == (
        "gpt-5", 1000, 2.0, {"team": "search"})
    assert back["params"] == {"temperature": 0.5}
    assert back["attributes"] == {"server.address": "api.example"}


async def test_a_span_round_trip_keeps_a_duration_not_reported_unknown_and_a_reported_one_exact(
        tmp_path):
    """A span must end: an event without duration_ms becomes a span of zero length,
    marked as such, so the receiver makes no 0 ms call of it."""
    webhook, grpc_port = free_port(), free_port()
    sent = [*event_dicts(0, 1, duration_ms=None), *event_dicts(1, 1, duration_ms=1234.567891)]
    config = ROUND_TRIP.format(webhook=webhook, grpc=grpc_port, logs="false")
    async with running(config, tmp_path):
        status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events", sent)
        assert status == 200
        out = await eventually(lambda: len(r := read_jsonl(tmp_path / "data/out.jsonl")) >= 2
                               and r)
    assert {e["event_id"]: e.get("duration_ms") for e in out} == {
        "evt-00000000": None, "evt-00000001": 1234.567891}
    assert all("attributes" not in e for e in out)  # the mark is not kept as an attribute


async def test_logs_a_backend_does_not_implement_are_counted_and_the_spans_delivered(tmp_path):
    """Jaeger and Tempo have the trace service only: the batch is delivered (no dead letter,
    whose replay would send the spans twice) and the logs counted as unsupported."""
    async with Sink() as sink, exporter(tmp_path, endpoint=f"http://127.0.0.1:{sink.port}",
                                        logs=True) as (otlp, registry):
        sink.failures = [("logs", grpc.StatusCode.UNIMPLEMENTED, None)] * 2
        await otlp.export(ExportBatch("b1", [make_event(1), make_event(2)]))
        await otlp.export(ExportBatch("b2", [make_event(3)]))
    assert len(sink.spans()) == 3 and sink.requests["logs"] == []
    assert metric_value(registry, "meterline_exporter_otlp_unsupported_events_total",
                        signal="logs") == 3


async def test_http_404_for_a_signal_is_unsupported_not_a_failed_batch(tmp_path):
    async with http_sink(404) as (port, seen), exporter(
            tmp_path, protocol="http", endpoint=f"http://127.0.0.1:{port}",
            traces=False, logs=True) as (otlp, registry):
        await otlp.export(ExportBatch("b1", [make_event(1)]))
    assert [path for path, _, _ in seen] == ["/v1/logs"]
    assert metric_value(registry, "meterline_exporter_otlp_unsupported_events_total",
                        signal="logs") == 1


@pytest.mark.parametrize("tls", [{"insecure_skip_verify": True}, {"key_password": "x"}])
def test_tls_options_grpc_cannot_honour_are_config_errors(tls):
    with pytest.raises(msgspec.ValidationError, match="apply to protocol: http only"):
        convert({"protocol": "grpc", "tls": tls}, OtlpExporterConfig)


def test_insecure_skip_verify_is_taken_over_http():
    config = convert({"protocol": "http", "tls": {"insecure_skip_verify": True}},
                     OtlpExporterConfig)
    assert config.tls.insecure_skip_verify and not config.tls.insecure
