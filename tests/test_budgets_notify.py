"""Budgets that act: scopes and windows read from a chDB ClickHouse filled through the
exporter, and threshold crossings notified to a local webhook exactly once, across
restarts and a failing webhook."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.extensions.finops import budgets
from meterline.extensions.finops.budgets import Budget, usd
from meterline.extensions.finops.crossings import Marks
from meterline.extensions.finops.notifiers import (
    NOTIFICATION,
    NotifierConfig,
    WebhookExporter,
    slack_body,
)
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import endless_server, eventually, free_port, make_event, metric_value

NOW = datetime.now(UTC)


def spend(i: int, cost: float, ago: timedelta = timedelta(minutes=1), **fields):
    at = int((NOW - ago).timestamp() * 1e9)
    return make_event(i, timestamp=at, cost_usd=cost, **fields)


@pytest.fixture
async def make_exporter(tmp_path):
    async with clickhouse_exporters(tmp_path, rollup_metadata=["customer"]) as make:
        yield make


class Webhook:
    """A local webhook: records each POST's body; answers 500 to the first `fail` ones
    (`status` to them: 400 refuses them for good)."""

    def __init__(self, fail: int = 0, status: int = 500) -> None:
        self.bodies: list[dict] = []
        self.ids: list[str] = []
        self.fail = fail
        self.status = status
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail:
            self.fail -= 1
            return web.Response(status=self.status, text="down")
        self.bodies.append(await request.json())
        self.ids.append(request.headers["X-Meterline-Notification-Id"])
        return web.Response(text="ok")

    async def __aenter__(self) -> Webhook:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def budget(**options) -> Budget:
    return convert({"limit_usd": 10, **options}, Budget)


async def test_scopes_and_windows_are_read_from_the_rollups(make_exporter):
    exporter = await make_exporter()
    await exporter.export(ExportBatch("a", [
        spend(1, 3.0, user_id="ann", team="search", metadata={"customer": "acme"}),
        spend(2, 4.0, user_id="bob", team="search", api_key_id="k1"),
        spend(3, 9.0, ago=timedelta(days=3), user_id="ann", team="ads", api_key_id="k1"),
        spend(4, 2.0, ago=timedelta(days=40), user_id="ann", team="search"),
    ]))
    budgeted = {
        "ann-24h": budget(scope={"user": "ann"}, window="24h"),
        "ann-7d": budget(scope={"user": "ann"}, window="7d"),
        "search-day": budget(scope={"team": "search"}, period="day"),
        "key": budget(scope={"api_key_id": "k1"}, window="30d"),
        "acme": budget(scope={"metadata": {"customer": "acme"}}, window="7d"),
        "per-user": budget(per="user", window="7d", notify_at=[0.3]),
        "per-team": budget(per="team", window="7d", notify_at=[0.3]),
    }
    rows = budgets.status(exporter.reader, budgeted, now=NOW)
    spent = {(r["budget"], r["member"]): r["spend_usd"] for r in rows}
    assert spent == {("ann-24h", None): 3, ("ann-7d", None): 12, ("search-day", None): 7,
                     ("key", None): 13, ("acme", None): 3, ("per-user", "ann"): 12,
                     ("per-user", "bob"): 4, ("per-team", "search"): 7, ("per-team", "ads"): 9}
    ann = next(r for r in rows if r["budget"] == "ann-7d")
    assert (ann["status"], ann["threshold_reached"], ann["rolling"]) == ("exceeded", 1.0, True)
    week = budget(period="week").window_at(NOW)
    assert week.since.weekday() == 0 and week.length == timedelta(days=7)


def test_a_budget_takes_a_calendar_period_or_a_rolling_window_not_both():
    with pytest.raises(ValueError, match="not both"):
        budget(period="day", window="24h")
    with pytest.raises(ValueError, match="per must be"):
        budget(per="colour")
    assert budget().period == "month"


async def notifying(make_exporter, hook: Webhook, fmt: str = "json", **budget_options):
    """A finops extension (not started) on a fresh exporter's tables, with one budget
    notifying `hook` every 50ms."""
    exporter = await make_exporter()
    notifier = {"url": hook.url, "format": fmt,
                "retry": {"initial_interval": "50ms", "max_interval": "100ms"}}
    config = {"budget_refresh": "50ms", "notifiers": {"hook": notifier},
              "budgets": {"acme": {"limit_usd": 10, "notify_at": [0.5, 1.0],
                                   "scope": {"metadata": {"customer": "acme"}},
                                   "notify": ["hook"], **budget_options}}}
    return exporter, config


async def settle():
    await asyncio.sleep(0.4)  # several evaluations


async def test_a_crossing_is_notified_once_across_restarts(make_exporter, tmp_path):
    async with Webhook() as hook:
        exporter, config = await notifying(make_exporter, hook)
        await exporter.export(ExportBatch("a", [spend(1, 6.0, metadata={"customer": "acme"})]))
        first = finops_of(exporter, **config)
        await first.start()
        await eventually(lambda: len(hook.bodies) == 1)
        await settle()
        await first.shutdown()
        second = finops_of(exporter, **config)  # the same data directory
        await second.start()
        await settle()
        await second.shutdown()
        assert len(hook.bodies) == 1
        config["budgets"]["acme"]["limit_usd"] = 6  # the next threshold, crossed now
        third = finops_of(exporter, **config)
        await third.start()
        await eventually(lambda: len(hook.bodies) == 2)
        await settle()
        await third.shutdown()
    assert [b["threshold"] for b in hook.bodies] == [0.5, 1.0]
    assert len(set(hook.ids)) == 2
    body = hook.bodies[1]
    assert body["type"] == "budget_threshold_crossed"
    assert (body["budget"], body["scope"], body["spend_usd"], body["limit_usd"]) == (
        "acme", {"metadata.customer": "acme"}, 6, 6)
    assert body["window_start"] < body["crossed_at"] < body["window_end"]


async def test_a_failing_webhook_gets_the_notification_once_it_answers(make_exporter):
    async with Webhook(fail=3) as hook:
        exporter, config = await notifying(make_exporter, hook, fmt="slack")
        await exporter.export(ExportBatch("a", [spend(1, 12.0, metadata={"customer": "acme"})]))
        extension = finops_of(exporter, **config)
        await extension.start()
        await eventually(lambda: len(hook.bodies) == 1)
        await settle()
        await extension.shutdown()
    [body] = hook.bodies  # one notification, of the highest threshold crossed
    assert hook.fail == 0
    assert "Budget acme reached 100% of its limit: $12.00 of $10.00 this month" in body["text"]
    assert [b["type"] for b in body["blocks"]] == ["section", "context"]
    assert "metadata.customer=acme" in body["blocks"][1]["elements"][0]["text"]


async def test_a_webhook_that_answers_without_end_has_the_notification_once():
    """Its 200 is enough: the notification is not sent again once the answer's time is up
    (reading the answer to its end would never finish)."""
    sent: list[str] = []

    async def mark(event) -> None:
        sent.append(event.event_id)

    async with endless_server(200) as base:
        notifier = WebhookExporter(convert({"url": f"{base}/hook"}, NotifierConfig), mark)
        await notifier.start()
        try:
            await asyncio.wait_for(notifier.export(ExportBatch("n", [make_event(
                0, attributes={NOTIFICATION: {"budget": "acme"}})])), 5)
        finally:
            await notifier.shutdown()
    assert sent == ["evt-00000000"]


async def test_a_notification_the_webhook_refuses_is_counted_as_given_up(make_exporter):
    async with Webhook(fail=10**6, status=400) as hook:
        exporter, config = await notifying(make_exporter, hook)
        await exporter.export(ExportBatch("a", [spend(1, 6.0, metadata={"customer": "acme"})]))
        extension = finops_of(exporter, **config)
        registry = exporter.context.telemetry.registry

        def failed(reason):
            return metric_value(registry, "meterline_budget_notifications_failed_total",
                                notifier="finops/hook", budget="acme", reason=reason)

        await extension.start()
        await eventually(lambda: failed("gave_up") == 1)
        await settle()
        await extension.shutdown()
    assert (failed("gave_up"), failed("not_queued"), hook.bodies) == (1, 0, [])


async def test_the_failed_notifications_series_start_at_zero(make_exporter):
    """So that the first failure is an increase the alert sees, not a series appearing."""
    async with Webhook() as hook:
        exporter, config = await notifying(make_exporter, hook)
        extension = finops_of(exporter, **config)
        registry = exporter.context.telemetry.registry
        series = {(s.labels["notifier"], s.labels["budget"], s.labels["reason"]): s.value
                  for family in registry.collect() for s in family.samples
                  if s.name == "meterline_budget_notifications_failed_total"}
        await extension.shutdown()
    assert series == {("finops/hook", "acme", "gave_up"): 0,
                      ("finops/hook", "acme", "not_queued"): 0}


async def test_a_notification_queued_but_not_marked_before_a_crash_is_not_queued_again(
        make_exporter):
    """kill -9 between the durable put and the mark: the restart finds the notification
    in the queue, delivers it, and the evaluation does not queue a second one."""
    async with Webhook(fail=10**6) as hook:
        exporter, config = await notifying(make_exporter, hook)
        await exporter.export(ExportBatch("a", [spend(1, 6.0, metadata={"customer": "acme"})]))
        first = finops_of(exporter, **config)
        await first.start()
        runner = first.notifications.runners["hook"]
        await eventually(lambda: len(runner.queue) == 1)
        await first.shutdown()
        first.notifications.marks.path.unlink(missing_ok=True)  # as if never written
        hook.fail = 0
        second = finops_of(exporter, **config)
        await second.start()
        await eventually(lambda: len(hook.bodies) == 1)
        await settle()
        await second.shutdown()
    assert len(hook.bodies) == 1


async def test_a_rolling_window_is_notified_again_after_spend_fell_back(make_exporter):
    async with Webhook() as hook:
        exporter, config = await notifying(make_exporter, hook, window="24h", period=None)
        extension = finops_of(exporter, **config)
        statuses = [{"budget": "acme", "member": None, "rolling": True, "threshold_reached": t,
                     "scope": {}, "per": None, "period": "24h", "period_start": "x",
                     "period_end": "y", "spend_usd": 0, "limit_usd": 10, "action": "notify"}
                    for t in (0.5, None, 0.5)]
        await extension.notifications.start()
        for status in statuses:
            await extension.notifications.crossed([status], NOW)
        await eventually(lambda: len(hook.bodies) == 2)
        await extension.notifications.shutdown()


def test_a_notification_delivered_after_its_rolling_mark_was_lowered_does_not_raise_it(
        tmp_path):
    """Queued at 50 %, the spend fell back before the webhook took it: its delivery must not
    mark the crossing again, or the next crossing of 50 % would go unnotified."""
    marks = Marks(tmp_path / "notified.json")
    mark = {"key": "k", "threshold": 0.5, "budget": "acme", "member": None, "expires": None,
            "turn": marks.turn}
    assert marks.raise_to(mark)  # queued
    marks.rearm({("acme", None): None}, now=0.0)  # the spend fell back
    assert not marks.raise_to(mark)  # delivered now
    assert marks.threshold("k") == 0.0
    assert marks.raise_to({**mark, "turn": marks.turn})  # crossed again: notified


def test_a_notification_queued_before_a_restart_is_older_than_the_turns_after_it(tmp_path):
    before = Marks(tmp_path / "notified.json")
    for _ in range(3):  # evaluations before the restart
        before.rearm({}, now=0.0)
    mark = {"key": "k", "threshold": 0.5, "budget": "acme", "member": None, "expires": None,
            "turn": before.turn}
    after = Marks(tmp_path / "notified.json")  # the daemon started again
    after.marks["k"] = {"threshold": 0.5, "budget": "acme", "member": None, "expires": None}
    after.rearm({("acme", None): None}, now=0.0)  # the spend fell back
    assert not after.raise_to(mark)  # delivered now, queued before the restart


@pytest.mark.parametrize(("amount", "written"), [
    (12.0, "$12.00"), (1234.5, "$1,234.50"), (0.5, "$0.50"), (0.0123, "$0.012"),
    (2.8e-05, "$0.000028"), (0.0, "$0.00")])
def test_an_amount_is_written_with_the_digits_that_show_it(amount, written):
    assert usd(amount) == written


def test_a_small_budget_reads_as_its_amounts_not_as_zero():
    text = slack_body({"budget": "trial", "threshold": 1.0, "spend_usd": 2.8e-05,
                       "limit_usd": 1e-05, "period": "day", "scope": {}, "window_start": "S",
                       "window_end": "E", "action": "notify", "crossed_at": "C"})["text"]
    assert text == "Budget trial reached 100% of its limit: $0.000028 of $0.000010 this day"


def test_a_member_from_traffic_cannot_mention_the_channel_or_link_in_slack():
    member = "<!channel> & <https://x.example|raise it>"
    body = slack_body({"budget": "per-user", "per": "user", "member": member,
                       "threshold": 1.0, "spend_usd": 2.0, "limit_usd": 1.0, "period": "day",
                       "scope": {"metadata.customer": "<!here>"}, "window_start": "S",
                       "window_end": "E", "action": "notify", "crossed_at": "C"})
    texts = [body["text"], body["blocks"][0]["text"]["text"],
             body["blocks"][1]["elements"][0]["text"]]
    assert all("<" not in t and ">" not in t for t in texts), texts
    assert "&lt;!channel&gt; &amp; &lt;https://x.example|raise it&gt;" in body["text"]
    assert "metadata.customer=&lt;!here&gt;" in texts[2]
