"""A generated data set of known totals, through every FinOps report and analytics endpoint.

One daemon (in-process) for the module: the data set goes in through the webhook
and the clickhouse exporter, and every answer comes out of the admin API. Each
expected figure is summed in Python from the generated events (clickhouse_data).
"""

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests import clickhouse_data as data
from tests.helpers import eventually, free_port, metric_value, post_json, running

pytestmark = pytest.mark.asyncio(loop_scope="module")

PIPELINE = """
receivers:
  webhook: {{listen: 127.0.0.1:{port}, max_body_mb: 64}}
exporters:
  clickhouse:
    endpoint: chdb://{{data}}/clickhouse
    batch: {{max_size: 5000, timeout: 20ms}}
  prometheus: {{listen: "127.0.0.1:{prometheus}"}}
service:
  data_dir: {{data}}
  admin: {{listen: "127.0.0.1:{admin}"}}
  pipelines:
    p: {{receivers: [webhook], exporters: [clickhouse, prometheus]}}
extensions:
  finops:
    budget_refresh: 200ms
    budgets:
      search-monthly: {{scope: {{team: search}}, period: month, limit_usd: 40}}
      acme-daily:
        scope: {{metadata: {{customer: acme}}}}
        period: day
        limit_usd: 5
        notify_at: [0.25, 0.5]
      openai-prod: {{scope: {{provider: openai, api_key_name: prod}}, limit_usd: 100000}}
"""


class Api:
    def __init__(self, base, events, webhook, registry, prometheus):
        self.base, self.events, self.webhook, self.registry = base, events, webhook, registry
        self.prometheus = prometheus

    async def get(self, path, status=200, **params):
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}/api/v1/{path}",
                                                       params=params) as r:
            body = await r.json()
            assert r.status == status, body
            return body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finops")
    port, admin, prometheus = free_port(), free_port(), free_port()
    events = data.dataset(datetime.now(UTC))
    async with running(PIPELINE.format(port=port, admin=admin, prometheus=prometheus),
                       tmp) as service:
        status, body, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                          events)
        assert (status, body["accepted"]) == (200, len(events))
        registry = service.telemetry.registry
        await eventually(lambda: metric_value(registry, "meterline_exporter_sent_events_total",
                                              exporter="clickhouse") == len(events), timeout=30)
        yield Api(f"http://127.0.0.1:{admin}", events, f"http://127.0.0.1:{port}/v1/events",
                  registry, f"http://127.0.0.1:{prometheus}/metrics")


def shift(iso, days):
    moved = datetime.fromisoformat(iso.replace("Z", "+00:00")) + timedelta(days=days)
    return moved.strftime("%Y-%m-%dT%H:%M:%SZ")


def money(x):
    return round(x, 6)


def assert_usage(row, expected):
    """A row's requests, errors, tokens and cost equal the summed events'."""
    for figure in ("requests", "errors", "input_tokens", "output_tokens", "total_tokens",
                   "cost_usd"):
        assert row[figure] == money(expected[figure]), figure


def sent(api):
    return metric_value(api.registry, "meterline_exporter_sent_events_total",
                        exporter="clickhouse")


# --- finops reports ----------------------------------------------------------------------
async def test_events_sent_again_through_the_webhook_change_no_answer(api):
    before = sent(api)
    status, _, _ = await post_json(api.webhook, api.events[::3])  # a source re-sending
    assert status == 200
    await eventually(lambda: sent(api) == before + len(api.events[::3]))
    answer = await api.get("finops/spend", by="model", range="90d", top="1000")
    assert_usage(answer["total"], data.totals(data.in_window(api.events, answer)))
    raw = await api.get("finops/spend", by="metadata.customer", range="90d", top="1000")
    expected = data.by(data.in_window(api.events, raw), "metadata.customer")
    for row in raw["rows"]:
        assert_usage(row, expected[row["metadata.customer"]])



@pytest.mark.parametrize("dimension", ["provider", "model", "team", "api_key", "user", "status",
                                       "day", "metadata.customer"])
async def test_spend_by_each_dimension_equals_the_events_sums(api, dimension):
    answer = await api.get("finops/spend", by=dimension, range="30d", top="1000")
    expected = data.by(data.in_window(api.events, answer), dimension)
    assert {row[dimension] for row in answer["rows"]} == set(expected)
    for row in answer["rows"]:
        assert_usage(row, expected[row[dimension]])
        assert row["unpriced_requests"] == expected[row[dimension]]["unpriced_requests"]


@pytest.mark.parametrize("range_", ["24h", "7d", "30d", "90d"])
async def test_spend_totals_over_each_range_equal_the_events_sums(api, range_):
    answer = await api.get("finops/spend", range=range_)
    expected = data.totals(data.in_window(api.events, answer))
    assert expected["requests"] > 0
    assert_usage(answer["total"], expected)


async def test_spend_is_biggest_first_with_cost_per_request_and_per_1k_tokens(api):
    answer = await api.get("finops/spend", by="model", range="90d", top="2")
    expected = data.by(data.in_window(api.events, answer), "model")
    biggest = sorted(expected, key=lambda m: -expected[m]["cost_usd"])[:2]
    assert [row["model"] for row in answer["rows"]] == biggest
    for row in answer["rows"]:
        e = expected[row["model"]]
        assert row["cost_per_request_usd"] == money(e["cost_usd"] / e["requests"])
        assert row["cost_per_1k_tokens_usd"] == money(e["cost_usd"] * 1000 / e["total_tokens"])
        assert row["share"] == round(e["cost_usd"] / answer["total"]["cost_usd"], 4)


async def test_spend_by_api_key_names_the_key(api):
    answer = await api.get("finops/spend", by="api_key")
    names = {row["api_key"]: row["api_key_name"] for row in answer["rows"]}
    assert names == {"k1": "prod", "k2": "staging", None: None}


async def test_growth_compares_each_model_with_the_previous_period(api):
    answer = await api.get("finops/growth", by="model", range="30d", top="1000")
    now = data.by(data.in_window(api.events, answer), "model")
    before = data.by(data.in_window(api.events, answer["previous"]), "model")
    assert {row["model"] for row in answer["rows"]} == set(now) | set(before)
    for row in answer["rows"]:
        cost = now.get(row["model"], {}).get("cost_usd", 0)
        previous = before.get(row["model"], {}).get("cost_usd", 0)
        assert (row["cost_usd"], row["previous_cost_usd"]) == (money(cost), money(previous))
        assert row["change_usd"] == money(cost - previous)
    changes = [row["change_usd"] for row in answer["rows"]]
    assert changes == sorted(changes, reverse=True)


async def test_variance_compares_estimated_and_actual_cost_by_provider(api):
    answer = await api.get("finops/variance", by="provider", range="90d")
    expected = data.by(data.in_window(api.events, answer), "provider")
    assert {row["provider"] for row in answer["rows"]} == {
        p for p, e in expected.items() if e["actual_cost_requests"]}
    for row in answer["rows"]:
        e = expected[row["provider"]]
        assert row["requests_with_actual"] == e["actual_cost_requests"]
        assert row["estimated_cost_usd"] == money(e["estimated_cost_of_actual_usd"])
        assert row["actual_cost_usd"] == money(e["actual_cost_usd"])
        assert row["variance_usd"] == money(e["actual_cost_usd"]
                                            - e["estimated_cost_of_actual_usd"])


async def test_budgets_report_spend_in_their_period_against_the_limit(api):
    answer = {b["budget"]: b for b in await api.get("budgets")}
    scopes = {"search-monthly": lambda e: e.team == "search",
              "acme-daily": lambda e: (e.metadata or {}).get("customer") == "acme",
              "openai-prod": lambda e: e.provider == "openai" and e.api_key_name == "prod"}
    for name, in_scope in scopes.items():
        b = answer[name]
        period = {"since": b["period_start"], "until": b["period_end"]}
        spend = data.totals(e for e in data.in_window(api.events, period) if in_scope(e))
        assert b["spend_usd"] == money(spend["cost_usd"]), name
        assert b["utilization"] == round(spend["cost_usd"] / b["limit_usd"], 4)
        reached = [t for t in b["notify_at"] if spend["cost_usd"] >= t * b["limit_usd"]]
        assert b["threshold_reached"] == (max(reached) if reached else None)


async def test_the_prometheus_exporter_publishes_the_budget_gauges(api):
    spend = {b["budget"]: b["spend_usd"] for b in await api.get("budgets")}

    async def scraped():
        async with aiohttp.ClientSession() as s, s.get(api.prometheus) as r:
            text = await r.text()
        return {sample.labels["budget"]: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "llm_gateway_budget_spend_usd"}

    async def matches():
        return await scraped() == spend

    deadline = asyncio.get_running_loop().time() + 10
    while not await matches():
        assert asyncio.get_running_loop().time() < deadline, await scraped()
        await asyncio.sleep(0.1)


# --- analytics endpoints -----------------------------------------------------------------
async def test_models_gives_each_models_usage_rates_and_rolling_windows(api):
    answer = await api.get("analytics/models", range="90d")
    expected = data.by(data.in_window(api.events, answer), "model")
    assert {m["model"] for m in answer["models"]} == set(expected)
    for m in answer["models"]:
        e = expected[m["model"]]
        assert_usage(m, e)
        assert m["error_rate"] == round(e["errors"] / e["requests"], 4)
        assert m["success_rate"] == round(1 - e["errors"] / e["requests"], 4)
        for label, days in (("24h", 1), ("7d", 7), ("30d", 30)):
            window = {"since": shift(answer["until"], -days), "until": answer["until"]}
            rolled = data.totals(e for e in data.in_window(api.events, window)
                                 if data.model_of(e) == m["model"])
            assert m["rolling"][label]["requests"] == rolled["requests"]
            assert m["rolling"][label]["cost_usd"] == money(rolled["cost_usd"])


async def test_models_latency_is_the_mean_and_percentiles_of_durations(api):
    answer = await api.get("analytics/models", range="90d")
    events = data.in_window(api.events, answer)
    for m in answer["models"]:
        durations = [e.duration_ms for e in events if data.model_of(e) == m["model"]]
        assert m["avg_latency_ms"] == round(sum(durations) / len(durations), 1)
        assert min(durations) <= m["p50_latency_ms"] <= m["p95_latency_ms"] \
            <= m["p99_latency_ms"] <= max(durations)
    [constant] = [m for m in answer["models"] if m["model"] == data.CONSTANT_LATENCY_MODEL]
    assert (constant["p50_latency_ms"], constant["p95_latency_ms"],
            constant["p99_latency_ms"]) == (250.5, 250.5, 250.5)


async def test_models_can_be_filtered_by_provider(api):
    answer = await api.get("analytics/models", range="90d", provider="anthropic")
    expected = data.by([e for e in data.in_window(api.events, answer)
                        if e.provider == "anthropic"], "model")
    assert {m["model"] for m in answer["models"]} == set(expected)
    assert all(m["provider"] == "anthropic" for m in answer["models"])


@pytest.mark.parametrize(("range_", "granularity", "fmt"), [
    ("24h", "hourly", "%Y-%m-%dT%H:00:00Z"), ("30d", "daily", "%Y-%m-%dT00:00:00Z")])
async def test_timeseries_buckets_equal_the_events_in_them(api, range_, granularity, fmt):
    answer = await api.get("analytics/timeseries", range=range_)
    assert answer["granularity"] == granularity
    buckets = {}
    for e in data.in_window(api.events, answer):
        t = datetime.fromtimestamp(e.timestamp / 1e9, UTC).strftime(fmt)
        buckets.setdefault(t, []).append(e)
    assert {p["time"] for p in answer["points"]} >= set(buckets)
    for point in answer["points"]:
        assert_usage(point, data.totals(buckets.get(point["time"], [])))


async def test_providers_gives_models_usage_and_success_rate(api):
    answer = await api.get("analytics/providers", range="90d")
    events = data.in_window(api.events, answer)
    expected = data.by(events, "provider")
    assert {p["provider"] for p in answer["providers"]} == set(expected)
    for p in answer["providers"]:
        e = expected[p["provider"]]
        assert_usage(p, e)
        assert p["model_count"] == len({data.model_of(x) for x in events
                                        if x.provider == p["provider"]})
        assert p["success_rate"] == round(1 - e["errors"] / e["requests"], 4)


@pytest.mark.parametrize("group_by", ["model", "provider", "day"])
async def test_costs_by_each_grouping_add_up(api, group_by):
    answer = await api.get("analytics/costs", range="30d", group_by=group_by)
    events = data.in_window(api.events, answer)
    expected = data.by(events, group_by)
    assert {c["key"] for c in answer["costs"]} == set(expected)
    for c in answer["costs"]:
        assert c["cost_usd"] == money(expected[c["key"]]["cost_usd"])
    assert answer["total_cost_usd"] == money(data.totals(events)["cost_usd"])


async def test_usage_totals_and_models_for_one_user_and_one_model(api):
    answer = await api.get("analytics/usage", range="90d", user_id="u2", model_id="gpt-4o")
    events = [e for e in data.in_window(api.events, answer)
              if e.user_id == "u2" and data.model_of(e) == "gpt-4o"]
    assert_usage(answer["totals"], data.totals(events))
    assert [m["model"] for m in answer["models"]] == ["gpt-4o"]


async def test_performance_gives_latency_ttft_errors_and_throughput(api):
    answer = await api.get("analytics/performance", range="7d")
    events = data.in_window(api.events, answer)
    minutes = (data._ns(answer["until"]) - data._ns(answer["since"])) / 60e9
    for m in answer["models"]:
        mine = [e for e in events if data.model_of(e) == m["model"]]
        e = data.totals(mine)
        assert m["requests"] == e["requests"]
        assert m["error_rate"] == round(e["errors"] / e["requests"], 4)
        assert m["requests_per_minute"] == round(e["requests"] / minutes, 4)
        ttfts = [x.ttft_ms for x in mine if x.ttft_ms is not None]
        assert m["avg_ttft_ms"] == (round(sum(ttfts) / len(ttfts), 1) if ttfts else None)
    totals, e = answer["totals"], data.totals(events)
    assert (totals["requests"], totals["error_rate"]) == (e["requests"],
                                                          round(e["errors"] / e["requests"], 4))
    durations = [x.duration_ms for x in events]
    assert totals["avg_latency_ms"] == round(sum(durations) / len(durations), 1)
    assert min(durations) <= totals["p50_latency_ms"] <= totals["p99_latency_ms"] \
        <= max(durations)


async def test_users_gives_usage_activity_and_cost_efficiency(api):
    answer = await api.get("analytics/users", range="90d", limit="3")
    events = data.in_window(api.events, answer)
    expected = data.by(events, "user")
    top3 = sorted(expected, key=lambda u: -expected[u]["cost_usd"])[:3]
    assert [u["user_id"] for u in answer["users"]] == top3
    for u in answer["users"]:
        mine = [e for e in events if (e.user_id or None) == u["user_id"]]
        assert_usage(u, expected[u["user_id"]])
        assert u["unique_models"] == len({data.model_of(e) for e in mine})
        assert u["providers"] == sorted({e.provider for e in mine})
        days = {data.KEYS["day"](e) for e in mine}
        assert u["days_active"] == len(days)
        first = min(e.timestamp for e in mine) // 1_000_000_000
        assert u["first_request"] == datetime.fromtimestamp(first, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        assert u["max_tokens_single_request"] == max(
            (e.input_tokens or 0) + (e.output_tokens or 0) for e in mine)


@pytest.mark.parametrize(("path", "params", "named"), [
    ("analytics/models", {"range": "5y"}, "range"),
    ("analytics/costs", {"group_by": "colour"}, "colour"),
    ("analytics/users", {"limit": "0"}, "limit"),
    ("analytics/timeseries", {"granularity": "weekly"}, "granularity"),
    ("finops/spend", {"since": "yesterday"}, "since"),
    ("finops/growth", {"by": "day"}, "by"),
    ("finops/spend", {"until": "0001-01-01T00:00:00+00:01"}, "until must be from 1970"),
    ("finops/spend", {"range": "9" * 5000 + "d"}, "range must be at most"),
    ("finops/spend", {"top": "²"}, "top must be a whole number"),
    ("finops/spend", {"top": "9" * 5000}, "top must be a whole number"),
    ("finops/spend", {"by": "colour"}, "by: cannot group by 'colour'"),
    ("analytics/costs", {"group_by": "colour"}, "group_by: cannot group by"),
])
async def test_a_bad_parameter_is_a_400_that_names_it(api, path, params, named):
    answer = await api.get(path, status=400, **params)
    assert named in answer["error"]
