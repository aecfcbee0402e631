"""Exporter `prometheus`: /metrics parsed with prometheus_client's parsers after known events."""

import contextlib
import threading

import aiohttp
import msgspec
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.exporters.prometheus.exporter import PrometheusConfig, PrometheusExporter
from meterline.genai import TTFT_BUCKETS
from tests.helpers import (
    event_dicts,
    eventually,
    free_port,
    make_context,
    make_event,
    metric_value,
    post_json,
    running,
)

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
exporters:
  prometheus:
    listen: "127.0.0.1:{port}"
    batch: {{timeout: 10ms}}
    {extra}
service:
  data_dir: {{data}}
  admin: null
  workers: 1  # no processor to run (tests/helpers.py, INLINE)
  pipelines:
    p: {{receivers: [webhook], exporters: [prometheus]}}
"""

BASE = {"model": "gpt-4o-mini", "operation": "chat", "provider": "openai", "status": "200"}


def samples(text, parse=text_string_to_metric_families):
    return [s for family in parse(text) for s in family.samples]


def value(found, name, **labels):
    """The value of the one sample `name` whose labels include `labels`."""
    matches = [s.value for s in found
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


async def scrape(port, path="/metrics", **headers):
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", headers=headers) as response:
        return response.status, await response.text(), response.headers


class Daemon:
    def __init__(self, tmp_path, extra=""):
        self.webhook, self.port = free_port(), free_port()
        self.body = PIPELINE.format(webhook=self.webhook, port=self.port, extra=extra)
        self.tmp_path = tmp_path
        tmp_path.mkdir(exist_ok=True)

    @contextlib.asynccontextmanager
    async def run(self):
        async with running(self.body, self.tmp_path) as service:
            self.service = service
            yield self

    async def send(self, events):
        status, answer, _ = await post_json(f"http://127.0.0.1:{self.webhook}/v1/events",
                                            [msgspec.to_builtins(e) for e in events])
        assert status == 200, answer
        await eventually(lambda: metric_value(self.service.telemetry.registry,
                                              "meterline_exporter_sent_events_total")
                         >= self.sent + len(events))
        self.sent += len(events)

    sent = 0

    async def samples(self, **headers):
        status, text, _ = await scrape(self.port, **headers)
        assert status == 200
        return samples(text)


async def test_known_events_give_the_seed_metrics(tmp_path):
    events = [make_event(i, input_tokens=10, output_tokens=20, duration_ms=150.0,
                         provider_duration_ms=140.0, overhead_ms=2.0, cost_usd=0.001)
              for i in range(3)]
    events.append(make_event(3, provider="anthropic", request_model="claude-3-5-haiku",
                             input_tokens=5, output_tokens=7, duration_ms=3000.0))
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(events)
        found = await daemon.samples()
    claude = {**BASE, "provider": "anthropic", "model": "claude-3-5-haiku"}
    assert value(found, "llm_gateway_requests_total", **BASE) == 3
    assert value(found, "llm_gateway_requests_total", **claude) == 1
    assert value(found, "llm_gateway_tokens_prompt_total", **BASE) == 30
    assert value(found, "llm_gateway_tokens_completion_total", **BASE) == 60
    assert value(found, "llm_gateway_tokens_total", type="prompt", **claude) == 5
    assert value(found, "llm_gateway_tokens_total", type="completion", **claude) == 7
    assert value(found, "llm_gateway_estimated_cost_usd_total", **BASE) == pytest.approx(0.003)
    assert value(found, "llm_gateway_request_duration_seconds_count", **BASE) == 3
    assert value(found, "llm_gateway_request_duration_seconds_sum", **BASE) == pytest.approx(0.45)
    assert value(found, "llm_gateway_request_duration_seconds_bucket", le="0.08", **BASE) == 0
    assert value(found, "llm_gateway_request_duration_seconds_bucket", le="0.16", **BASE) == 3
    assert value(found, "llm_gateway_request_duration_seconds_bucket", le="2.56", **claude) == 0
    assert value(found, "llm_gateway_request_duration_seconds_bucket", le="5.12", **claude) == 1
    assert value(found, "llm_gateway_provider_duration_seconds_sum", **BASE) == pytest.approx(0.42)
    assert value(found, "llm_gateway_overhead_duration_seconds_bucket", le="0.0025", **BASE) == 3


async def test_counters_and_histograms_scale_by_sample_weight(tmp_path):
    kept = [make_event(i, sample_weight=10.0, input_tokens=3, output_tokens=4, cost_usd=0.5)
            for i in range(2)]
    always = [make_event(9, status_code=500, error_type="server_error", input_tokens=3,
                         output_tokens=4, cost_usd=0.5)]
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(kept + always)
        found = await daemon.samples()
    assert value(found, "llm_gateway_requests_total", error_type="", **BASE) == 20
    assert value(found, "llm_gateway_tokens_prompt_total", **BASE) == 60
    assert value(found, "llm_gateway_tokens_completion_total", **BASE) == 80
    assert value(found, "llm_gateway_estimated_cost_usd_total", **BASE) == pytest.approx(10.0)
    assert value(found, "llm_gateway_request_duration_seconds_count", **BASE) == 20
    failed = {**BASE, "status": "500"}
    assert value(found, "llm_gateway_requests_total", error_type="server_error", **failed) == 1


async def test_a_sampled_pipeline_keeps_the_counter_totals_close_to_the_true_ones(tmp_path):
    events = [make_event(i, input_tokens=10) for i in range(2000)]  # fixed ids: fixed choice
    daemon = Daemon(tmp_path)
    daemon.body = daemon.body.replace("exporters:\n", "processors:\n  sample: {rate: 0.25}\n"
                                      "exporters:\n", 1).replace(
        "[webhook], exporters", "[webhook], processors: [sample], exporters")
    async with daemon.run():
        status, answer, _ = await post_json(f"http://127.0.0.1:{daemon.webhook}/v1/events",
                                            [msgspec.to_builtins(e) for e in events])
        assert status == 200, answer
        registry = daemon.service.telemetry.registry
        dropped = "meterline_sample_sampled_out_events_total"
        kept = 2000 - await eventually(lambda: metric_value(registry, dropped))
        await eventually(lambda: metric_value(registry,
                                              "meterline_exporter_sent_events_total") == kept)
        found = await daemon.samples()
    requests = value(found, "llm_gateway_requests_total", **BASE)
    assert kept < 2000 and requests == 4 * kept  # each kept event stands for 4
    assert abs(requests - 2000) <= 0.05 * 2000
    assert value(found, "llm_gateway_tokens_prompt_total", **BASE) == 10 * requests


async def test_errors_provider_errors_and_rate_limit_hits_are_counted_by_error_type(tmp_path):
    events = [make_event(1, status_code=429, error_type="rate_limit_error", upstream="openai"),
              make_event(2, status_code=503, error_type="service_unavailable", upstream="openai"),
              # refused by the gateway itself before choosing an upstream
              make_event(3, status_code=401, error_type="authentication_error"),
              make_event(4)]
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(events)
        found = await daemon.samples()
    assert value(found, "llm_gateway_errors_total", error_type="rate_limit_error") == 1
    assert value(found, "llm_gateway_errors_total", error_type="authentication_error") == 1
    assert value(found, "llm_gateway_provider_errors_total",
                 error_type="service_unavailable") == 1
    assert not [s for s in found if s.name == "llm_gateway_provider_errors_total"
                and s.labels["error_type"] == "authentication_error"]
    assert value(found, "llm_gateway_rate_limit_hits_total") == 1
    assert sum(s.value for s in found if s.name == "llm_gateway_errors_total") == 3


async def test_a_call_a_guardrail_blocked_is_an_error_but_no_providers_error(tmp_path):
    # the provider answered; an output rule refused the answer
    blocked = make_event(1, status_code=400, error_type="guardrail_blocked", upstream="openai")
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send([blocked])
        found = await daemon.samples()
    assert value(found, "llm_gateway_errors_total", error_type="guardrail_blocked") == 1
    assert not [s for s in found if s.name == "llm_gateway_provider_errors_total"]


async def test_a_call_the_client_cancelled_counts_as_a_request_and_in_no_error(tmp_path):
    cancelled = make_event(1, status_code=499, upstream="openai")
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send([cancelled])
        found = await daemon.samples()
    assert value(found, "llm_gateway_requests_total", error_type="", status="499") == 1
    assert not [s for s in found if s.name in ("llm_gateway_errors_total",
                                               "llm_gateway_provider_errors_total")]


async def test_an_empty_error_type_leaves_the_failure_to_the_status(tmp_path):
    """A client's `"error_type": ""` names no category (ClickHouse stores it as no error
    type, and counts the 500 as an error)."""
    events = [make_event(1, status_code=500, error_type=""),
              make_event(2, status_code=200, error_type="")]
    async with exporter(tmp_path) as (prom, _, _):
        await prom.export(ExportBatch("b1", events))
        found = samples(generate_latest(prom.snapshot()).decode())
    assert value(found, "llm_gateway_errors_total", error_type="server_error") == 1
    assert value(found, "llm_gateway_requests_total", error_type="", status="200") == 1
    assert sum(s.value for s in found if s.name == "llm_gateway_errors_total") == 1


async def test_a_cache_hit_counts_as_a_request_and_a_cache_hit_with_its_saving_not_as_spend(
        tmp_path):
    billed = make_event(1, cost_usd=0.001)
    hit = make_event(2, cache_hit=True, cost_usd=0.004, saved_cost_usd=0.004, sample_weight=2.0)
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send([billed, hit])
        found = await daemon.samples()
    assert value(found, "llm_gateway_requests_total", **BASE) == 3
    assert value(found, "llm_gateway_cache_hits_total", **BASE) == 2
    assert value(found, "llm_gateway_saved_cost_usd_total", **BASE) == pytest.approx(0.008)
    assert value(found, "llm_gateway_estimated_cost_usd_total", **BASE) == pytest.approx(0.001)


async def test_routing_decisions_are_counted_by_method(tmp_path):
    events = [make_event(i, attributes={"meterline.routing_method": method})
              for i, method in enumerate(["explicit", "explicit", "default"])] + [make_event(5)]
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(events)
        found = await daemon.samples()
    assert value(found, "llm_gateway_routing_decisions_total", method="explicit") == 2
    assert value(found, "llm_gateway_routing_decisions_total", method="default") == 1


async def test_routing_methods_the_gateway_does_not_make_count_as_other(tmp_path):
    events = [make_event(i, attributes={"meterline.routing_method": f"made-up-{i}"})
              for i in range(3)] + [make_event(9, attributes={"meterline.routing_method": [7]})]
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(events)
        found = await daemon.samples()
    methods = {s.labels["method"]: s.value for s in found
               if s.name == "llm_gateway_routing_decisions_total"}
    assert methods == {"__other__": 4}


async def test_time_to_first_token_and_inter_token_latency_use_the_genai_buckets(tmp_path):
    event = make_event(1, streaming=True, ttft_ms=30.0, itl_ms=20.0)
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send([event])
        found = await daemon.samples()
    ttft = [s for s in found if s.name == "llm_gateway_time_to_first_token_seconds_bucket"]
    assert [float(s.labels["le"]) for s in ttft] == [*TTFT_BUCKETS, float("inf")]
    assert value(found, "llm_gateway_time_to_first_token_seconds_bucket", le="0.02") == 0
    assert value(found, "llm_gateway_time_to_first_token_seconds_bucket", le="0.04") == 1
    assert value(found, "llm_gateway_inter_token_latency_seconds_bucket", le="0.025") == 1
    assert value(found, "llm_gateway_requests_total", streaming="true") == 1


async def test_buckets_can_be_overridden(tmp_path):
    extra = "buckets: {duration: [0.1, 1, 10]}"
    async with Daemon(tmp_path, extra).run() as daemon:
        await daemon.send([make_event(1, duration_ms=500.0)])
        found = await daemon.samples()
    buckets = [s.labels["le"] for s in found
               if s.name == "llm_gateway_request_duration_seconds_bucket"]
    assert buckets == ["0.1", "1.0", "10.0", "+Inf"]


async def test_user_team_key_and_metadata_labels_appear_only_when_listed(tmp_path):
    event = make_event(1, user_id="u-7", team="search", api_key_name="ci-key",
                       metadata={"customer_id": "acme-42", "feature": "chat"})
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send([event])
        default = await daemon.samples()
    extra = ("labels: [provider, model, user, team, api_key_name, "
             "llm_gateway_metadata_customer_id]")
    async with Daemon(tmp_path / "listed", extra).run() as daemon:
        await daemon.send([event])
        listed = await daemon.samples()
    assert set(value_labels(default, "llm_gateway_requests_total")) == {
        "provider", "model", "status", "streaming", "operation", "error_type"}
    assert value(listed, "llm_gateway_requests_total", user="u-7", team="search",
                 api_key_name="ci-key", llm_gateway_metadata_customer_id="acme-42") == 1
    assert "status" not in value_labels(listed, "llm_gateway_requests_total")


async def test_a_metadata_label_configured_with_its_old_name_gets_the_seed_004_name(tmp_path):
    event = make_event(1, metadata={"customer_id": "acme-42"})
    async with Daemon(tmp_path, "labels: [provider, metadata_customer_id]").run() as daemon:
        await daemon.send([event])
        found = await daemon.samples()
    assert value(found, "llm_gateway_requests_total",
                 llm_gateway_metadata_customer_id="acme-42") == 1
    assert value(found, "llm_gateway_input_tokens",
                 llm_gateway_metadata_customer_id="acme-42") == event.input_tokens
    assert not [s for s in found if "metadata_customer_id" in s.labels]


def value_labels(found, name):
    [labels] = {tuple(sorted(s.labels)) for s in found if s.name == name}
    return labels


async def test_label_sets_beyond_max_series_fold_into_other_and_are_counted(tmp_path):
    events = [make_event(i, request_model=f"model-{i}") for i in range(5)]
    async with Daemon(tmp_path, "max_series: 3").run() as daemon:
        await daemon.send(events)
        found = await daemon.samples()
        folded = metric_value(daemon.service.telemetry.registry,
                              "meterline_prometheus_folded_events_total")
    models = {s.labels["model"]: s.value for s in found if s.name == "llm_gateway_requests_total"}
    assert models == {"model-0": 1, "model-1": 1, "model-2": 1, "__other__": 2}
    assert folded == 2
    assert value(found, "llm_gateway_tokens_prompt_total", model="__other__",
                 provider="__other__") == sum(e.input_tokens for e in events[3:])


@contextlib.asynccontextmanager
async def exporter(tmp_path, **config):
    context = make_context(tmp_path, "prometheus")
    port = free_port()
    instance = PrometheusExporter(convert({"listen": f"127.0.0.1:{port}", **config},
                                          PrometheusConfig), context)
    await instance.start()
    try:
        yield instance, port, context
    finally:
        await instance.shutdown()


async def test_label_sets_without_events_expire(tmp_path):
    async with exporter(tmp_path, metric_expiration="100ms") as (prom, port, context):
        now = [1000.0]
        prom.clock = lambda: now[0]
        await prom.export(ExportBatch("b1", [make_event(1, request_model="old")]))
        now[0] += 0.2  # past the expiration, on the exporter's clock
        await prom.export(ExportBatch("b2", [make_event(2, request_model="new")]))
        found = samples((await scrape(port))[1])
        expired = metric_value(context.telemetry.registry,
                               "meterline_prometheus_expired_series_total")
    assert {s.labels["model"] for s in found if s.name == "llm_gateway_requests_total"} == {"new"}
    assert expired == 1


async def test_a_batch_updates_each_series_once(tmp_path):
    async with exporter(tmp_path) as (prom, _, _):
        changed = prom.store.update([make_event(i) for i in range(100)])
    series = [(family.name, key) for family, key, _ in changed]
    assert len(series) == len(set(series))
    requests = [values for family, _, values in changed if family.name == "llm_gateway_requests"]
    assert requests == [[100.0]]


async def test_openmetrics_when_the_scraper_asks_with_whole_bucket_counts(tmp_path):
    async with exporter(tmp_path) as (prom, port, _):
        await prom.export(ExportBatch("b1", [make_event(1, sample_weight=2.5),
                                             make_event(2, sample_weight=2.5)]))
        status, text, headers = await scrape(
            port, Accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    found = samples(text, openmetrics_families)  # the strict parser: it refuses 2.5 buckets
    assert value(found, "llm_gateway_request_duration_seconds_count") == 5
    assert value(found, "llm_gateway_requests_total") == 5.0


async def test_the_text_format_by_default(tmp_path):
    async with exporter(tmp_path) as (_, port, _):
        status, _, headers = await scrape(port)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")


async def test_a_bearer_token_protects_the_path_when_set(tmp_path):
    async with exporter(tmp_path, auth_token="scrape-me", path="/metrics/ai-gateway") as (
            _, port, _):
        assert (await scrape(port, "/metrics/ai-gateway"))[0] == 401
        ok = await scrape(port, "/metrics/ai-gateway", Authorization="Bearer scrape-me")
        assert (await scrape(port, "/metrics", Authorization="Bearer scrape-me"))[0] == 404
    assert ok[0] == 200 and "llm_gateway_requests_total" in ok[1]


async def test_llm_gateway_instruments_of_the_self_telemetry_are_republished(tmp_path):
    async with exporter(tmp_path) as (_, port, context):
        inflight = context.meter.create_up_down_counter(
            "llm_gateway_requests_inflight", description="Requests being processed")
        inflight.add(3)
        healthy = context.meter.create_gauge("llm_gateway_endpoint_healthy")
        healthy.set(1, {"endpoint": "openai-eu"})
        found = samples((await scrape(port))[1])
    assert value(found, "llm_gateway_requests_inflight") == 3
    assert value(found, "llm_gateway_endpoint_healthy", endpoint="openai-eu") == 1
    assert not [s for s in found if "otel_scope_name" in s.labels]
    assert not [s for s in found if s.name.startswith("meterline_")]


@pytest.mark.parametrize("labels, message", [
    (["provider", "colour"], "unknown label 'colour'"),
    (["metadata_customer-id"], "unknown label 'metadata_customer-id'"),
    (["provider", "provider"], "labels listed twice"),
    (["metadata_team", "llm_gateway_metadata_team"], "labels listed twice"),
])
def test_bad_labels_are_refused_with_the_reason(labels, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        convert({"labels": labels}, PrometheusConfig)


def test_its_queue_is_in_memory_by_default():
    assert PrometheusConfig().queue.type == "memory"


async def test_events_posted_as_json_reach_the_metrics(tmp_path):
    async with Daemon(tmp_path).run() as daemon:
        status, _, _ = await post_json(f"http://127.0.0.1:{daemon.webhook}/v1/events",
                                       event_dicts(0, 4))
        assert status == 200
        await eventually(lambda: metric_value(daemon.service.telemetry.registry,
                                              "meterline_exporter_sent_events_total") == 4)
        found = await daemon.samples()
    assert value(found, "llm_gateway_requests_total") == 4


async def test_a_batch_posted_twice_counts_once(tmp_path):
    events = [make_event(i, input_tokens=10) for i in range(5)]
    async with Daemon(tmp_path).run() as daemon:
        await daemon.send(events)
        await daemon.send(events)  # a client's retry after a timeout: the same event ids
        found = await daemon.samples()
        duplicates = metric_value(daemon.service.telemetry.registry,
                                  "meterline_prometheus_duplicate_events_total")
    assert value(found, "llm_gateway_requests_total", **BASE) == 5
    assert value(found, "llm_gateway_tokens_prompt_total", **BASE) == 50
    assert duplicates == 5


async def test_an_event_id_repeated_within_a_batch_counts_once(tmp_path):
    async with exporter(tmp_path) as (prom, port, _):
        await prom.export(ExportBatch("b1", [make_event(1), make_event(1), make_event(2)]))
        found = samples((await scrape(port))[1])
    assert value(found, "llm_gateway_requests_total", **BASE) == 2


async def test_an_export_that_failed_counts_its_batch_once_when_retried(tmp_path):
    async with exporter(tmp_path) as (prom, port, _):
        update = prom.store.update
        calls = []

        def fails_once(events, now=None):
            calls.append(len(events))
            if len(calls) == 1:
                raise RuntimeError("boom")
            return update(events, now)

        prom.store.update = fails_once
        batch = ExportBatch("b1", [make_event(i) for i in range(3)])
        with pytest.raises(RuntimeError):
            await prom.export(batch)
        await prom.export(batch)  # the delivery loop's retry
        await prom.export(batch)  # and the same events once more
        found = samples((await scrape(port))[1])
    assert calls == [3, 3]
    assert value(found, "llm_gateway_requests_total", **BASE) == 3


async def test_dedupe_ids_0_counts_every_copy(tmp_path):
    async with exporter(tmp_path, dedupe_ids=0) as (prom, port, _):
        for name in ("b1", "b2"):
            await prom.export(ExportBatch(name, [make_event(i) for i in range(3)]))
        found = samples((await scrape(port))[1])
    assert value(found, "llm_gateway_requests_total", **BASE) == 6


async def test_only_the_last_dedupe_ids_event_ids_are_remembered(tmp_path):
    async with exporter(tmp_path, dedupe_ids=2) as (prom, port, _):
        await prom.export(ExportBatch("b1", [make_event(i) for i in range(3)]))
        await prom.export(ExportBatch("b2", [make_event(0), make_event(2)]))  # 0 forgotten
        found = samples((await scrape(port))[1])
    assert value(found, "llm_gateway_requests_total", **BASE) == 4
    assert len(prom.recent) == 2


def test_a_negative_dedupe_ids_is_refused():
    with pytest.raises(msgspec.ValidationError, match="dedupe_ids must be >= 0"):
        convert({"dedupe_ids": -1}, PrometheusConfig)


async def test_batches_are_counted_off_the_event_loop(tmp_path):
    """A batch is milliseconds of Python: counted on the loop, it would hold up every
    client the daemon serves meanwhile."""
    async with exporter(tmp_path) as (prom, port, _):
        update = prom.store.update
        threads = []

        def recording(events, now=None):
            threads.append(threading.current_thread())
            return update(events, now)

        prom.store.update = recording
        await prom.export(ExportBatch("b1", [make_event(i) for i in range(3)]))
        found = samples((await scrape(port))[1])
    assert threads and threading.main_thread() not in threads
    assert value(found, "llm_gateway_requests_total", **BASE) == 3
