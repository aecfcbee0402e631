"""Reconciliation (billing/reconcile.py) against figures computed by hand from known events and
lines, and pulling the cost APIs (billing/pull.py) from a local fake of them."""

import asyncio
from datetime import UTC, date, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

from meterline.component import ExportBatch
from meterline.exporters.clickhouse.query import Window
from meterline.extensions.finops.billing import pull, reconcile, store
from meterline.extensions.finops.billing.formats import read_file
from meterline.extensions.finops.billing.lines import BillingLine
from meterline.httpclient import AnswerTooLarge
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import ROOT, endless_server, eventually, make_event, metric_value

FIXTURES = ROOT / "tests" / "fixtures" / "billing"
WINDOW = Window(datetime(2025, 11, 3, tzinfo=UTC), datetime(2025, 11, 5, tzinfo=UTC))


def at(day, hour=10):
    return int(datetime(2025, 11, day, hour, tzinfo=UTC).timestamp()) * 10**9


# Events (estimated cost_usd) beside the lines of openai_costs.json and
# anthropic_cost_report.json (billed, see test_billing.EXPECTED).
EVENTS = [
    make_event(1, timestamp=at(3), request_model="gpt-4o-2024-08-06", cost_usd=2.0),
    make_event(2, timestamp=at(3, 11), request_model="gpt-4o", cost_usd=2.5),
    make_event(3, timestamp=at(3), request_model="gpt-4o-mini", cost_usd=0.1),
    make_event(4, timestamp=at(4), request_model="gpt-4o", cost_usd=1.5),
    make_event(5, timestamp=at(3), provider="anthropic",
               request_model="claude-sonnet-4-20250514", cost_usd=8.0),
    make_event(6, timestamp=at(3, 12), provider="anthropic", request_model="claude-sonnet-4",
               cost_usd=8.0),
    make_event(7, timestamp=at(4), provider="mistral_ai", request_model="mistral-large",
               cost_usd=0.7),  # no bill imported for mistral_ai
    make_event(8, timestamp=at(2), request_model="gpt-4o", cost_usd=50.0),  # before the window
]


def figures(estimated, billed, unexplained=0.0):
    variance = billed - estimated
    return {"estimated_cost_usd": estimated, "billed_cost_usd": billed,
            "variance_usd": round(variance, 6),
            "variance_ratio": round(variance / estimated, 4) if estimated else None,
            "unexplained_usd": unexplained}


@pytest.fixture
async def reader(tmp_path):
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make()
        await exporter.export(ExportBatch("a", EVENTS))
        extension = finops_of(exporter)
        reader = await extension.connect()
        for name in ("openai_costs.json", "anthropic_cost_report.json"):
            store.insert(reader.client, reader.schema, read_file(FIXTURES / name)[1])
        yield reader
        await extension.shutdown()


def rows(answer, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]:
            {k: r[k] for k in figures(1, 1)} for r in answer["rows"]}


async def test_reconcile_by_provider_equals_the_figures_by_hand(reader):
    answer = reconcile.reconcile(reader, WINDOW, "provider")
    assert rows(answer, "provider") == {
        "openai": figures(2.0 + 2.5 + 0.1 + 1.5, 1.25 + 3.75 + 0.1 + 2.0),
        "anthropic": figures(16.0, 4.125 + 12.375 + 0.80125, unexplained=0.80125)}
    total = answer["total"]
    assert {k: total[k] for k in figures(1, 1)} == figures(22.1, 24.40125, 0.80125)
    assert (total["billing_lines"], total["requests"]) == (7, 6)
    assert answer["not_billed"] == [{"provider": "mistral_ai", "estimated_cost_usd": 0.7}]
    assert (answer["since"], answer["until"]) == ("2025-11-03T00:00:00Z", "2025-11-05T00:00:00Z")


async def test_reconcile_by_model_matches_snapshot_names_to_the_names_events_use(reader):
    answer = reconcile.reconcile(reader, WINDOW, "model")
    assert rows(answer, "provider", "model") == {
        ("openai", "gpt-4o"): figures(6.0, 7.0),
        ("openai", "gpt-4o-mini"): figures(0.1, 0.1),
        ("anthropic", "claude-sonnet-4"): figures(16.0, 16.5),
        ("anthropic", "claude-3-5-haiku"): figures(0, 0.80125, unexplained=0.80125)}


async def test_reconcile_by_day(reader):
    answer = reconcile.reconcile(reader, WINDOW, "day")
    assert [r["day"] for r in answer["rows"]] == ["2025-11-03", "2025-11-04"]
    assert rows(answer, "day") == {"2025-11-03": figures(20.6, 21.6),
                                   "2025-11-04": figures(1.5, 2.80125, unexplained=0.80125)}


async def test_billed_spend_no_event_explains_is_unexplained(reader):
    """A provider, model and day billed without any event; a line naming no model is
    explained by any event of its provider that day."""
    store.insert(reader.client, reader.schema, read_file(FIXTURES / "aws_cur.csv")[1])
    ungrouped = [BillingLine(f"total-{day}", date(2025, 11, day), "openai", "", 0.5, "USD", 0.5,
                             "openai", "test") for day in (4, 5)]  # 11-05: outside the window
    store.insert(reader.client, reader.schema, ungrouped)
    answer = reconcile.reconcile(reader, WINDOW, "provider")
    [bedrock] = [r for r in answer["rows"] if r["provider"] == "aws.bedrock"]
    assert bedrock == {**bedrock, **figures(0, 4.5 + 0.48 + 1.8, unexplained=6.78),
                       "requests": 0, "billing_lines": 3}
    [openai] = [r for r in answer["rows"] if r["provider"] == "openai"]
    assert openai == {**openai, **figures(6.1, 7.6)}  # openai has events on 11-04
    assert answer["total"]["unexplained_usd"] == round(0.80125 + 6.78, 6)


async def test_reconcile_narrowed_to_a_provider(reader):
    answer = reconcile.reconcile(reader, WINDOW, "model", provider="anthropic")
    assert {r["provider"] for r in answer["rows"]} == {"anthropic"}
    assert answer["total"]["billed_cost_usd"] == 17.30125


# --- the cost APIs, from a local fake ---------------------------------------------------
YESTERDAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(1)


def openai_page(value, more):
    return {"object": "page", "has_more": more, "next_page": "cursor-2" if more else None,
            "data": [{"object": "bucket", "start_time": int(YESTERDAY.timestamp()),
                      "end_time": int(YESTERDAY.timestamp()) + 86400, "results": [
                          {"object": "organization.costs.result",
                           "amount": {"value": value, "currency": "usd"},
                           "line_item": f"gpt-4o-2024-08-06, {'input' if more else 'output'}",
                           "project_id": "proj_1"}]}]}


def anthropic_page(cents, more):
    return {"has_more": more, "next_page": "page_2" if more else None, "data": [
        {"starting_at": YESTERDAY.strftime("%Y-%m-%dT%H:%M:%SZ"),
         "ending_at": (YESTERDAY + timedelta(1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "results": [{"currency": "USD", "amount": cents, "workspace_id": None,
                      "description": None, "cost_type": "tokens", "model": "claude-sonnet-4-5",
                      "token_type": "output_tokens" if more else "uncached_input_tokens",
                      "context_window": "0-200k", "service_tier": "standard"}]}]}


@pytest.fixture
async def fake_apis(monkeypatch):
    """OpenAI's costs and Anthropic's cost report, two pages each, behind their admin keys."""
    monkeypatch.setenv("TEST_OPENAI_ADMIN_KEY", "sk-admin-openai")
    monkeypatch.setenv("TEST_ANTHROPIC_ADMIN_KEY", "sk-ant-admin-1")
    asked = []

    async def openai(request):
        asked.append(("openai", request.query.get("page"), request.query.getall("group_by")))
        if request.headers.get("Authorization") != "Bearer sk-admin-openai":
            return web.json_response({"error": "bad key"}, status=401)
        first = "page" not in request.query
        return web.json_response(openai_page(1.5 if first else 1.0, first))

    async def anthropic(request):
        asked.append(("anthropic", request.query.get("page"), request.query.get("starting_at")))
        if request.headers.get("x-api-key") != "sk-ant-admin-1":
            return web.json_response({"error": "bad key"}, status=401)
        first = "page" not in request.query
        return web.json_response(anthropic_page("250" if first else "50.5", first))

    app = web.Application()
    app.router.add_get("/v1/organization/costs", openai)
    app.router.add_get("/v1/organizations/cost_report", anthropic)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", asked
    await runner.cleanup()


async def test_pulling_the_cost_apis_follows_every_page(fake_apis):
    url, asked = fake_apis
    async with aiohttp.ClientSession() as session:
        openai = await pull.pull(session, "openai", pull.CostApi(
            admin_key_env="TEST_OPENAI_ADMIN_KEY", url=url), days=3)
        anthropic = await pull.pull(session, "anthropic", pull.CostApi(
            admin_key_env="TEST_ANTHROPIC_ADMIN_KEY", url=url), days=3)
    day = YESTERDAY.date()
    assert [(x.day, x.provider, x.model, x.amount) for x in openai + anthropic] == [
        (day, "openai", "gpt-4o", 1.5), (day, "openai", "gpt-4o", 1.0),
        (day, "anthropic", "claude-sonnet-4-5", 2.5), (day, "anthropic", "claude-sonnet-4-5",
                                                       0.505)]
    assert asked[:2] == [("openai", None, ["line_item", "project_id"]),
                         ("openai", "cursor-2", ["line_item", "project_id"])]
    assert [a[1] for a in asked[2:]] == [None, "page_2"]
    assert asked[2][2] == (YESTERDAY - timedelta(1)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_cost_api_page_that_never_ends_is_refused_past_its_bound(monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_ADMIN_KEY", "sk-admin-test")
    async with endless_server() as url, aiohttp.ClientSession() as session:
        with pytest.raises(AnswerTooLarge, match="passed 33,554,432 bytes"):
            await asyncio.wait_for(pull.pull(session, "openai", pull.CostApi(
                admin_key_env="TEST_OPENAI_ADMIN_KEY", url=url), days=1), 20)


async def test_a_pull_without_its_admin_key_says_which_variable_to_set():
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ValueError, match=r"billing.openai: the environment variable "
                                             "NO_SUCH_KEY_VAR"):
            await pull.pull(session, "openai", pull.CostApi(admin_key_env="NO_SUCH_KEY_VAR"), 1)


async def test_the_extension_pulls_on_schedule_and_publishes_the_variance_gauge(
        tmp_path, fake_apis):
    url, _ = fake_apis
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make()
        noon = int((YESTERDAY + timedelta(hours=12)).timestamp()) * 10**9
        await exporter.export(ExportBatch("a", [
            make_event(1, timestamp=noon, request_model="gpt-4o", cost_usd=2.0),
            make_event(2, timestamp=noon, provider="anthropic", request_model="claude-sonnet-4-5",
                       cost_usd=3.0)]))
        extension = finops_of(exporter, billing={
            "openai": {"admin_key_env": "TEST_OPENAI_ADMIN_KEY", "url": url},
            "anthropic": {"admin_key_env": "TEST_ANTHROPIC_ADMIN_KEY", "url": url},
            "refresh": "100ms", "lookback_days": 2})
        await extension.start()
        registry = extension.context.telemetry.registry

        def gauge(name, provider):
            return metric_value(registry, name, provider=provider)

        await eventually(lambda: gauge("meterline_billing_billed_usd", "anthropic") == 3.005,
                         timeout=30)
        # openai: 2.5 billed against 2.0 estimated; anthropic 3.005 against 3.0
        assert gauge("meterline_billing_variance_ratio", "openai") == 0.25
        assert gauge("meterline_billing_estimated_usd", "openai") == 2.0
        assert gauge("meterline_billing_variance_ratio", "anthropic") == 0.0017
        reader = await extension.connect()
        assert store.count(reader.client, reader.schema) == 4  # pulled again: still 4 lines
        await extension.shutdown()
        assert gauge("meterline_billing_billed_usd", "openai") == 0  # gone with it


def test_whole_days_widens_a_window_to_the_bills_grain():
    w = Window.parse("24h", now=datetime(2025, 11, 4, 10, 30, tzinfo=UTC))
    assert reconcile.whole_days(w) == WINDOW
    assert date(2025, 11, 3) == reconcile.whole_days(w).since.date()
