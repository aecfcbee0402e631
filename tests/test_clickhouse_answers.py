"""FinOps answers straight from chDB: which tables they read, and events that two writers
stored at the same moment, or a batch delivered again after a partial insert, counted once
at every moment (the hours being written are read from the events, deduplicated, until
their rollups are known right).

Every answer is compared with the same answer from a second database, in the same chDB,
that received each event once."""

import asyncio
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from meterline.component import ExportBatch, RetryableError
from meterline.config import convert
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse import schema as schema_module
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import open_client
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
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

# The module's exporters share one chDB directory (chDB opens one per process) and the
# module's event loop: what takes long to build (a database with every event, two writers'
# race, a repair) is built once, and read only by the tests that share it.
pytestmark = pytest.mark.asyncio(loop_scope="module")

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


OPTIONS = {"repair_interval": 0, "repair_lookback": "100d", "rollup_metadata": ["customer"]}


@pytest.fixture(scope="module")
def chdb(tmp_path_factory):
    """The module's chDB directory, and a client that keeps it open for the module."""
    path = tmp_path_factory.mktemp("answers") / "ch"
    client = open_client(convert({"endpoint": f"chdb://{path}"}, ClickHouseConfig), path.parent)
    yield path, client
    client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_exporter(chdb, tmp_path_factory):
    """Exporters for the module's shared fixtures, each in a database of its own."""
    async with clickhouse_exporters(tmp_path_factory.mktemp("shared"),
                                    endpoint=f"chdb://{chdb[0]}", **OPTIONS) as make:
        yield make


@pytest_asyncio.fixture(loop_scope="module")
async def make_exporter(chdb, tmp_path):
    """A test's exporters on the module's chDB directory (`database` apart); repairs only
    when asked. The databases they wrote are dropped afterwards: the next test has none."""
    path, client = chdb
    databases = set()
    async with clickhouse_exporters(tmp_path, endpoint=f"chdb://{path}", **OPTIONS) as make:
        async def make_one(*args, **config) -> ClickHouseExporter:
            exporter = await make(*args, **config)
            databases.add(exporter.schema.database)
            return exporter

        yield make_one
    for database in databases:
        client.command(f"DROP DATABASE IF EXISTS `{database}` SYNC")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(shared_exporter):
    """A database that got every event once (read only)."""
    exporter = await shared_exporter("reference", database="reference")
    await exporter.export(ExportBatch("ref", EVENTS))
    return exporter


@pytest.fixture(scope="module")
def expected(reference):
    """Every answer of the reference database."""
    return every_answer(reference.reader)


@pytest_asyncio.fixture(loop_scope="module")
async def stored_once(make_exporter):
    """A test's own database that got every event once, in batch "ref"."""
    exporter = await make_exporter("once", database="once")
    await exporter.export(ExportBatch("ref", EVENTS))
    return exporter


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def without_events(shared_exporter):
    """The reader of a database that got every event once, whose `llm_events` was then
    emptied: what it answers as `reference` does, it answers without the events."""
    exporter = await shared_exporter("bare", database="bare")
    await exporter.export(ExportBatch("bare", EVENTS))
    exporter.reader.client.command("TRUNCATE TABLE bare.llm_events")
    return exporter.reader


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


@dataclass
class Race:
    """Two exporters (one ClickHouse) that both stored every event at once, and what was
    seen: `during`, every answer each writer got once both copies were stored and before
    it looked for copies; then every answer, the marks still open and the hours each
    writer rebuilt (taken before any test, so that a test's repair cannot change them)."""

    writer: ClickHouseExporter
    during: list[dict]
    after: dict
    open_marks: int
    rebuilt: list[float]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def race(shared_exporter):
    """The second writer to find the copies waits for the first's rebuild of their hundreds
    of hours however long it takes (on a loaded machine, past `WAIT_FOR_OLDER`: both then
    rebuild at once, and the hours stay open until a repair pass, exact but not what the
    tests look at)."""
    during = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(repair, "WAIT_FOR_OLDER", 600.0)
        writers = [await shared_exporter(name, database="race") for name in ("a", "b")]
        await export_at_once(writers, EVENTS,
                             meanwhile=lambda writer: during.append(every_answer(writer.reader)))
    [raw, *rolled] = stored(writers[0])
    assert raw == 2 * N  # two copies, until merges
    assert rolled == [N] * len(rolled)  # the rollups were put right at once
    rebuilt = [metric_value(w.context.telemetry.registry,
                            "meterline_exporter_rollup_repaired_hours_total") or 0
               for w in writers]
    return Race(writers[0], during, every_answer(writers[0].reader), open_marks(writers[0]),
                rebuilt)


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


def event_hours(events):
    return {e.timestamp // 3_600_000_000_000 * 3600 for e in events}


def rollup_buckets(events):
    """The buckets of every rollup that hold `events`, each named by its first hour: their
    hours, days and weeks (7 days from the epoch)."""
    hours = event_hours(events)
    return hours | {h - h % grain for h in hours for grain in (86400, 7 * 86400)}


# --- which tables answers read ---------------------------------------------------------------
async def test_answers_by_rollup_dimensions_read_the_rollups_not_the_events(reference,
                                                                           without_events):
    straddling = noon_to_noon(NOW)
    before = {by: finops.spend(reference.reader, straddling, by, top=1000) for by in DIMENSIONS}
    after = {by: finops.spend(without_events, straddling, by, top=1000) for by in DIMENSIONS}
    assert {by: after[by] for by in ROLLED} == {by: before[by] for by in ROLLED}
    # by user or a configured metadata key: whole days from the daily rollups, the partial
    # days at the ends of a range from the events
    days = spend_answers(reference.reader, DAILY, "days")
    assert spend_answers(without_events, DAILY, "days") == days
    assert all(days[by]["rows"] for by in DAILY)
    w = windows()["days"]
    users = analytics.users(reference.reader, w)
    assert analytics.users(without_events, w) == users and users["users"]
    assert analytics.usage_report(without_events, w, user_id="u2") == analytics.usage_report(
        reference.reader, w, user_id="u2")
    assert budgets.status(without_events, MONTHLY, now=w.until) == budgets.status(
        reference.reader, MONTHLY, now=w.until)
    for by in DAILY:
        assert after[by]["rows"] != before[by]["rows"]  # the partial days are gone


async def test_answers_by_run_dimensions_read_the_trace_rollup_not_the_events(reference,
                                                                             without_events):
    w = windows()["days"]
    runs = spend_answers(reference.reader, RUN_DIMENSIONS, "days")
    agents = analytics.agents(reference.reader, w)
    assert spend_answers(without_events, RUN_DIMENSIONS, "days") == runs
    assert all(len(runs[by]["rows"]) > 1 for by in RUN_DIMENSIONS)
    assert analytics.agents(without_events, w) == agents
    assert agents["agents"] and agents["tools"] and agents["mcp"]["methods"]


async def test_answers_by_run_dimensions_over_whole_hours_read_the_rollups_not_the_events(
        reference, without_events):
    """Agent runs, tools and MCP by the hour: a range of whole hours that is no range of
    whole days (a dashboard's last 24 hours) reads no event."""
    hour = (NOW - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    w = Window(hour - timedelta(hours=5), hour + timedelta(hours=4))
    for by in RUN_DIMENSIONS:
        answer = finops.spend(reference.reader, w, by, top=1000)
        assert answer["rows"] and finops.spend(without_events, w, by, top=1000) == answer
    agents = analytics.agents(reference.reader, w)
    assert agents["agents"] and agents["tools"] and agents["mcp"]["methods"]
    assert analytics.agents(without_events, w) == agents


async def test_a_metadata_key_not_configured_is_answered_from_the_events(reference,
                                                                         without_events):
    w = windows()["days"]
    before = finops.spend(reference.reader, w, "metadata.env")
    assert before["rows"] and finops.spend(without_events, w, "metadata.env")["rows"] == []


# --- events two writers stored at once ---------------------------------------------------------
async def test_events_two_writers_stored_at_once_count_once_in_every_answer(race, expected):
    assert race.after == expected
    assert race.open_marks == 0


async def test_no_answer_counts_twice_while_two_copies_are_stored(race, expected):
    """The moment both writers' inserts are done and neither has looked for copies: the
    views have counted every event twice, and the hours are read from the events."""
    assert len(race.during) == 2 and race.during[0] == expected and race.during[1] == expected


async def test_after_a_repair_every_answer_still_counts_once(race, expected):
    assert await race.writer.repair_rollups() == []
    assert every_answer(race.writer.reader) == expected


async def test_the_writer_that_finds_the_copies_counts_the_hours_it_rebuilt(race):
    assert sorted(race.rebuilt) == [0, len(event_hours(EVENTS))]


# --- redelivery -------------------------------------------------------------------------------
async def test_a_batch_retried_after_a_partial_insert_counts_once_at_every_moment(
        make_exporter, expected, monkeypatch):
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
    assert every_answer(exporter.reader) == expected


async def test_an_abandoned_mark_is_closed_by_the_repair_once_its_hours_count_right(
        make_exporter, expected, monkeypatch):
    monkeypatch.setattr(repair, "WAIT_FOR_OLDER", 0.5)  # the rebuild's wait for the killed
    exporter = await make_exporter("w")
    await exporter.export(ExportBatch("one", EVENTS))
    repair.open_hours(exporter._writer, exporter.schema, event_hours(EVENTS), "killed")
    lose_rollup_rows(exporter, exporter.schema.rollups[1:])  # a kill mid-insert
    assert every_answer(exporter.reader) == expected
    assert await exporter.repair_rollups()  # not abandoned yet: the hours stay open
    assert open_marks(exporter) > 0
    monkeypatch.setattr(repair, "ABANDONED_AFTER", 0)
    await exporter.repair_rollups()
    assert open_marks(exporter) == 0
    assert stored(exporter)[1:] == (N,) * len(exporter.schema.rollups)
    assert every_answer(exporter.reader) == expected


# --- repair of what writers outside this protocol leave ------------------------------------------
@dataclass
class Rebuilt:
    """What an exporter did with its events stored again around it (the rollups counted
    them twice): the hours a repair rebuilt, those it counted and every answer afterwards;
    then, the events stored a third time, the hours a second repair rebuilt (the same
    hours, from the same events), the events each rollup counts and the spend answers by
    each rolled-up dimension afterwards."""

    first: list[int]
    counted: float
    answers: dict
    second: list[int]
    rolled: tuple
    spend: dict


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rebuilt(shared_exporter):
    exporter = await shared_exporter("doubled", database="doubled")
    await exporter.export(ExportBatch("a", EVENTS))
    store_around_the_exporters(exporter, EVENTS, "again")
    first = await exporter.repair_rollups()
    counted = metric_value(exporter.context.telemetry.registry,
                           "meterline_exporter_rollup_repaired_hours_total")
    answers = every_answer(exporter.reader)
    store_around_the_exporters(exporter, EVENTS, "3rd")
    second = await exporter.repair_rollups()
    return Rebuilt(first, counted, answers, second, stored(exporter)[1:],
                   spend_answers(exporter.reader, ROLLED))


async def test_a_repair_rebuilds_and_counts_the_hours_counted_twice(rebuilt, expected):
    assert rebuilt.first == sorted(rollup_buckets(EVENTS))
    assert rebuilt.counted == len(rebuilt.first)
    assert rebuilt.answers == expected


async def test_a_repair_leaves_rollups_that_count_right_alone(stored_once):
    assert await stored_once.repair_rollups() == []
    assert stored(stored_once) == (N,) * (1 + len(stored_once.schema.rollups))


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


async def test_an_hour_rebuilt_again_with_the_same_events_is_written_again(rebuilt, reference):
    assert rebuilt.second  # the same hours, rebuilt from the same events
    assert rebuilt.rolled == (N,) * len(reference.schema.rollups)
    assert rebuilt.spend == spend_answers(reference.reader, ROLLED)


async def test_the_exporter_repairs_the_rollups_every_repair_interval(make_exporter):
    # the last day's events: that the repair comes unasked is the point, not how much it
    # rebuilds (every event took 20-30 s, close to the timeout on a loaded machine)
    day = [e for e in EVENTS if e.timestamp >= (NOW.timestamp() - 86400) * 10**9]
    exporter = await make_exporter("a", repair_interval="50ms")
    await exporter.export(ExportBatch("a", day))
    store_around_the_exporters(exporter, day, "again")
    await eventually(lambda: stored(exporter)[1:] == (len(day),) * len(exporter.schema.rollups),
                     timeout=30)


# --- inserts cut short by a kill -------------------------------------------------------------
def lose_rollup_rows(exporter, rollups):
    """The state a kill leaves between an insert and its views' inserts: the raw rows stored,
    the rows of these rollups not."""
    for rollup in rollups:
        exporter.reader.client.command(
            f"TRUNCATE TABLE {exporter.schema.qualified(rollup.table)}")


@pytest_asyncio.fixture(loop_scope="module")
async def cut_short(make_exporter):
    """An exporter whose batch "ref" reached llm_events and the first rollup only."""
    exporter = await make_exporter("cut", database="cut")
    await exporter.export(ExportBatch("ref", EVENTS))
    lose_rollup_rows(exporter, exporter.schema.rollups[1:])
    return exporter


async def test_a_batch_delivered_again_after_an_insert_cut_short_makes_every_answer_exact(
        cut_short, expected):
    await cut_short.export(ExportBatch("ref", EVENTS))  # the queue delivers it again
    assert stored(cut_short) == (N,) * (1 + len(cut_short.schema.rollups))
    assert every_answer(cut_short.reader) == expected


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


async def test_a_batch_already_stored_whole_leaves_right_rollups_alone(stored_once):
    await stored_once.export(ExportBatch("ref", EVENTS))
    registry = stored_once.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_rollup_repaired_hours_total") in (None, 0)
    assert stored(stored_once) == (N,) * (1 + len(stored_once.schema.rollups))


async def test_a_repair_rebuilds_the_hours_a_rollup_counts_short(cut_short, expected):
    hours = await cut_short.repair_rollups()
    assert set(hours) >= event_hours(EVENTS)
    assert every_answer(cut_short.reader) == expected


# --- migration ----------------------------------------------------------------------------------
async def test_a_database_of_the_previous_version_gets_the_new_rollups_filled(
        make_exporter, reference, expected, monkeypatch):
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
    assert every_answer(exporter.reader) == expected
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
