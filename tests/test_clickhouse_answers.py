"""FinOps answers straight from chDB: which tables they read, and events that two writers
stored at the same moment, or a batch delivered again after a partial insert, counted once
at every moment (the hours being written are read from the events, deduplicated, until
their rollups are known right).

Every answer is compared with the same answer from a second database, in the same chDB,
that received each event once."""

import asyncio
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from meterline.component import ExportBatch, RetryableError
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse import schema as schema_module
from meterline.exporters.clickhouse.metrics import AGGREGATES
from meterline.exporters.clickhouse.query import Window
from meterline.exporters.clickhouse.schema import Schema, ensure_schema
from meterline.extensions.finops import analytics, budgets, finops
from tests import agent_data
from tests import clickhouse_data as data
from tests.clickhouse_helpers import (
    DIMENSIONS,
    RUN_DIMENSIONS,
    clickhouse_exporters,
    clickhouse_windows,
    every_finops_answer,
)
from tests.helpers import eventually, metric_value

NOW = datetime.now(UTC)


def noon_to_noon(now: datetime) -> Window:
    """A range that starts and ends at noon (partial days at both ends), wholly past."""
    noon = now.replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)
    return Window(noon - timedelta(days=79), noon)


def partial_day_events(window: Window) -> list[Event]:
    """A call in each partial day of `window` (which answers by user read from the
    events), each in a whole minute (which answers by time read from the minute rollup)."""
    times = [window.since + timedelta(seconds=1), window.until - timedelta(seconds=59)]
    return [Event(event_id=f"edge-{i}", timestamp=int(t.timestamp()) * 1_000_000_000,
                  source="gateway", provider="openai", operation="chat",
                  request_model="gpt-4o", status_code=200, input_tokens=10, output_tokens=5,
                  cost_usd=0.5, user_id="u-edge", metadata={"customer": "edge"})
            for i, t in enumerate(times)]


# and agent runs, tool and MCP calls three days ago (a whole day of the `days` window)
EVENTS = (data.dataset(NOW) + agent_data.events(int((NOW.timestamp() - 3 * 86400) * 1e9))
          + partial_day_events(noon_to_noon(NOW)))
N = len(EVENTS)
ROLLED = ["provider", "model", "team", "api_key", "status", "day"]
DAILY = ["user", "metadata.customer"]  # whole days from daily rollups
BUDGETS = {"search": budgets.Budget(limit_usd=40, scope=budgets.BudgetScope(team="search")),
           "acme": budgets.Budget(limit_usd=5, period="day",
                                  scope=budgets.BudgetScope(metadata={"customer": "acme"}))}

MONTHLY = {"acme": budgets.Budget(limit_usd=5, period="month",
                                  scope=budgets.BudgetScope(metadata={"customer": "acme"}))}


@pytest.fixture
async def make_exporter(tmp_path):
    """Exporters on one chDB directory (`database` apart); repairs only when asked."""
    async with clickhouse_exporters(tmp_path, repair_interval=0, repair_lookback="100d",
                                    rollup_metadata=["customer"]) as make:
        yield make


@pytest.fixture
async def reference(make_exporter):
    """A database that got every event once."""
    exporter = await make_exporter("reference", database="reference")
    await exporter.export(ExportBatch("ref", EVENTS))
    return exporter


async def export_at_once(exporters, events, meanwhile=None):
    """Each exporter exports `events` in its own batch, both "already stored?" checks done
    before either insert: two collectors of a consumer group during a rebalance.
    `meanwhile(exporter)` runs in each writer right after its insert, before it checks
    for copies: the moment two copies are stored and no rollup was put right yet."""
    both_checked = threading.Barrier(len(exporters), timeout=30)
    both_stored = threading.Barrier(len(exporters), timeout=30)
    for exporter in exporters:
        # as writers of a server (several daemons) are: on one embedded directory they
        # take turns and cannot race
        exporter._writing, exporter._may_race = threading.Lock(), True
        check, twice = exporter._already_stored, exporter._stored_twice

        def checked_then_wait(events, check=check):
            stored = check(events)
            both_checked.wait()
            return stored

        def stored_then_look(events, twice=twice, exporter=exporter):
            both_stored.wait()
            if meanwhile:
                meanwhile(exporter)
            return twice(events)

        exporter._already_stored = checked_then_wait
        exporter._stored_twice = stored_then_look
    await asyncio.gather(*(e.export(ExportBatch(f"{i}", list(events)))
                           for i, e in enumerate(exporters)))
    for exporter in exporters:
        del exporter._already_stored, exporter._stored_twice


@pytest.fixture
async def raced(make_exporter, monkeypatch):
    """Two exporters (one ClickHouse) that both stored every event. The second to find
    the copies waits for the first's rebuild of their hundreds of hours however long it
    takes (on a loaded machine, past `WAIT_FOR_OLDER`: both then rebuild at once, and the
    hours stay open until a repair pass, exact but not what the tests look at)."""
    monkeypatch.setattr(repair, "WAIT_FOR_OLDER", 600.0)
    writers = [await make_exporter("a"), await make_exporter("b")]
    await export_at_once(writers, EVENTS)
    [raw, *rolled] = stored(writers[0])
    assert raw == 2 * N  # two copies, until merges
    assert rolled == [N] * len(rolled)  # the rollups were put right at once
    return writers[0]


def stored(exporter):
    """Rows in llm_events, and events counted by each rollup (per key for metadata)."""
    schema, client = exporter.schema, exporter.reader.client
    [(raw,)] = client.query(f"SELECT count() FROM {schema.qualified(schema.events)}").result_rows
    return (raw, *(client.query(f"SELECT sum(events) / {max(len(r.metadata_keys), 1)} "
                                f"FROM {schema.qualified(r.table)}").result_rows[0][0]
                   for r in schema.rollups))


def store_around_the_exporters(exporter, events, token):
    """Events inserted as a writer that holds no hours open would (an older version):
    the views count them whether or not they were stored already."""
    exporter._writer.insert(exporter.schema.qualified(exporter.schema.events),
                            exporter.schema.column_batch(events),
                            column_names=[c.name for c in exporter.schema.inserted],
                            column_oriented=True, settings={"insert_deduplication_token": token})


def open_marks(exporter):
    return exporter.reader.client.query(
        f"SELECT count() FROM {exporter.schema.open_hours}").result_rows[0][0]


def windows():
    return clickhouse_windows(NOW)


def spend_answers(reader, dimensions, window="90d"):
    w = windows()[window]
    return {by: finops.spend(reader, w, by, top=1000) for by in dimensions}


def every_answer(reader):
    return every_finops_answer(reader, NOW, BUDGETS)


_REFERENCE_ANSWERS: dict[str, dict] = {}


def reference_answers(reference):
    """Every answer of the reference database: the same in every test (the same events and
    `NOW`), so asked once."""
    if not _REFERENCE_ANSWERS:
        _REFERENCE_ANSWERS["every"] = every_answer(reference.reader)
    return _REFERENCE_ANSWERS["every"]


def event_hours(events):
    return {e.timestamp // 3_600_000_000_000 * 3600 for e in events}


def rollup_buckets(events):
    """The buckets of every rollup that hold `events`, each named by its first hour: their
    hours, days and weeks (7 days from the epoch)."""
    hours = event_hours(events)
    return hours | {h - h % grain for h in hours for grain in (86400, 7 * 86400)}


# --- which tables answers read ---------------------------------------------------------------
async def test_answers_by_rollup_dimensions_read_the_rollups_not_the_events(reference):
    reader = reference.reader
    straddling = noon_to_noon(NOW)
    before = {by: finops.spend(reader, straddling, by, top=1000) for by in DIMENSIONS}
    days = spend_answers(reader, DAILY, "days")
    w = windows()["days"]
    users, u2 = analytics.users(reader, w), analytics.usage_report(reader, w, user_id="u2")
    customer = budgets.status(reader, MONTHLY, now=w.until)
    reader.client.command("TRUNCATE TABLE reference.llm_events")
    after = {by: finops.spend(reader, straddling, by, top=1000) for by in DIMENSIONS}
    assert {by: after[by] for by in ROLLED} == {by: before[by] for by in ROLLED}
    # by user or a configured metadata key: whole days from the daily rollups, the partial
    # days at the ends of a range from the events
    assert spend_answers(reader, DAILY, "days") == days
    assert all(days[by]["rows"] for by in DAILY)
    assert analytics.users(reader, w) == users and users["users"]
    assert analytics.usage_report(reader, w, user_id="u2") == u2
    assert budgets.status(reader, MONTHLY, now=w.until) == customer
    for by in DAILY:
        assert after[by]["rows"] != before[by]["rows"]  # the partial days are gone


async def test_answers_by_run_dimensions_read_the_trace_rollup_not_the_events(reference):
    reader = reference.reader
    w = windows()["days"]
    runs, agents = spend_answers(reader, RUN_DIMENSIONS, "days"), analytics.agents(reader, w)
    reader.client.command("TRUNCATE TABLE reference.llm_events")
    assert spend_answers(reader, RUN_DIMENSIONS, "days") == runs
    assert all(len(runs[by]["rows"]) > 1 for by in RUN_DIMENSIONS)
    assert analytics.agents(reader, w) == agents
    assert agents["agents"] and agents["tools"] and agents["mcp"]["methods"]


async def test_a_metadata_key_not_configured_is_answered_from_the_events(reference):
    w = windows()["days"]
    before = finops.spend(reference.reader, w, "metadata.env")
    reference.reader.client.command("TRUNCATE TABLE reference.llm_events")
    assert before["rows"] and finops.spend(reference.reader, w, "metadata.env")["rows"] == []


# --- events two writers stored at once ---------------------------------------------------------
async def test_events_two_writers_stored_at_once_count_once_in_every_answer(raced, reference):
    assert every_answer(raced.reader) == reference_answers(reference)
    assert open_marks(raced) == 0


async def test_no_answer_counts_twice_while_two_copies_are_stored(make_exporter, reference):
    """The moment both writers' inserts are done and neither has looked for copies: the
    views have counted every event twice, and the hours are read from the events."""
    expected = reference_answers(reference)
    seen = []

    def answers(exporter):
        seen.append(every_answer(exporter.reader))

    writers = [await make_exporter("a"), await make_exporter("b")]
    await export_at_once(writers, EVENTS, meanwhile=answers)
    assert len(seen) == 2 and seen[0] == expected and seen[1] == expected


async def test_after_a_repair_every_answer_still_counts_once(raced, reference):
    assert await raced.repair_rollups() == []
    assert every_answer(raced.reader) == reference_answers(reference)


async def test_the_writer_that_finds_the_copies_counts_the_hours_it_rebuilt(make_exporter):
    writers = [await make_exporter("a"), await make_exporter("b")]
    await export_at_once(writers, EVENTS)
    registry = [w.context.telemetry.registry for w in writers]
    rebuilt = [metric_value(r, "meterline_exporter_rollup_repaired_hours_total") or 0
               for r in registry]
    assert sorted(rebuilt) == [0, len(event_hours(EVENTS))]


# --- redelivery -------------------------------------------------------------------------------
async def test_a_batch_retried_after_a_partial_insert_counts_once_at_every_moment(
        make_exporter, reference, monkeypatch):
    # the retry waits for the failed attempt's mark (still open: nothing closes it before
    # it is abandoned) only so long
    monkeypatch.setattr(repair, "WAIT_FOR_OLDER", 0.5)
    exporter = await make_exporter("w")
    write = exporter._write

    def half_then_fail(batch_id, events):
        write(batch_id, events[: len(events) // 2])
        raise RetryableError("connection lost after the first half")

    exporter._write = half_then_fail
    with pytest.raises(RetryableError):
        await exporter.export(ExportBatch("one", EVENTS))
    del exporter._write
    half = {e.event_id for e in EVENTS[: N // 2]}
    # the failed attempt's hours stay open: every answer reads the stored half once
    assert open_marks(exporter) > 0
    first = [e for e in EVENTS if e.event_id in half]
    partial = await make_exporter("half", database="half")
    await partial.export(ExportBatch("half", first))
    assert every_answer(exporter.reader) == every_answer(partial.reader)
    await exporter.export(ExportBatch("one", EVENTS))  # the retry
    assert every_answer(exporter.reader) == reference_answers(reference)


async def test_an_abandoned_mark_is_closed_by_the_repair_once_its_hours_count_right(
        make_exporter, reference, monkeypatch):
    monkeypatch.setattr(repair, "WAIT_FOR_OLDER", 0.5)  # the rebuild's wait for the killed
    exporter = await make_exporter("w")
    await exporter.export(ExportBatch("one", EVENTS))
    repair.open_hours(exporter._writer, exporter.schema, event_hours(EVENTS), "killed")
    lose_rollup_rows(exporter, exporter.schema.rollups[1:])  # a kill mid-insert
    assert every_answer(exporter.reader) == reference_answers(reference)
    assert await exporter.repair_rollups()  # not abandoned yet: the hours stay open
    assert open_marks(exporter) > 0
    monkeypatch.setattr(repair, "ABANDONED_AFTER", 0)
    await exporter.repair_rollups()
    assert open_marks(exporter) == 0
    assert stored(exporter)[1:] == (N,) * len(exporter.schema.rollups)
    assert every_answer(exporter.reader) == reference_answers(reference)


# --- repair of what writers outside this protocol leave ------------------------------------------
@pytest.fixture
async def doubled(make_exporter):
    """An exporter's events stored again around it: the rollups count them twice."""
    exporter = await make_exporter("a")
    await exporter.export(ExportBatch("a", EVENTS))
    store_around_the_exporters(exporter, EVENTS, "again")
    return exporter


async def test_a_repair_rebuilds_and_counts_the_hours_counted_twice(doubled, reference):
    hours = await doubled.repair_rollups()
    assert hours == sorted(rollup_buckets(EVENTS))
    registry = doubled.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_rollup_repaired_hours_total") == len(hours)
    assert every_answer(doubled.reader) == reference_answers(reference)


async def test_a_repair_leaves_rollups_that_count_right_alone(reference):
    assert await reference.repair_rollups() == []
    assert stored(reference) == (N,) * (1 + len(reference.schema.rollups))


async def test_a_repair_looks_back_only_repair_lookback(make_exporter):
    exporter = await make_exporter("a", repair_lookback="3d")
    await exporter.export(ExportBatch("a", EVENTS))
    store_around_the_exporters(exporter, EVENTS, "again")
    hours = await exporter.repair_rollups()
    # (back to the first hour of the week that holds the look-back's first hour: the
    # weekly rollup is checked per week)
    start = int(NOW.timestamp()) - 3 * 86400
    assert hours and min(hours) >= start - start % (7 * 86400)
    assert all(h % (7 * 86400) == 0 for h in hours if h < start - 86400)
    recent = sum(1 for e in EVENTS if e.timestamp // 3_600_000_000_000 * 3600 in hours)
    [minute, hour, *_] = stored(exporter)[1:]
    assert minute == hour == 2 * N - recent


async def test_an_hour_rebuilt_again_with_the_same_events_is_written_again(doubled, reference):
    await doubled.repair_rollups()
    store_around_the_exporters(doubled, EVENTS, "3rd")
    assert await doubled.repair_rollups()  # the same hours, rebuilt from the same events
    assert stored(doubled)[1:] == (N,) * len(doubled.schema.rollups)
    assert spend_answers(doubled.reader, ROLLED) == spend_answers(reference.reader, ROLLED)


async def test_the_exporter_repairs_the_rollups_every_repair_interval(make_exporter):
    exporter = await make_exporter("a", repair_interval="50ms")
    await exporter.export(ExportBatch("a", EVENTS))
    store_around_the_exporters(exporter, EVENTS, "again")
    await eventually(lambda: stored(exporter)[1:] == (N,) * len(exporter.schema.rollups),
                     timeout=30)


# --- inserts cut short by a kill -------------------------------------------------------------
def lose_rollup_rows(exporter, rollups):
    """The state a kill leaves between an insert and its views' inserts: the raw rows stored,
    the rows of these rollups not."""
    for rollup in rollups:
        exporter.reader.client.command(
            f"TRUNCATE TABLE {exporter.schema.qualified(rollup.table)}")


@pytest.fixture
async def cut_short(make_exporter):
    """An exporter whose batch "ref" reached llm_events and the first rollup only."""
    exporter = await make_exporter("cut", database="cut")
    await exporter.export(ExportBatch("ref", EVENTS))
    lose_rollup_rows(exporter, exporter.schema.rollups[1:])
    return exporter


async def test_a_batch_delivered_again_after_an_insert_cut_short_makes_every_answer_exact(
        cut_short, reference):
    await cut_short.export(ExportBatch("ref", EVENTS))  # the queue delivers it again
    assert stored(cut_short) == (N,) * (1 + len(cut_short.schema.rollups))
    assert every_answer(cut_short.reader) == reference_answers(reference)


async def test_a_batch_delivered_again_rebuilds_only_the_hours_of_its_events(make_exporter):
    exporter = await make_exporter("cut", database="cut")
    old = [e for e in EVENTS if e.timestamp < (NOW.timestamp() - 7 * 86400) * 10**9]
    recent = [e for e in EVENTS if e not in old]
    await exporter.export(ExportBatch("old", old))
    await exporter.export(ExportBatch("recent", recent))
    lose_rollup_rows(exporter, exporter.schema.rollups)
    await exporter.export(ExportBatch("recent", recent))
    [raw, minute, hour, *_] = stored(exporter)
    assert (raw, minute, hour) == (N, len(recent), len(recent))


async def test_a_batch_already_stored_whole_leaves_right_rollups_alone(reference):
    await reference.export(ExportBatch("ref", EVENTS))
    registry = reference.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_rollup_repaired_hours_total") in (None, 0)
    assert stored(reference) == (N,) * (1 + len(reference.schema.rollups))


async def test_a_repair_rebuilds_the_hours_a_rollup_counts_short(cut_short, reference):
    hours = await cut_short.repair_rollups()
    assert set(hours) >= event_hours(EVENTS)
    assert every_answer(cut_short.reader) == reference_answers(reference)


# --- migration ----------------------------------------------------------------------------------
async def test_a_database_of_the_previous_version_gets_the_new_rollups_filled(
        make_exporter, reference, monkeypatch):
    """Tables of the previous version (per-minute and per-hour rollups and a user rollup
    without derived figures, no guardrail figure), with events, gain the other rollups,
    filled from the events; those it had gain the guardrail figure and
    are filled again, the user rollup gains its derived figures: every answer is then the
    reference's."""
    old = Schema(database="old")
    with monkeypatch.context() as previous:
        previous.setattr(Schema, "rollups", property(lambda s: (
            *s.time_rollups[:2], replace(s.user_rollup, derived=()))))
        previous.setattr(schema_module, "AGGREGATES",
                         tuple(a for a in AGGREGATES if a.name != "guardrail_blocked"))
        previous.setattr(schema_module, "VIEW_VERSION", 3)
        exporter = await make_exporter("old", database="old", create_schema=False)
        await exporter.connect()
        ensure_schema(exporter._writer, old)
        store_around_the_exporters(exporter, EVENTS, "old")
    new = replace(old, rollup_metadata=("customer",))
    monkeypatch.setattr(schema_module, "FILL_EVENTS", 50)  # filled a few days at a time
    changes = ensure_schema(exporter._writer, new)
    filled = [c.split(" (")[0].splitlines()[0] for c in changes if "INSERT" in c]
    assert all(int(c.split(" in ")[1].split()[0]) > 1 for c in changes if "INSERT" in c)
    added = [r.table for r in new.rollups if r not in (*new.time_rollups[:2], new.user_rollup)]
    refilled = sorted(r.table for r in (*new.time_rollups[:2], new.user_rollup))
    assert filled == [f"INSERT INTO `old`.`{t}`" for t in (*refilled, *added)]
    assert [c.split("ADD COLUMN IF NOT EXISTS ")[1].split()[0] for c in changes
            if "`old`.`llm_usage_user_1d` ADD COLUMN" in c] == [
        "`guardrail_blocked`", "`active_days`", "`models`", "`providers`"]
    assert every_answer(exporter.reader) == reference_answers(reference)
    assert analytics.users(exporter.reader, windows()["90d"], provider="openai") == \
        analytics.users(reference.reader, windows()["90d"], provider="openai")
    assert await exporter.repair_rollups() == []


async def test_a_metadata_key_added_to_the_config_is_filled_from_the_events(
        make_exporter, reference):
    exporter = await make_exporter("a", database="keys", rollup_metadata=["env"])
    await exporter.export(ExportBatch("a", EVENTS))
    schema = replace(exporter.schema, rollup_metadata=("env", "customer"))
    changes = ensure_schema(exporter._writer, schema)
    assert any("INSERT INTO `keys`.`llm_usage_metadata_1d`" in c for c in changes)
    exporter.schema = exporter.reader.schema = schema
    w = windows()["days"]
    for key in ("metadata.customer", "metadata.env"):
        assert finops.spend(exporter.reader, w, key) == finops.spend(reference.reader, w, key)
