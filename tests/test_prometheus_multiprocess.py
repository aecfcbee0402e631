"""Exporter `prometheus` with `multiprocess_dir`: several processes, one scrape sees the sum."""

import asyncio
import contextlib
import signal
import time

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.exporters.prometheus.exporter import PrometheusConfig, PrometheusExporter
from tests.helpers import free_port, make_context, make_event, metric_value, post_json

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
exporters:
  prometheus:
    listen: "127.0.0.1:{exporter}"
    multiprocess_dir: {{data}}/prometheus
    batch: {{timeout: 10ms}}
service:
  data_dir: {{data}}/{name}
  admin: {{listen: "127.0.0.1:{{admin}}"}}
  pipelines:
    p: {{receivers: [webhook], exporters: [prometheus]}}
"""


async def get(url):
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def sample_values(text, name):
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


class Worker:
    def __init__(self, daemon_factory, name):
        self.webhook, self.exporter = free_port(), free_port()
        self.daemon = daemon_factory(PIPELINE.format(webhook=self.webhook, exporter=self.exporter,
                                                     name=name))
        self.daemon.start()

    async def send(self, events):
        status, _, _ = await post_json(f"http://127.0.0.1:{self.webhook}/v1/events",
                                       [msgspec.to_builtins(e) for e in events])
        assert status == 200
        metrics = f"http://127.0.0.1:{self.daemon.admin_port}/metrics"
        deadline = time.monotonic() + 10
        while sum(sample_values(await get(metrics),
                                "meterline_exporter_sent_events_total").values()) < len(events):
            assert time.monotonic() < deadline, "events not exported"
            await asyncio.sleep(0.05)

    async def scrape(self, name):
        return sample_values(await get(f"http://127.0.0.1:{self.exporter}/metrics"), name)


async def test_one_scrape_sees_the_sum_of_two_processes(daemon_factory):
    first, second = Worker(daemon_factory, "a"), Worker(daemon_factory, "b")
    await first.send([make_event(i, input_tokens=10) for i in range(3)])
    await second.send([make_event(i, input_tokens=10) for i in range(3, 8)])
    for worker in (first, second):
        requests = await worker.scrape("llm_gateway_requests_total")
        assert list(requests.values()) == [8.0]
        prompt = await worker.scrape("llm_gateway_tokens_prompt_total")
        assert list(prompt.values()) == [80.0]
        durations = await worker.scrape("llm_gateway_request_duration_seconds_count")
        assert list(durations.values()) == [8.0]
    assert first.daemon.stop() == 0
    second_after = await second.scrape("llm_gateway_requests_total")
    assert list(second_after.values()) == [8.0]  # a stopped process's counts stay
    second.daemon.signal(signal.SIGTERM)


@contextlib.asynccontextmanager
async def shared_exporter(tmp_path, now=None, **config):
    """A started exporter in multiprocess mode on a free port (its clock `now[0]`, when
    given): (exporter, its context, the port)."""
    context = make_context(tmp_path, "prometheus")
    port = free_port()
    exporter = PrometheusExporter(convert({
        "listen": f"127.0.0.1:{port}", "multiprocess_dir": str(tmp_path / "mp"), **config},
        PrometheusConfig), context)
    if now is not None:
        exporter.clock = lambda: now[0]
    await exporter.start()
    try:
        yield exporter, context, port
    finally:
        await exporter.shutdown()


async def test_self_telemetry_is_shown_per_process(tmp_path):
    async with shared_exporter(tmp_path) as (_, context, port):
        context.meter.create_up_down_counter("llm_gateway_requests_inflight").add(4)
        text = await get(f"http://127.0.0.1:{port}/metrics")
    [(labels, value)] = sample_values(text, "llm_gateway_requests_inflight").items()
    assert value == 4 and dict(labels)["pid"].isdigit()


async def test_a_label_set_no_process_has_seen_for_a_while_is_left_out(tmp_path):
    now = [1000.0]
    async with shared_exporter(tmp_path, now, metric_expiration="100ms") as (exporter, _, port):
        await exporter.export(ExportBatch("b1", [make_event(1, request_model="old")]))
        now[0] += 0.2  # past the expiration, on the exporter's clock
        await exporter.export(ExportBatch("b2", [make_event(2, request_model="new")]))
        requests = sample_values(await get(f"http://127.0.0.1:{port}/metrics"),
                                 "llm_gateway_requests_total")
    assert [dict(labels)["model"] for labels in requests] == ["new"]


async def test_only_label_sets_seen_within_the_expiration_count_toward_max_series(tmp_path):
    now = [1000.0]
    async with shared_exporter(tmp_path, now, max_series=1, metric_expiration="10s") as (
            exporter, context, port):
        for i, (at, model) in enumerate([(1000.0, "a"), (1020.0, "b"), (1040.0, "a")]):
            now[0] = at
            await exporter.export(ExportBatch(f"b{i}", [make_event(i, request_model=model)]))
        requests = sample_values(await get(f"http://127.0.0.1:{port}/metrics"),
                                 "llm_gateway_requests_total")
        folded = metric_value(context.telemetry.registry,
                              "meterline_prometheus_folded_events_total")
    assert folded == 0
    # `b` took the place `a` left; `a` came back in the place `b` left, from its total
    assert {dict(labels)["model"]: value for labels, value in requests.items()} == {"a": 2.0}


async def test_an_export_retried_after_a_failed_shared_write_counts_once(tmp_path):
    async with shared_exporter(tmp_path) as (exporter, _, port):
        write = exporter.shared.write
        failures = [OSError(28, "No space left on device")]

        def fails_once(*args):
            if failures:
                raise failures.pop()
            return write(*args)

        exporter.shared.write = fails_once
        batch = ExportBatch("b1", [make_event(i) for i in range(3)])
        with pytest.raises(OSError):
            await exporter.export(batch)
        await exporter.export(batch)  # the delivery loop's retry
        requests = sample_values(await get(f"http://127.0.0.1:{port}/metrics"),
                                 "llm_gateway_requests_total")
    assert list(requests.values()) == [3.0]


async def test_seed_004_families_add_up_across_processes(tmp_path):
    async with shared_exporter(tmp_path) as (first, _, port), \
            shared_exporter(tmp_path) as (second, _, _):
        await first.export(ExportBatch("b1", [make_event(i, input_tokens=10, policies=[
            "load_balanced"], duration_ms=100.0) for i in range(3)]))
        await second.export(ExportBatch("b2", [make_event(i, input_tokens=10, policies=[
            "load_balanced"], duration_ms=100.0) for i in range(3, 8)]))
        text = await get(f"http://127.0.0.1:{port}/metrics")
    assert list(sample_values(text, "llm_gateway_input_tokens").values()) == [80.0]
    assert list(sample_values(text, "llm_gateway_load_balanced_requests_total").values()) == [8.0]
    assert list(sample_values(text, "llm_gateway_request_processing_ms_count").values()) == [8.0]
    assert list(sample_values(text, "llm_gateway_request_processing_ms_sum").values()) == [
        pytest.approx(800.0)]


async def test_rate_limit_utilization_shows_the_latest_value_of_any_process_not_a_sum(
        tmp_path):
    now = [1000.0]
    async with shared_exporter(tmp_path, now) as (first, _, port), \
            shared_exporter(tmp_path, now) as (second, _, _):
        await first.export(ExportBatch("b1", [make_event(
            1, ratelimit_requests_limit=100, ratelimit_requests_remaining=80)]))
        now[0] += 1
        await second.export(ExportBatch("b2", [make_event(
            2, ratelimit_requests_limit=100, ratelimit_requests_remaining=40)]))
        text = await get(f"http://127.0.0.1:{port}/metrics")
    assert list(sample_values(text, "llm_gateway_rate_limit_utilization_ratio").values()) == [
        pytest.approx(0.6)]
