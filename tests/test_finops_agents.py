"""The cost of agent runs and conversations, tool calls, MCP requests and guardrail
outcomes, straight from chDB, on known events (tests/agent_data.py): `meterline finops
--by agent|session|trace|tool`, `/api/v1/analytics/agents` and
`/api/v1/analytics/guardrails`, and the `finops` extension's `gateway:` link."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from meterline.component import ExportBatch
from meterline.config import ConfigError, loads
from meterline.event import Event
from meterline.exporters.clickhouse.query import Window
from meterline.extensions.finops import analytics, finops
from meterline.extensions.finops.cli import render
from tests import agent_data
from tests.clickhouse_helpers import clickhouse_exporters

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # (the module's chDB directory)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_exporter(tmp_path_factory):
    """Exporters on the module's chDB directory (chDB opens one per process): each test that
    stores events of its own stores them in a database of its own."""
    async with clickhouse_exporters(tmp_path_factory.mktemp("agents")) as make:
        yield make


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reader(make_exporter):
    """The known events, stored once for the module's tests, which only read them."""
    exporter = await make_exporter("agents")
    await exporter.export(ExportBatch("agents", agent_data.events(NOW_NS)))
    return exporter.reader


# The events are placed 10 to 40 minutes before the window's end, whenever a test runs:
# placed before the time of the test, they left a window taken at import once a slow
# machine ran this module more than 10 minutes later.
NOW = datetime.now(UTC)
NOW_NS = int(NOW.timestamp() * 1e9)
WINDOW = Window.parse("24h", now=NOW)


def rows(report, key):
    return {row[key]: row for row in report["rows"]}


# --- runs: by trace, agent, session --------------------------------------------------------
def test_the_cost_of_a_run_is_that_of_its_model_calls_not_the_agent_events_own(reader):
    run = rows(finops.spend(reader, WINDOW, "trace"), "trace")["t1"]
    # the invoke_agent event's own 0.75 USD and 300 tokens are its model calls' again
    assert (run["cost_usd"], run["llm_calls"], run["total_tokens"]) == (0.75, 2, 300)
    assert (run["tool_calls"], run["avg_tool_latency_ms"]) == (2, 200)
    assert (run["runs"], run["errors"], run["agents"]) == (1, 0, ["planner"])


def test_a_run_is_its_agents_by_the_invoke_agent_event_or_by_its_model_calls(reader):
    by_agent = rows(finops.spend(reader, WINDOW, "agent"), "agent")
    planner, writer = by_agent["planner"], by_agent["writer"]
    assert (planner["runs"], planner["cost_usd"], planner["llm_calls"]) == (2, 1.75, 3)
    assert (planner["tool_calls"], planner["errors"], planner["failed_runs"]) == (3, 1, 1)
    assert (writer["runs"], writer["cost_usd"], writer["llm_calls"]) == (1, 4, 2)
    assert by_agent[None]["cost_usd"] == 0.375  # the calls of no agent


def test_a_session_sums_the_runs_of_its_conversation(reader):
    report = finops.spend(reader, WINDOW, "session")
    s1, s2 = rows(report, "session")["s1"], rows(report, "session")["s2"]
    assert (s1["runs"], s1["cost_usd"], s1["llm_calls"], s1["tool_calls"]) == (2, 1.75, 3, 3)
    assert (s2["runs"], s2["cost_usd"], s2["agents"]) == (1, 4, ["writer"])
    assert report["report"] == "runs" and report["total"]["cost_usd"] == 6.125


def test_a_run_lasts_from_its_first_event_to_the_end_of_its_last(reader):
    run = rows(finops.spend(reader, WINDOW, "trace"), "trace")["t2"]
    # invoke_agent 30 minutes ago; the failed tool call 29.5 minutes ago, for 50 ms
    assert run["avg_run_duration_ms"] == pytest.approx(30_050, abs=0.1)


def test_runs_are_the_top_n_biggest_spenders(reader):
    report = finops.spend(reader, WINDOW, "trace", top=2)
    assert [r["trace"] for r in report["rows"]] == ["t3", "t2"]  # 4 USD, 1 USD


def test_the_total_by_trace_is_every_run_not_only_the_top_ones(reader):
    by_trace = finops.spend(reader, WINDOW, "trace", top=1)
    by_agent = finops.spend(reader, WINDOW, "agent")
    assert len(by_trace["rows"]) == 1
    assert {k: v for k, v in by_trace["total"].items() if k != "agents"} == by_agent["total"]
    assert by_trace["total"]["runs"] > by_trace["rows"][0]["runs"]


# --- tools and MCP -------------------------------------------------------------------------
def test_tools_count_their_calls_errors_latency_and_bytes(reader):
    report = finops.spend(reader, WINDOW, "tool")
    search, fetch = rows(report, "tool")["search"], rows(report, "tool")["fetch"]
    # search: two calls of run t1 (100, 300 ms), one through the gateway's MCP (200 ms)
    assert (search["calls"], search["errors"], search["avg_latency_ms"]) == (3, 0, 200)
    assert (search["p95_latency_ms"], search["request_bytes"], search["response_bytes"]) == (
        300, 192, 768)
    assert (fetch["calls"], fetch["errors"], fetch["error_rate"]) == (1, 1, 1)
    assert report["report"] == "tools" and None not in rows(report, "tool")


def test_the_agents_endpoint_counts_only_runs_of_an_agent(reader):
    answer = analytics.agents(reader, WINDOW)
    assert [a["agent"] for a in answer["agents"]] == ["writer", "planner"]
    assert (answer["totals"]["runs"], answer["totals"]["cost_usd"]) == (3, 5.75)
    assert [t["tool"] for t in answer["tools"]] == ["search", "fetch"]


def test_mcp_connects_are_initialize_requests_with_their_latency(reader):
    mcp = analytics.agents(reader, WINDOW)["mcp"]
    assert (mcp["requests"], mcp["sessions"], mcp["connects"]) == (4, 2, 2)
    assert mcp["avg_connect_latency_ms"] == 50
    methods = {m["method"]: m for m in mcp["methods"]}
    assert set(methods) == {"initialize", "tools/list", "tools/call"}
    assert (methods["initialize"]["calls"], methods["initialize"]["sessions"]) == (2, 2)


@in_module_loop
async def test_an_mcp_request_of_a_session_without_a_method_is_no_model_call(make_exporter):
    """The gateway's GET stream (or DELETE) of an MCP session is an MCP request without
    `mcp_method`: neither a run's model call (counted unpriced) nor a model call guardrails
    count (found by tests/test_finops_reference.py)."""
    since = datetime(2025, 3, 2, tzinfo=UTC)
    at = int(since.timestamp()) + 600
    events = [Event(event_id="call", timestamp=at * 10**9, trace_id="t", operation="chat",
                    provider="openai", request_model="gpt-4o", cost_usd=1.0),
              Event(event_id="stream", timestamp=(at + 60) * 10**9, trace_id="t",
                    provider="mcp", mcp_session_id="m1", status_code=499)]
    exporter = await make_exporter("mcp-stream", database="mcp_stream")
    await exporter.export(ExportBatch("minimal", events))
    window = Window(since, since + timedelta(hours=1))
    run = finops.spend(exporter.reader, window, "trace")["total"]
    guarded = analytics.guardrails(exporter.reader, window)["platform"]
    mcp = analytics.agents(exporter.reader, window)["mcp"]
    assert (run["llm_calls"], run["unpriced_llm_calls"], guarded["requests"]) == (1, 0, 1)
    assert (mcp["requests"], mcp["sessions"]) == (1, 1)


def test_finops_by_agent_prints_runs_cost_and_tool_calls(reader):
    table = render(finops.spend(reader, WINDOW, "agent"), "spend", "table").splitlines()
    assert table[0].startswith("runs by agent, ")
    assert table[1].split() == ["agent", "runs", "cost_usd", "cost_per_run_usd", "llm_calls",
                                "total_tokens", "tool_calls", "avg_tool_latency_ms",
                                "avg_run_duration_ms", "errors", "share",
                                "unpriced_llm_calls"]  # (the guardrail-blocked calls)
    assert table[2].split()[:3] == ["writer", "1", "4"]
    assert table[-1].split()[:3] == ["TOTAL", "12", "6.125"]


def test_costs_cannot_be_grouped_by_tool(reader):
    with pytest.raises(ValueError, match="tool"):
        analytics.costs(reader, WINDOW, group_by="tool")


# --- guardrails ----------------------------------------------------------------------------
PIPELINE = """\
receivers:
  gateway:
    listen: 127.0.0.1:0
    upstreams: {openai: {base_url: "http://127.0.0.1:9", default: true}}
    guardrails: RULES
  webhook: {listen: 127.0.0.1:0}
exporters: {clickhouse: {}}
service: {pipelines: {p: {receivers: [gateway, webhook], exporters: [clickhouse]}}}
"""


def linked(extension: str = "{}", pipeline: str = PIPELINE):
    text = pipeline.replace("RULES", json.dumps(agent_data.RULES))
    return loads(text + f"extensions: {{finops: {extension}}}\n", "pipeline.yaml",
                 {}).extensions["finops"].config


def test_guardrails_count_blocked_and_modified_calls_against_the_gateways_rules(reader):
    config = linked()
    answer = analytics.guardrails(reader, WINDOW, rules=config.guardrails,
                                  gateway=config.gateway)
    assert answer["gateway"] == "gateway"
    assert answer["platform"] == {
        "total_models": 2, "protected_models": 2, "total_rules": 4, "blocked_today": 2,
        "modified_today": 2, "requests": 10, "blocked": 2, "modified": 2, "block_rate": 0.2}
    gpt, claude = answer["models"]
    # gpt-4o: no-pii (both), no-injection (input), no-weapons (gpt-4o*, both)
    assert gpt == {"model": "gpt-4o", "enabled": True, "rules_count": 3, "input_rules": 3,
                   "output_rules": 2, "total_requests": 7, "blocked": 2, "modified": 1,
                   "flagged": 4, "block_rate": 0.2857}
    # claude-sonnet-4: no-pii, no-injection, key-watch (claude-*, output); LiteLLM's redaction
    assert (claude["rules_count"], claude["input_rules"], claude["output_rules"]) == (3, 2, 2)
    assert (claude["blocked"], claude["modified"]) == (0, 1)


def test_guardrail_violations_per_user_are_their_blocked_calls(reader):
    users = {u["user_id"]: u for u in analytics.guardrails(reader, WINDOW)["users"]}
    assert {u: (v["guardrail_violations"], v["modified"]) for u, v in users.items()} == {
        "u1": (2, 0), "u2": (0, 1), "u3": (0, 1)}
    per_user = {u["user_id"]: u for u in analytics.users(reader, WINDOW)["users"]}
    assert per_user["u1"]["guardrail_violations"] == 2


def test_without_a_gateway_the_rule_figures_are_unknown(reader):
    answer = analytics.guardrails(reader, WINDOW)
    assert answer["gateway"] is None
    assert (answer["platform"]["protected_models"], answer["platform"]["total_rules"]) == (
        None, None)
    assert answer["platform"]["blocked"] == 2
    assert {m["enabled"] for m in answer["models"]} == {None}


def test_finops_links_the_gateway_receiver_by_default():
    assert linked().gateway == "gateway"
    assert [r.name for r in linked().guardrails] == [r["name"] for r in agent_data.RULES]
    without = PIPELINE.replace("gateway, webhook", "webhook").split("  webhook:")
    alone = "receivers:\n  webhook:" + without[1]
    assert (linked(pipeline=alone).gateway, linked(pipeline=alone).guardrails) == (None, None)


@pytest.mark.parametrize(("named", "why"), [
    ("gateway/edge", "names receiver 'gateway/edge', which is not defined under receivers"),
    ("webhook", "names receiver 'webhook', which is a webhook receiver, not a gateway one"),
])
def test_a_gateway_option_naming_a_missing_or_other_receiver_is_refused(named, why):
    with pytest.raises(ConfigError) as e:
        linked(f"{{gateway: {named}}}")
    [problem] = [str(p) for p in e.value.problems]
    assert problem == textwrap.dedent(f"""\
        pipeline.yaml:9: extensions.finops: gateway: {why} (gateway receivers here: gateway)""")


def test_growth_by_agent_is_the_cost_of_its_model_calls(reader):
    answer = finops.growth(reader, WINDOW, "agent")
    assert rows(answer, "agent")["planner"]["cost_usd"] == 1.75


@in_module_loop
async def test_growth_by_agent_takes_a_calls_agent_from_its_trace_within_its_own_period(
        make_exporter):
    """A run's `invoke_agent` event in the previous period, its model call (naming no agent)
    in this one: in this period the call is of no agent, as the `runs` report says (found by
    tests/test_finops_reference.py)."""
    since = datetime(2025, 3, 2, tzinfo=UTC)
    window = Window(since, since + timedelta(hours=1))
    at = int(since.timestamp())
    events = [Event(event_id="agent", timestamp=(at - 600) * 10**9, trace_id="t",
                    operation="invoke_agent", agent_name="planner"),
              Event(event_id="call", timestamp=(at + 600) * 10**9, trace_id="t",
                    operation="chat", provider="openai", request_model="gpt-4o", cost_usd=1.0)]
    exporter = await make_exporter("previous-period", database="previous_period")
    await exporter.export(ExportBatch("minimal", events))
    growth = finops.growth(exporter.reader, window, "agent")
    runs = finops.spend(exporter.reader, window, "agent")
    assert [(r["agent"], r["cost_usd"]) for r in runs["rows"]] == [(None, 1)]
    assert [(r["agent"], r["cost_usd"], r["previous_cost_usd"]) for r in growth["rows"]] == [
        (None, 1, 0)]


def test_growth_cannot_be_by_tool(reader):
    with pytest.raises(ValueError, match="tools have no cost"):
        finops.growth(reader, WINDOW, "tool")
