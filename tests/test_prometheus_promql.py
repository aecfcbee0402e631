"""The example PromQL queries of seed 001 return data as written, from a real Prometheus
server scraping the `prometheus` exporter (skipped when `prometheus` is not installed)."""

import asyncio
import contextlib
import shutil
import subprocess
import textwrap
import time

import aiohttp
import msgspec
import pytest

from tests.conftest import eventually, free_port, make_event, metric_value, post_json, running

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs the prometheus server (apt-get install prometheus)")

SEED_001_QUERIES = [
    "rate(llm_gateway_requests_total[5m]) * 60",
    "rate(llm_gateway_request_duration_seconds_sum[5m]) "
    "/ rate(llm_gateway_request_duration_seconds_count[5m])",
    "rate(llm_gateway_tokens_prompt_total[5m]) + rate(llm_gateway_tokens_completion_total[5m])",
    "rate(llm_gateway_provider_errors_total[5m]) / rate(llm_gateway_requests_total[5m]) * 100",
    "rate(llm_gateway_routing_decisions_total[5m])",
    "llm_gateway_requests_inflight",
]

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
exporters:
  prometheus: {{listen: "127.0.0.1:{exporter}", batch: {{timeout: 10ms}}}}
service:
  data_dir: {{data}}
  admin: null
  pipelines:
    p: {{receivers: [webhook], exporters: [prometheus]}}
"""


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


async def query(base, expression):
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{base}/api/v1/query", params={"query": expression}) as response:
            return (await response.json())["data"]["result"]
    except aiohttp.ClientError:
        return []  # the server is still starting


async def results(base, expressions, timeout=30.0):
    """Each expression's result, once every one has data (or what there is at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {e: await query(base, e) for e in expressions}
        if all(found.values()) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_the_seed_001_queries_return_data_as_written(tmp_path):
    webhook, exporter = free_port(), free_port()
    events = [make_event(1, attributes={"meterline.routing_method": "explicit"}),
              make_event(2, status_code=500, error_type="server_error", upstream="openai"),
              make_event(3)]
    async with running(PIPELINE.format(webhook=webhook, exporter=exporter), tmp_path) as service:
        service.telemetry.meter.create_up_down_counter("llm_gateway_requests_inflight").add(2)
        status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events",
                                       [msgspec.to_builtins(e) for e in events])
        assert status == 200
        await eventually(lambda: metric_value(service.telemetry.registry,
                                              "meterline_exporter_sent_events_total") == 3)
        with prometheus_server(tmp_path, f"127.0.0.1:{exporter}") as base:
            found = await results(base, SEED_001_QUERIES)
    assert [e for e, result in found.items() if not result] == []
