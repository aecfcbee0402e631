"""Cache hits, aliases, tags and missing estimates in ClickHouse and the FinOps answers.

A small data set of its own, in the last hour (so answers by rollup dimensions read the
per-minute rollup, the others raw events): a LiteLLM-like proxy in front of OpenAI and
Anthropic, whose aliases (`fast`, `smart`, `claude-haiku`) are in `route`, with the
deployed model in `request_model`. Figures are dyadic fractions: sums are exact.
"""

from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from meterline.component import ExportBatch
from meterline.event import Event
from meterline.exporters.clickhouse.query import Window
from meterline.extensions.finops import analytics, finops
from tests.clickhouse_helpers import clickhouse_exporters

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
HAIKU = "claude-3-5-haiku-20241022"


def call(i: int, provider: str, model: str, route: str, **fields) -> Event:
    at = NOW - timedelta(minutes=10 + i)
    usage = {"input_tokens": 100, "output_tokens": 20}
    return Event(event_id=f"cache-{i}", timestamp=int(at.timestamp()) * 10**9, source="litellm",
                 provider=provider, operation="chat", request_model=model, route=route,
                 status_code=200, **(usage | fields))


EVENTS = [
    call(1, "openai", "gpt-4o-mini", "fast", cost_usd=0.5, actual_cost_usd=0.5, tags=["prod"]),
    # answered from LiteLLM's cache: billed nothing, saved 0.25; stands for two calls
    call(2, "openai", "gpt-4o-mini", "fast", cache_hit=True, cost_usd=0.0, actual_cost_usd=0.0,
         saved_cost_usd=0.25, tags=["prod", "checkout"], sample_weight=2.0),
    # no price for the model: no estimate, while LiteLLM reported 0 (issue 14)
    call(3, "anthropic", HAIKU, "claude-haiku", actual_cost_usd=0.0),
    call(4, "anthropic", HAIKU, "claude-haiku"),
    call(5, "openai", "gpt-4o", "smart", cost_usd=1.0, actual_cost_usd=1.125),
    # a priced model's call without an estimate (no usage reported), with an actual cost
    call(6, "openai", "gpt-4o", "smart", input_tokens=None, output_tokens=None,
         actual_cost_usd=0.25),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def exporter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache-hits")
    async with clickhouse_exporters(tmp, repair_interval=0) as make:
        exporter = await make()
        await exporter.export(ExportBatch("cache-hits", EVENTS))
        yield exporter


@pytest.fixture
def reader(exporter):
    return exporter.reader


def window() -> Window:
    return Window.parse("24h", now=NOW)


def figures(rows, key, *names):
    return {r[key]: tuple(r[n] for n in names) for r in rows}


async def test_a_cache_hit_is_stored_with_cache_hit_saved_cost_and_tags(reader):
    rows = reader.rows("SELECT event_id, cache_hit, saved_cost_usd, tags FROM "
                       "meterline.llm_events WHERE event_id IN ('cache-1', 'cache-2') "
                       "ORDER BY event_id")
    assert [tuple(r.values()) for r in rows] == [
        ("cache-1", None, None, ["prod"]), ("cache-2", True, 0.25, ["prod", "checkout"])]


async def test_spend_by_model_counts_cache_hits_apart_without_spend(reader):
    answer = finops.spend(reader, window(), by="model")
    assert figures(answer["rows"], "model", "requests", "cache_hits", "saved_cost_usd",
                   "cost_usd") == {"gpt-4o-mini": (3, 2, 0.5, 0.5), "gpt-4o": (2, 0, 0, 1),
                                   HAIKU: (2, 0, 0, 0)}
    total = answer["total"]
    assert (total["requests"], total["cache_hits"], total["saved_cost_usd"],
            total["cost_usd"]) == (7, 2, 0.5, 1.5)


async def test_spend_by_route_groups_by_the_alias(reader):
    answer = finops.spend(reader, window(), by="route")
    assert figures(answer["rows"], "route", "requests", "cache_hits", "saved_cost_usd",
                   "cost_usd") == {"fast": (3, 2, 0.5, 0.5), "smart": (2, 0, 0, 1),
                                   "claude-haiku": (2, 0, 0, 0)}


async def test_spend_by_tag_counts_an_event_under_each_of_its_tags(reader):
    answer = finops.spend(reader, window(), by="tag")
    assert figures(answer["rows"], "tag", "requests", "cache_hits", "cost_usd") == {
        "prod": (3, 2, 0.5), "checkout": (2, 2, 0), None: (4, 0, 1)}
    assert answer["total"]["requests"] == 7  # each event once


async def test_a_tag_given_twice_counts_its_event_once_under_it(exporter):
    """(found by tests/test_finops_reference.py: the event was counted twice under `b`; on a
    day of its own, away from the module's events)"""
    day = Window(datetime(2025, 3, 2, tzinfo=UTC), datetime(2025, 3, 3, tzinfo=UTC))
    await exporter.export(ExportBatch("tagged-twice", [Event(
        event_id="tagged-twice", timestamp=int(day.since.timestamp()) * 10**9,
        provider="openai", request_model="gpt-4o", cost_usd=1.0, tags=["b", "b"])]))
    answer = finops.spend(exporter.reader, day, by="tag")
    assert figures(answer["rows"], "tag", "requests", "cost_usd") == {"b": (1, 1)}


async def test_a_cache_hit_that_carries_a_cost_costs_nothing_and_is_not_unpriced(exporter):
    """A client's JSON, through no cost processor, may give a cache hit a cost (or none):
    its estimate is 0 all the same, as in Prometheus's estimated spend (found by
    tests/test_prometheus_clickhouse_agree.py; on a day of its own)."""
    day = Window(datetime(2025, 3, 4, tzinfo=UTC), datetime(2025, 3, 5, tzinfo=UTC))
    at = int(day.since.timestamp()) * 10**9
    await exporter.export(ExportBatch("hits-with-a-cost", [
        Event(event_id=f"hit-with-cost-{i}", timestamp=at + i, provider="openai",
              request_model="gpt-4o", cache_hit=True, cost_usd=cost, actual_cost_usd=0.0)
        for i, cost in enumerate([0.5, None])]))
    total = finops.spend(exporter.reader, day, by="model")["total"]
    assert (total["requests"], total["cache_hits"], total["cost_usd"],
            total["unpriced_requests"]) == (2, 2, 0, 0)
    variance = finops.variance(exporter.reader, day, by="model")["total"]
    assert (variance["estimated_cost_usd"], variance["requests_without_estimate"]) == (0, 0)


async def test_a_saving_on_a_call_that_was_no_cache_hit_is_not_counted(exporter):
    """Only a cache hit saves: a client's JSON may give another call a `saved_cost_usd`,
    which Prometheus leaves out too (found by tests/test_prometheus_clickhouse_agree.py;
    on a day of its own)."""
    day = Window(datetime(2025, 3, 5, tzinfo=UTC), datetime(2025, 3, 6, tzinfo=UTC))
    at = int(day.since.timestamp()) * 10**9
    await exporter.export(ExportBatch("savings", [
        Event(event_id=f"saving-{i}", timestamp=at + i, provider="openai",
              request_model="gpt-4o", cache_hit=hit, cost_usd=0.0 if hit else 0.5,
              saved_cost_usd=0.25) for i, hit in enumerate([True, False, None])]))
    total = finops.spend(exporter.reader, day, by="model")["total"]
    assert (total["cache_hits"], total["saved_cost_usd"], total["cost_usd"]) == (1, 0.25, 1)


async def test_variance_lists_a_model_without_estimate_as_not_estimated_not_as_a_match(reader):
    answer = finops.variance(reader, window(), by="model")
    rows = {r["model"]: r for r in answer["rows"]}
    assert rows[HAIKU] == {
        "model": HAIKU, "requests_with_actual": 1, "requests_without_estimate": 1,
        "estimated_cost_usd": None, "actual_cost_usd": None, "variance_usd": None,
        "variance_ratio": None, "actual_cost_without_estimate_usd": 0}


async def test_variance_compares_only_the_requests_with_an_estimate(reader):
    answer = finops.variance(reader, window(), by="model")
    rows = {r["model"]: r for r in answer["rows"]}
    assert figures([rows["gpt-4o"]], "model", "requests_with_actual",
                   "requests_without_estimate", "estimated_cost_usd", "actual_cost_usd",
                   "variance_usd", "actual_cost_without_estimate_usd") == {
        "gpt-4o": (2, 1, 1, 1.125, 0.125, 0.25)}
    # a cache hit: estimated 0 (billed nothing) against LiteLLM's 0
    assert (rows["gpt-4o-mini"]["estimated_cost_usd"], rows["gpt-4o-mini"]["variance_usd"]) \
        == (0.5, 0)
    total = answer["total"]
    assert (total["requests_with_actual"], total["requests_without_estimate"],
            total["estimated_cost_usd"], total["actual_cost_usd"]) == (6, 2, 1.5, 1.625)


async def test_the_analytics_answers_count_cache_hits_and_savings(reader):
    w = window()
    models = {m["model"]: m for m in analytics.models(reader, w)["models"]}
    assert (models["gpt-4o-mini"]["cache_hits"], models["gpt-4o-mini"]["saved_cost_usd"]) \
        == (2, 0.5)
    providers = {p["provider"]: p for p in analytics.providers(reader, w)["providers"]}
    assert (providers["openai"]["cache_hits"], providers["anthropic"]["cache_hits"]) == (2, 0)
    points = analytics.timeseries(reader, w, granularity="hourly")["points"]
    assert sum(p["cache_hits"] for p in points) == 2
    assert sum(p["saved_cost_usd"] for p in points) == 0.5
    assert analytics.usage_report(reader, w)["totals"]["cache_hits"] == 2
