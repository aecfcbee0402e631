"""What the Prometheus exporter exposes, configured as the compose edge configures it:
what the Grafana dashboards and the how-tos may name (tests/test_grafana_dashboards.py,
tests/test_howto_examples.py)."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meterline.event import Event, Guardrail
from meterline.exporters.prometheus.exporter import PrometheusExporter
from meterline.extensions.finops.budgets import BudgetGauges
from meterline.gateway.receiver import Instruments
from tests.deploy_files import OPERATOR_SET, load_pipeline
from tests.helpers import ROOT, make_context, make_event

EDGE = ROOT / "deploy" / "compose" / "edge.yaml"


def exposed_metrics(directory: Path) -> dict[str, set[str]]:
    """Sample name -> its label names, as the exporter configured like the compose edge
    exposes them after events that make every metric (and the republished gauges)."""
    edge = load_pipeline(EDGE, {"METERLINE_ADMIN_TOKEN": OPERATOR_SET})
    exporter_config = edge.exporters["prometheus"].config
    context = make_context(directory, "prometheus")
    exporter = PrometheusExporter(exporter_config, context)
    Instruments(context.meter)  # the gateway's live gauges (requests in flight...)
    BudgetGauges.of(context.meter).publish([{
        "budget": "all-monthly", "period": "month", "scope": {"team": "search"}, "member": None,
        "spend_usd": 5.0, "limit_usd": 10.0, "utilization": 0.5, "threshold_reached": 0.5}])
    events = [
        make_event(1, streaming=True, ttft_ms=80.0, itl_ms=12.0, provider_duration_ms=100.0,
                   overhead_ms=1.5, cost_usd=0.25, actual_cost_usd=0.25, team="search",
                   api_key_name="checkout", fallback=True,
                   attributes={"meterline.routing_method": "explicit"}),
        make_event(2, status_code=429, error_type="rate_limit_error", upstream="openai",
                   api_key_id="ak_3f9a", api_key_name="checkout", ratelimit_requests_limit=100,
                   ratelimit_requests_remaining=25),
        *agent_and_policy_events(),
    ]
    exporter.store.update(events, time.time())
    text = generate_latest(exporter.snapshot()).decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def agent_and_policy_events() -> list[Event]:
    """An agent run stopped at its iteration limit, its LLM call, a tool call, an MCP
    connect, and a call every policy and two guardrail rules acted on: what the agents
    and guardrails rows count."""
    agent = {"agent_name": "planner", "agent_id": "agent-7"}
    return [
        make_event(10, operation="invoke_agent", error_type="iteration_limit_reached",
                   duration_ms=4200.0, **agent),
        make_event(11, duration_ms=900.0, **agent),
        make_event(12, operation="execute_tool", tool_name="get-weather", provider="mcp",
                   request_model=None, input_tokens=None, output_tokens=None),
        make_event(13, operation="mcp_initialize", mcp_method="initialize", provider="mcp",
                   request_model=None, input_tokens=None, output_tokens=None),
        make_event(14, policies=["rate_limit", "load_balanced", "fallback", "budget",
                                 "guardrails"],
                   guardrails=[Guardrail(rule="no-pii", stage="input", action="redact"),
                               Guardrail(rule="no-injection", stage="input", action="block")]),
    ]
