"""docs/howto/agents.md's examples work as written: every YAML block is a pipeline.yaml
that `meterline validate` accepts, the Python script sends an agent run that the `otlp`
receiver turns into joined events, its SQL runs on the schema the `clickhouse` exporter
creates, and every metric it names is one the `prometheus` exporter exposes."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import clickhouse_connect
import pytest

from meterline.exporters.clickhouse.schema import Schema, ensure_schema
from tests.deploy_files import load_pipeline
from tests.helpers import ROOT
from tests.test_otlp_receiver import Ports, received, running_receiver

AGENTS = ROOT / "docs" / "howto" / "agents.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", AGENTS.read_text(), re.M | re.S)


def test_every_yaml_example_is_a_valid_pipeline(tmp_path):
    examples = blocks("yaml")
    assert len(examples) == 2
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        loaded = load_pipeline(path, {})  # ConfigError, naming every problem, if not
        assert loaded.service.pipelines, f"example {i}"


def test_the_mcp_example_fronts_an_mcp_server(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(blocks("yaml")[1])
    upstreams = load_pipeline(path, {}).receivers["gateway"].config.upstreams
    assert {name: u.protocol for name, u in upstreams.items()} == {
        "openai": "llm", "tools": "mcp", "github": "mcp"}


async def test_the_python_example_sends_an_agent_run_whose_spans_join_by_trace(tmp_path):
    [script] = [b for b in blocks("python") if "invoke_agent" in b]
    ports = Ports()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports.grpc}"}
    async with running_receiver(ports, tmp_path):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script], env=env, capture_output=True,
            text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        events = {e["operation"]: e for e in await received(tmp_path, 3)}
    trace_id = done.stdout.split()[-1]
    assert sorted(events) == ["chat", "execute_tool", "invoke_agent"]
    assert {e["trace_id"] for e in events.values()} == {trace_id}
    run, chat, tool = events["invoke_agent"], events["chat"], events["execute_tool"]
    assert (run["agent_name"], run["session_id"]) == ("planner", "conv-42")
    # the run's usage is kept aside: only the model call counts the tokens
    assert "input_tokens" not in run
    assert run["attributes"]["gen_ai.usage.input_tokens"] == 812
    assert (chat["input_tokens"], chat["agent_name"]) == (812, "planner")
    assert (tool["tool_name"], tool["request_bytes"]) == ("get_weather", len('{"city": "Paris"}'))
    assert chat["parent_span_id"] == tool["parent_span_id"] == run["span_id"]


def test_the_sql_example_runs_on_the_schema_meterline_creates(tmp_path):
    [sql] = blocks("sql")
    client = clickhouse_connect.get_client(interface="chdb", path=str(tmp_path / "ch"))
    try:
        ensure_schema(client, Schema())
        client.query(sql.replace("<the trace id>", "0" * 32))
    finally:
        client.close()


def test_the_metrics_named_are_exposed(exposed):
    text = AGENTS.read_text()
    named = set(re.findall(r"\bllm_gateway_\w+", text))
    histograms = {n for n in named if n.endswith("_ms")}
    wanted = (named - histograms) | {f"{n}_bucket" for n in histograms}
    assert histograms and wanted <= set(exposed), sorted(wanted - set(exposed))


@pytest.mark.parametrize("page", ["prompts-in-archive-only.md", "datadog-splunk-http.md",
                                  "budgets.md"])
def test_the_export_how_tos_yaml_examples_are_valid_pipelines(tmp_path, page):
    text = (ROOT / "docs" / "howto" / page).read_text()
    examples = re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    assert examples
    environ = {"DD_API_KEY": "k", "SPLUNK_HEC_TOKEN": "t", "ES_PASSWORD": "p",
               "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/x", "OPS_TOKEN": "o"}
    for i, example in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(example)
        assert load_pipeline(path, environ).service.pipelines, f"{page} example {i}"


def test_the_budgets_how_to_shows_every_scope_window_notifier_and_action(tmp_path):
    """The example has what the page explains: each scope key, per member, both kinds of
    window, both notifier formats, and enforcement linked to its gateway."""
    [example] = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs" / "howto" / "budgets.md")
                           .read_text(), re.M | re.S)
    path = tmp_path / "pipeline.yaml"
    path.write_text(example)
    environ = {"SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/x",
               "OPS_TOKEN": "o"}
    finops = load_pipeline(path, environ).extensions["finops"].config
    budgets = finops.budgets.values()
    scoped = {key for b in budgets for key in b.scope.describe()}
    assert {"team", "api_key_name", "user", "model", "metadata.customer_id"} <= scoped
    assert {b.per for b in budgets} >= {"user", "metadata.customer_id"}
    assert {b.period for b in budgets} >= {"day", "week", "month"}
    assert {b.window for b in budgets} >= {"24h", "30d"}
    assert {n.format for n in finops.notifiers.values()} == {"slack", "json"}
    assert finops.gateway == "gateway" and "enforce" in {b.action for b in budgets}
