"""The example PromQL queries of seed 001, evaluated by a real Prometheus server scraping
the `prometheus` exporter, give the figures the known events make (skipped when
`prometheus` is not installed).

Rates over a window are extrapolated by Prometheus, so their values are not exact
counts; but the same traffic is sent twice (the second time once Prometheus has
scraped the first), so every series starts and grows the same way over the same
scrapes, and every rate is the same multiple of its true increase. Ratios of rates,
and rates compared with each other, are then exact; all are evaluated at one time."""

import asyncio
import contextlib
import shutil
import subprocess
import textwrap
import time

import aiohttp
import msgspec
import openai
import pytest

from meterline.gateway.fakeupstream import FakeUpstream
from tests.helpers import eventually, free_port, make_event, metric_value, post_json, running

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs the prometheus server (apt-get install prometheus)")

REQUEST_RATE = "rate(llm_gateway_requests_total[5m]) * 60"
MEAN_DURATION = ("rate(llm_gateway_request_duration_seconds_sum[5m]) "
                 "/ rate(llm_gateway_request_duration_seconds_count[5m])")
TOKEN_RATE = ("rate(llm_gateway_tokens_prompt_total[5m]) "
              "+ rate(llm_gateway_tokens_completion_total[5m])")
ERROR_RATE_AS_WRITTEN = ("rate(llm_gateway_provider_errors_total[5m]) "
                         "/ rate(llm_gateway_requests_total[5m]) * 100")
ERROR_RATE = ("sum by (provider) (rate(llm_gateway_provider_errors_total[5m])) "
              "/ sum by (provider) (rate(llm_gateway_requests_total[5m])) * 100")
ROUTING_RATE = "rate(llm_gateway_routing_decisions_total[5m])"
INFLIGHT = "llm_gateway_requests_inflight"

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
  gateway:
    listen: "127.0.0.1:{gateway}"
    upstreams: {{openai: {{base_url: "{upstream}", default: true}}}}
    drain_timeout: 100ms
exporters:
  prometheus: {{listen: "127.0.0.1:{exporter}", batch: {{timeout: 10ms}}}}
service:
  data_dir: {{data}}
  admin: null
  pipelines:
    p: {{receivers: [webhook, gateway], exporters: [prometheus]}}
"""


def traffic(round_):
    """One round of calls: openai 2 successes and 1 provider error, anthropic 1 success."""
    def event(i, **fields):
        return make_event(10 * round_ + i, **{"input_tokens": 10, "output_tokens": 20, **fields})
    return [event(1, duration_ms=100.0), event(2, duration_ms=300.0),
            event(3, status_code=500, error_type="server_error", upstream="openai",
                  duration_ms=200.0, input_tokens=None, output_tokens=None),
            event(4, provider="anthropic", request_model="claude", duration_ms=500.0,
                  attributes={"meterline.routing_method": "explicit"})]


@contextlib.contextmanager
def prometheus_server(tmp_path, target):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""
        global: {{scrape_interval: 200ms, evaluation_interval: 1s}}
        scrape_configs:
          - job_name: meterline
            static_configs: [{{targets: ["{target}"]}}]
        """))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the process writes it
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def query(base, expression, at=None):
    params = {"query": expression} if at is None else {"query": expression, "time": str(at)}
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{base}/api/v1/query", params=params) as response:
            return (await response.json())["data"]["result"]
    except aiohttp.ClientError:
        return []  # the server is still starting


async def scraped(base, expression, expected, timeout=30.0):
    """Wait until Prometheus has scraped what makes `expression` equal `expected`."""
    deadline = time.monotonic() + timeout
    while True:
        found = await query(base, expression)
        if found and float(found[0]["value"][1]) == expected:
            return
        assert time.monotonic() < deadline, f"{expression}: {found}, expected {expected}"
        await asyncio.sleep(0.1)


async def scraped_after(base, at, timeout=30.0):
    """Wait until Prometheus holds a scrape that started after `at`: every scrape before
    it is stored then (a target's scrapes are taken one after the other), so every query
    evaluated at `at` sees the same samples, whenever it runs."""
    deadline = time.monotonic() + timeout
    while not any(float(r["value"][1]) > at for r in await query(base, "timestamp(up)")):
        assert time.monotonic() < deadline, f"no scrape after {at}"
        await asyncio.sleep(0.1)


async def values(base, expression, at, *labels):
    """The result of `expression` at time `at`, by the values of `labels`."""
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1])
            for r in await query(base, expression, at)}


async def test_the_seed_001_queries_give_the_figures_of_known_events(tmp_path):
    webhook, exporter, gateway = free_port(), free_port(), free_port()
    with prometheus_server(tmp_path, f"127.0.0.1:{exporter}") as base:
        async with FakeUpstream(latency=60) as upstream, running(PIPELINE.format(
                webhook=webhook, exporter=exporter, gateway=gateway, upstream=upstream.url),
                tmp_path) as service:
            found = await _figures(base, service, upstream, webhook, gateway)
    requests, mean, tokens, as_written, error_rate, routing, inflight = found
    ok, failed, claude = ("openai", "200"), ("openai", "500"), ("anthropic", "200")
    assert set(requests) == {ok, failed, claude}
    assert requests[ok] > 0
    assert requests[ok] == pytest.approx(2 * requests[failed])
    assert requests[claude] == pytest.approx(requests[failed])
    assert mean == pytest.approx({ok: 0.2, failed: 0.2, claude: 0.5})
    assert tokens[("openai",)] == pytest.approx(30 * requests[ok] / 60)  # 30 a call
    assert tokens[("anthropic",)] == pytest.approx(30 * requests[claude] / 60)
    assert as_written == {("openai", "server_error"): 100.0}  # a series divided by itself
    assert error_rate == pytest.approx({("openai",): 100 / 3})
    assert routing == pytest.approx({("explicit",): requests[claude] / 60})
    assert inflight == {(): 1.0}  # the gateway's own gauge: the call still waiting


async def _figures(base, service, upstream, webhook, gateway):
    """Two rounds of traffic with a gateway call pending; the queries' results."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway}/v1", api_key="k",
                                max_retries=0)
    pending = asyncio.create_task(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]))
    try:
        await eventually(lambda: upstream.requests)  # the call is in flight
        for round_ in (1, 2):
            status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events",
                                           [msgspec.to_builtins(e) for e in traffic(round_)])
            assert status == 200
            await eventually(lambda r=round_: metric_value(
                service.telemetry.registry, "meterline_exporter_sent_events_total") == 4 * r)
            await scraped(base, "sum(llm_gateway_requests_total)", 4 * round_)
        await asyncio.sleep(0.5)  # a few more scrapes
        at = time.time()
        await scraped_after(base, at)
        requests = await values(base, REQUEST_RATE, at, "provider", "status")
        mean = await values(base, MEAN_DURATION, at, "provider", "status")
        tokens = await values(base, TOKEN_RATE, at, "provider")
        as_written = await values(base, ERROR_RATE_AS_WRITTEN, at, "provider", "error_type")
        error_rate = await values(base, ERROR_RATE, at, "provider")
        routing = await values(base, ROUTING_RATE, at, "method")
        inflight = await values(base, INFLIGHT, at)
    finally:
        pending.cancel()
        await client.close()
    return requests, mean, tokens, as_written, error_rate, routing, inflight
