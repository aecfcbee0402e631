"""The memory limiter in the data path: receivers push back, nothing is queued."""

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from meterline.exporters.otlp.encode import to_traces_request
from tests.helpers import (
    free_port,
    make_event,
    metric_value,
    post_json,
    read_jsonl,
    running,
    webhook_to_file,
)
from tests.helpers import pipeline as pipeline_of


def pipeline(port, limit, workers=1):
    """The webhook into the file exporter, the memory limiter at `limit` MiB."""
    return webhook_to_file(port, file={"batch": {}}, service={
        "workers": workers, "memory_limiter": {"limit_mib": limit, "check_interval": "2s"}})


async def test_the_webhook_answers_429_with_retry_after_above_the_soft_limit(tmp_path):
    port = free_port()
    async with running(pipeline(port, 8), tmp_path) as service:
        status, body, headers = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                                [{"provider": "openai"}])
        assert status == 429 and "memory" in str(body)
        assert headers["Retry-After"] == "2"
        assert read_jsonl(tmp_path / "data" / "out.jsonl") == []
        assert metric_value(service.telemetry.registry, "meterline_receiver_refused_events_total",
                            receiver="webhook", reason="memory_limit") == 1


async def test_a_body_decoded_in_a_worker_is_refused_whole_above_the_soft_limit(tmp_path):
    port = free_port()
    async with running(pipeline(port, 8, workers=2), tmp_path) as service:
        status, body, headers = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                                [{"provider": "openai"}] * 3)
        assert status == 429 and "memory" in str(body)
        assert headers["Retry-After"] == "2"
        assert read_jsonl(tmp_path / "data" / "out.jsonl") == []
        assert metric_value(service.telemetry.registry, "meterline_receiver_refused_events_total",
                            receiver="webhook", reason="memory_limit") == 3


async def test_otlp_calls_above_the_soft_limit_are_refused_before_any_processor_runs(
        tmp_path):
    port = free_port()
    body = pipeline_of({"otlp": {"grpc": f"127.0.0.1:{port}", "http": None}},
                       {"labels": {}}, None,
                       {"workers": 2, "memory_limiter": {"limit_mib": 8, "check_interval": "2s"}})
    async with running(body, tmp_path) as service, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async def _processed(*args):
            raise AssertionError("the calls were processed before being refused")

        service.pool.process_encoded = _processed
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await TraceServiceStub(channel).Export(to_traces_request(
                [make_event(1), make_event(2)]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert metric_value(service.telemetry.registry, "meterline_receiver_refused_events_total",
                            receiver="otlp", reason="memory_limit") == 2


async def test_the_webhook_accepts_below_the_soft_limit(tmp_path):
    port = free_port()
    async with running(pipeline(port, 16384), tmp_path):
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          [{"provider": "openai"}])
        assert (status, body["accepted"]) == (200, 1)


async def test_a_reload_applies_new_memory_limits_to_the_running_daemon(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/events"
    async with running(pipeline(port, 16384), tmp_path) as service:
        assert (await post_json(url, [{"provider": "openai"}]))[0] == 200
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("limit_mib: 16384", "limit_mib: 8"))
        assert await service.reload(str(path))
        service.limiter.check()  # the next timer tick, without waiting for it
        assert (await post_json(url, [{"provider": "openai"}]))[0] == 429
