"""The Grafana dashboards in deploy/grafana ask only for what meterline really produces.

The Prometheus dashboard's metric and label names are checked against what the real
`prometheus` exporter exposes, configured as the compose edge configures it and fed
events that make every metric, parsed back with prometheus_client's own parser. The
FinOps dashboard's SQL runs, Grafana macros replaced, on chDB holding the schema the
`clickhouse` exporter creates: a wrong table or column fails the query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from typing import Any

import clickhouse_connect
import pytest
import yaml

from meterline.exporters.clickhouse.schema import Schema, ensure_schema
from tests.helpers import ROOT, make_event

GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS_DASHBOARD = GRAFANA / "dashboards" / "meterline-llm.json"
FINOPS_DASHBOARD = GRAFANA / "dashboards" / "meterline-finops.json"
EDGE = ROOT / "deploy" / "compose" / "edge.yaml"
PROMTOOL = shutil.which("promtool")

# Labels Prometheus adds to every scraped series (prometheus.yml's targets add `tier`).
TARGET_LABELS = {"job", "instance", "tier"}
# Grafana's variables, as a query would see them.
PROMQL_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$provider": ".*",
                    "$model": ".*"}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def load(path) -> dict[str, Any]:
    return json.loads(path.read_text())


# --- Prometheus ------------------------------------------------------------------------
def promql_expressions() -> list[str]:
    """Every query of the Prometheus dashboard (panels and variables), variables replaced."""
    dashboard = load(PROMETHEUS_DASHBOARD)
    found = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
    found += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for name, value in PROMQL_VARIABLES.items():
        found = [e.replace(name, value) for e in found]
    return found


def metric_names(expression: str) -> set[str]:
    return set(re.findall(r"(?<![:\w])(?:llm_gateway|meterline)_\w+", expression))


def labels_used(expression: str) -> set[str]:
    """Label names in `by (...)` clauses, selectors' matchers and label_values()."""
    used: set[str] = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expression):
        used.update(name.strip() for name in group.split(",") if name.strip())
    for selector in re.findall(r"\{([^}]*)\}", expression):
        used.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    used.update(re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", expression))
    return used


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (apt-get install prometheus)")
def test_every_prometheus_dashboard_query_is_valid_promql(tmp_path):
    expressions = [e for e in promql_expressions() if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(expressions)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", "rules.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_dashboard_uses_only_metrics_the_exporter_exposes(exposed):
    used = set().union(*map(metric_names, promql_expressions()))
    assert used and used <= set(exposed), sorted(used - set(exposed))


def test_the_prometheus_dashboard_uses_only_labels_its_metrics_carry(exposed):
    wrong = []
    for expression in promql_expressions():
        labels = labels_used(expression)
        for name in metric_names(expression):
            carried = exposed.get(name, set()) | TARGET_LABELS
            if name.endswith("_bucket"):
                carried = carried | {"le"}
            wrong += [f"{name}: {label}" for label in sorted(labels - carried)]
    assert wrong == []


def test_the_prometheus_dashboard_has_the_agents_and_guardrails_rows():
    rows: dict[str, list[str]] = {}
    for panel in load(PROMETHEUS_DASHBOARD)["panels"]:
        if panel["type"] == "row":
            rows[panel["title"]] = []
        else:
            list(rows.values())[-1].append(panel["title"])
    assert rows["Agents and MCP"] == [
        "Agent run duration p50 / p95", "Agent LLM call latency p50 / p95",
        "MCP connect latency p50 / p95", "Tool calls / s by tool", "Tool latency p95 by tool",
        "Agent runs and iteration-limit hits / s"]
    assert rows["Guardrails and policies"] == [
        "Guardrail hits / s by rule and action", "Blocked vs redacted / s",
        "Policy activity / s", "Rate-limit utilization by provider and key"]


def test_the_agents_and_guardrails_rows_query_every_agent_and_policy_metric():
    used = set().union(*map(metric_names, promql_expressions()))
    wanted = {f"llm_gateway_agent_{name}_ms_bucket" for name in (
        "request_duration", "llm_latency", "tool_latency", "mcp_connect_latency")}
    wanted |= {f"llm_gateway_{name}_requests_total" for name in (
        "rate_limit", "load_balanced", "fallback", "budget", "guardrails")}
    wanted |= {"llm_gateway_agent_tool_calls_total", "llm_gateway_rate_limit_utilization_ratio",
               "llm_gateway_agent_request_iteration_limit_reached_total"}
    assert wanted <= used, sorted(wanted - used)


def test_the_dashboards_panels_have_unique_ids_and_do_not_overlap():
    for path in (PROMETHEUS_DASHBOARD, FINOPS_DASHBOARD):
        every = load(path)["panels"]
        ids = [p["id"] for p in every]
        assert len(ids) == len(set(ids)), path.name
        cells: dict[tuple[int, int], str] = {}
        for panel in every:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} over {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]


# --- ClickHouse ------------------------------------------------------------------------
# Grafana ClickHouse macros and the dashboard's variables, as ClickHouse expressions.
SQL_MACROS = [
    (re.compile(r"\$__timeFilter\((\w+)\)"),
     r"\1 >= now() - INTERVAL 30 DAY AND \1 <= now() + INTERVAL 1 HOUR"),
    (re.compile(r"\$\{metadata_key\}"), "customer_id"),
]


def finops_queries() -> list[tuple[str, str]]:
    """(panel title, SQL with the macros replaced) of every FinOps panel."""
    out = []
    for panel in panels(load(FINOPS_DASHBOARD)):
        for target in panel["targets"]:
            sql = target["rawSql"]
            for pattern, replacement in SQL_MACROS:
                sql = pattern.sub(replacement, sql)
            out.append((panel["title"], sql))
    return out


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory):
    """chDB with meterline's schema and a few events of the last hours (the views fill the
    rollups), one with a reported cost and metadata."""
    client = clickhouse_connect.get_client(
        interface="chdb", path=str(tmp_path_factory.mktemp("clickhouse") / "ch"))
    schema = Schema()
    ensure_schema(client, schema)
    now_ns = time.time_ns()
    events = [make_event(i, timestamp=now_ns - (i + 1) * 3_600_000_000_000, team="search",
                         api_key_id="ak_3f9a", api_key_name="checkout", cost_usd=0.5,
                         actual_cost_usd=0.625 if i == 0 else None,
                         metadata={"customer_id": "acme"}) for i in range(3)]
    client.insert(schema.qualified(schema.events), schema.column_batch(events),
                  column_names=[c.name for c in schema.inserted], column_oriented=True)
    yield client
    client.close()


def test_every_finops_query_runs_on_the_schema_meterline_creates(clickhouse):
    failed = []
    for title, sql in finops_queries():
        try:
            clickhouse.query(sql)
        except Exception as e:  # the driver's error names the unknown table or column
            failed.append(f"{title}: {str(e).splitlines()[0]}")
    assert failed == []


def test_every_finops_query_finds_the_recent_events(clickhouse):
    empty = [title for title, sql in finops_queries() if not clickhouse.query(sql).result_rows]
    assert empty == []


def test_the_finops_dashboard_reads_only_tables_meterline_creates(clickhouse):
    tables = {name for (name,) in clickhouse.query(
        "SELECT name FROM system.tables WHERE database = 'meterline'").result_rows}
    named = {t for _, sql in finops_queries() for t in re.findall(r"meterline\.(\w+)", sql)}
    assert named and named <= tables, named - tables


# --- provisioning ----------------------------------------------------------------------
def test_the_dashboards_default_to_the_provisioned_datasources():
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "datasources.yaml").read_text())
    uids = {d["type"]: d["uid"] for d in provisioned["datasources"]}
    for path in (PROMETHEUS_DASHBOARD, FINOPS_DASHBOARD):
        dashboard = load(path)
        [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
        assert variable["current"]["value"] == uids[variable["query"]]
        assert {p["datasource"]["uid"] for p in panels(dashboard)} == {"${datasource}"}
