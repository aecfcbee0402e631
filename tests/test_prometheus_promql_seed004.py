"""Seed 004's queries, evaluated by a real Prometheus server scraping the `prometheus`
exporter, give the figures of known events: the Grafana variable
`label_values(llm_gateway_input_tokens, llm_gateway_metadata_customer_id)` (through the
API Grafana calls for it), tokens and spend by customer and model, cost per 1K tokens,
policy activity. Skipped when `prometheus` is not installed."""

import shutil

import aiohttp
import msgspec
import pytest

from tests.helpers import (
    eventually,
    free_port,
    make_event,
    metric_value,
    pipeline,
    post_json,
    running,
)
from tests.test_prometheus_promql import prometheus_server, query, scraped

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="needs the prometheus server (apt-get install prometheus)")

CUSTOMER = "llm_gateway_metadata_customer_id"


def pipeline_text(webhook, exporter):
    return pipeline({"webhook": {"listen": f"127.0.0.1:{webhook}"}}, exporters={"prometheus": {
        "listen": f"127.0.0.1:{exporter}", "labels": ["provider", "model", CUSTOMER],
        "batch": {"timeout": "10ms"}}})


def traffic():
    """acme-42: two calls of gpt-4o (100 + 300 tokens), globex: one of claude (1000)."""
    def event(i, customer, **fields):
        return make_event(i, metadata={"customer_id": customer}, **fields)
    return [event(1, "acme-42", input_tokens=60, output_tokens=40, cost_usd=0.002,
                  policies=["load_balanced"]),
            event(2, "acme-42", input_tokens=200, output_tokens=100, cost_usd=0.006,
                  policies=["load_balanced", "fallback"]),
            event(3, "globex", provider="anthropic", request_model="claude",
                  input_tokens=800, output_tokens=200, cost_usd=0.03),
            event(4, "", input_tokens=1, output_tokens=1)]  # no customer: no label value


async def label_values(base, label, match):
    async with aiohttp.ClientSession() as session, session.get(
            f"{base}/api/v1/label/{label}/values", params={"match[]": match}) as response:
        return (await response.json())["data"]


async def by(base, expression, *labels):
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1])
            for r in await query(base, expression)}


async def test_the_seed_004_queries_give_the_figures_of_known_events(tmp_path):
    webhook, exporter = free_port(), free_port()
    with prometheus_server(tmp_path, f"127.0.0.1:{exporter}") as base:
        async with running(pipeline_text(webhook, exporter), tmp_path) as service:
            status, _, _ = await post_json(f"http://127.0.0.1:{webhook}/v1/events",
                                           [msgspec.to_builtins(e) for e in traffic()])
            assert status == 200
            await eventually(lambda: metric_value(
                service.telemetry.registry, "meterline_exporter_sent_events_total") == 4)
            await scraped(base, "sum(llm_gateway_input_tokens)", 1061)
            customers = await label_values(base, CUSTOMER, "llm_gateway_input_tokens")
            tokens = await by(base, f"sum by ({CUSTOMER}) (llm_gateway_input_tokens) "
                                    f"+ sum by ({CUSTOMER}) (llm_gateway_output_tokens)",
                              CUSTOMER)
            cost = await by(base, "sum by (model_name) (llm_gateway_request_cost)", "model_name")
            per_1k = await by(base, "sum(llm_gateway_request_cost) / (sum(llm_gateway_input_tokens)"
                                    " + sum(llm_gateway_output_tokens)) * 1000")
            balanced = await by(base, "sum(llm_gateway_load_balanced_requests_total)")
            fallback = await by(base, "sum(llm_gateway_fallback_requests_total)")
    assert sorted(customers) == ["acme-42", "globex"]
    assert tokens == {("acme-42",): 400.0, ("globex",): 1000.0, ("",): 2.0}
    assert cost == pytest.approx({("gpt-4o-mini",): 0.008, ("claude",): 0.03})
    assert per_1k == pytest.approx({(): 0.038 / 1402 * 1000})
    assert balanced == {(): 2.0}
    assert fallback == {(): 1.0}
