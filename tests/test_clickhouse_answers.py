"""FinOps answers straight from chDB: which tables they read, and events that two writers
stored at the same moment counted once (raw events read deduplicated, rollups repaired).

Every answer is compared with the same answer from a second database, in the same chDB,
that received each event once."""

import asyncio
import threading
from datetime import UTC, datetime

import pytest

from meterline.component import ExportBatch
from meterline.extensions.finops import analytics, budgets, finops
from tests import clickhouse_data as data
from tests.clickhouse_helpers import (
    DIMENSIONS,
    clickhouse_exporters,
    clickhouse_windows,
    every_finops_answer,
)
from tests.helpers import eventually, metric_value

NOW = datetime.now(UTC)
EVENTS = data.dataset(NOW)
ROLLED = ["provider", "model", "team", "api_key", "status", "day"]
BUDGETS = {"search": budgets.Budget(limit_usd=40, scope=budgets.BudgetScope(team="search")),
           "acme": budgets.Budget(limit_usd=5, period="day",
                                  scope=budgets.BudgetScope(metadata={"customer": "acme"}))}


@pytest.fixture
async def make_exporter(tmp_path):
    """Exporters on one chDB directory (`database` apart); repairs only when asked."""
    async with clickhouse_exporters(tmp_path, repair_interval=0,
                                    repair_lookback="100d") as make:
        yield make


@pytest.fixture
async def reference(make_exporter):
    """A database that got every event once."""
    exporter = await make_exporter("reference", database="reference")
    await exporter.export(ExportBatch("ref", EVENTS))
    return exporter


async def export_at_once(exporters, events):
    """Each exporter exports `events` in its own batch, both "already stored?" checks done
    before either insert: two collectors of a consumer group during a rebalance."""
    both_checked = threading.Barrier(len(exporters), timeout=30)
    for exporter in exporters:
        check = exporter._already_stored

        def checked_then_wait(events, check=check):
            stored = check(events)
            both_checked.wait()
            return stored

        exporter._already_stored = checked_then_wait
    await asyncio.gather(*(e.export(ExportBatch(f"{i}", list(events)))
                           for i, e in enumerate(exporters)))
    for exporter in exporters:
        del exporter._already_stored


@pytest.fixture
async def raced(make_exporter):
    """Two exporters (one ClickHouse) that both stored every event."""
    writers = [await make_exporter("a"), await make_exporter("b")]
    await export_at_once(writers, EVENTS)
    assert stored(writers[0]) == (2 * len(EVENTS), 2 * len(EVENTS), 2 * len(EVENTS))
    return writers[0]


def stored(exporter):
    """Rows in llm_events, and events counted by each rollup."""
    schema, client = exporter.schema, exporter.reader.client
    [(raw,)] = client.query(f"SELECT count() FROM {schema.qualified(schema.events)}").result_rows
    return (raw, *(client.query(f"SELECT sum(events) FROM {schema.qualified(r.table)}")
                   .result_rows[0][0] for r in schema.rollups))


def windows():
    return clickhouse_windows(NOW)


def spend_answers(reader, dimensions):
    w = windows()["90d"]
    return {by: finops.spend(reader, w, by, top=1000) for by in dimensions}


def every_answer(reader):
    return every_finops_answer(reader, NOW, BUDGETS)


# --- which tables answers read ---------------------------------------------------------------
async def test_answers_by_rollup_dimensions_read_the_rollups_not_the_events(reference):
    reader = reference.reader
    before = spend_answers(reader, DIMENSIONS)
    reader.client.command("TRUNCATE TABLE reference.llm_events")
    after = spend_answers(reader, DIMENSIONS)
    assert {by: after[by] for by in ROLLED} == {by: before[by] for by in ROLLED}
    for by in ("user", "metadata.customer"):  # these only the events can answer
        assert before[by]["rows"] and after[by]["rows"] == []


# --- events two writers stored at once ---------------------------------------------------------
async def test_answers_from_raw_events_count_an_event_two_writers_stored_once(raced, reference):
    """Even before a repair (a report's total and the shares of it come from the rollups,
    so here the rows without their shares)."""
    def rows(reader, by):
        return [{k: v for k, v in row.items() if k != "share"}
                for row in spend_answers(reader, [by])[by]["rows"]]

    for by in ("user", "metadata.customer"):
        assert rows(raced.reader, by) == rows(reference.reader, by)
    w = windows()["90d"]
    assert analytics.users(raced.reader, w) == analytics.users(reference.reader, w)


async def test_after_a_repair_every_answer_counts_an_event_two_writers_stored_once(
        raced, reference):
    assert await raced.repair_rollups()
    assert stored(raced)[1:] == (len(EVENTS), len(EVENTS))
    assert every_answer(raced.reader) == every_answer(reference.reader)


async def test_a_repair_counts_the_hours_it_rebuilt(raced):
    hours = await raced.repair_rollups()
    expected = {e.timestamp // 3_600_000_000_000 * 3600 for e in EVENTS}
    assert hours == sorted(expected)
    registry = raced.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_rollup_repaired_hours_total") == len(hours)


async def test_a_repair_leaves_rollups_that_count_right_alone(reference):
    assert await reference.repair_rollups() == []
    assert stored(reference) == (len(EVENTS), len(EVENTS), len(EVENTS))


async def test_a_repair_looks_back_only_repair_lookback(make_exporter):
    writers = [await make_exporter("a", repair_lookback="3d"), await make_exporter("b")]
    await export_at_once(writers, EVENTS)
    hours = await writers[0].repair_rollups()
    assert hours and min(hours) >= NOW.timestamp() - 3 * 86400 - 3600
    recent = sum(1 for e in EVENTS if e.timestamp >= min(hours) * 10**9)
    assert stored(writers[0])[1:] == (2 * len(EVENTS) - recent,) * 2


async def test_an_hour_rebuilt_again_with_the_same_events_is_written_again(raced, reference):
    await raced.repair_rollups()
    third_copy = raced.schema.column_batch(EVENTS)
    raced._writer.insert(raced.schema.qualified(raced.schema.events), third_copy,
                         column_names=[c.name for c in raced.schema.inserted],
                         column_oriented=True, settings={"insert_deduplication_token": "3rd"})
    assert await raced.repair_rollups()  # the same hours, rebuilt from the same events
    assert stored(raced)[1:] == (len(EVENTS), len(EVENTS))
    assert spend_answers(raced.reader, ROLLED) == spend_answers(reference.reader, ROLLED)


async def test_the_exporter_repairs_the_rollups_every_repair_interval(make_exporter):
    writers = [await make_exporter("a", repair_interval="50ms"), await make_exporter("b")]
    await export_at_once(writers, EVENTS)
    await eventually(lambda: stored(writers[0])[1:] == (len(EVENTS), len(EVENTS)), timeout=30)


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
    assert stored(cut_short) == (len(EVENTS), len(EVENTS), len(EVENTS))
    assert every_answer(cut_short.reader) == every_answer(reference.reader)


async def test_a_batch_delivered_again_rebuilds_only_the_hours_of_its_events(make_exporter):
    exporter = await make_exporter("cut", database="cut")
    old = [e for e in EVENTS if e.timestamp < (NOW.timestamp() - 7 * 86400) * 10**9]
    recent = [e for e in EVENTS if e not in old]
    await exporter.export(ExportBatch("old", old))
    await exporter.export(ExportBatch("recent", recent))
    lose_rollup_rows(exporter, exporter.schema.rollups)
    await exporter.export(ExportBatch("recent", recent))
    assert stored(exporter) == (len(EVENTS), len(recent), len(recent))


async def test_a_batch_already_stored_whole_leaves_right_rollups_alone(reference):
    await reference.export(ExportBatch("ref", EVENTS))
    registry = reference.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_rollup_repaired_hours_total") in (None, 0)
    assert stored(reference) == (len(EVENTS), len(EVENTS), len(EVENTS))


async def test_a_repair_rebuilds_the_hours_a_rollup_counts_short(cut_short, reference):
    hours = await cut_short.repair_rollups()
    assert hours == sorted({e.timestamp // 3_600_000_000_000 * 3600 for e in EVENTS})
    assert every_answer(cut_short.reader) == every_answer(reference.reader)
