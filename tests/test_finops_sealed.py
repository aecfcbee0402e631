"""Run answers kept per closed day (`seals.py`) equal the answers computed from every row,
whatever arrives after the seal.

The data is the reference's (`test_finops_reference`: ten days of model calls and agent
runs, some crossing midnight, windows cut anywhere), stored through the exporter; the
answers computed live there are checked against a plain-Python reference. Here every
sealed `runs` answer (by agent, session, trace, and `analytics/agents`) read through the
kept answers must equal the live one over every window holding a whole closed day; and
the answer by agent (whose kept answers are checked as the others') after late events,
runs that go on days later, hours held open and a second seal.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from meterline.component import ExportBatch
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.query import Reader, Window
from meterline.exporters.clickhouse.seals import SealedRuns
from meterline.extensions.finops import analytics, finops
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.test_finops_reference import DAYS, EVENTS, SECOND, START, WINDOWS, check, where

in_module_loop = pytest.mark.asyncio(loop_scope="module")
NOW = START + timedelta(days=DAYS + 1, hours=3)  # every day of the data closed and settled
DAY_NS = 86400 * SECOND


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_exporter(tmp_path_factory):
    async with clickhouse_exporters(tmp_path_factory.mktemp("sealed"),
                                    repair_interval=0) as make:
        yield make


async def stored(make_exporter, name: str, every: bool = False) -> tuple[Reader, Reader]:
    """A database of the events: its live reader, and one reading the kept answers
    (every closed day sealed) of the answers by agent (`every`: of every question)."""
    exporter = await make_exporter(name, database=name)
    await exporter.export(ExportBatch("all", EVENTS))
    live = exporter.reader
    questions = finops.run_questions()
    sealed = dataclasses.replace(live, seals=SealedRuns(
        live.schema, questions if every else questions[:1]))
    assert sealed.seals is not None
    assert len(sealed.seals.seal(sealed, now=NOW)) == DAYS
    return live, sealed


def answers(reader: Reader, window: Window, every: bool = False,
            ) -> dict[Any, dict[str, Any]]:
    """The answer by agent (`every`: each sealed question's), each group and total keyed
    by its question."""
    out: dict[Any, dict[str, Any]] = {}
    for by in finops.RUN_DIMENSIONS if every else ["agent"]:
        report = finops.runs(reader, window, by, top=None)
        out |= {(by, r[by]): r for r in report["rows"]} | {(by, "TOTAL"): report["total"]}
    if not every:
        return out
    report = analytics.agents(reader, window)
    out |= {("agents", r["agent"]): r for r in report["agents"]}
    return out | {("agents", "TOTAL"): report["totals"]}


# Windows holding whole closed days (the others are answered live alone): 7 days ending
# anywhere, since/until at midnight, and from an hour.
SEALABLE = [WINDOWS[i] for i in (6, 9, 10, 12)]


# For the answers after a change: a week ending anywhere, and the whole data.
FEW = [WINDOWS[i] for i in (6, 9)]


def same_answers(live: Reader, sealed: Reader, windows: list[Window] = FEW,
                 every: bool = False) -> None:
    check((f"runs {where(w)}", answers(sealed, w, every), answers(live, w, every))
          for w in windows)


def event_like(e: Event, **changes: Any) -> Event:
    return msgspec.structs.replace(e, event_id=f"{e.event_id}-late", **changes)


@in_module_loop
async def test_kept_answers_equal_the_live_ones_over_windows_cut_anywhere(make_exporter):
    live, sealed = await stored(make_exporter, "sealed_plain", every=True)
    same_answers(live, sealed, SEALABLE, every=True)


@in_module_loop
async def test_a_day_is_sealed_an_hour_after_it_is_over(make_exporter):
    exporter = await make_exporter("sealed_settle", database="sealed_settle")
    await exporter.export(ExportBatch("all", EVENTS))
    reader = dataclasses.replace(exporter.reader, seals=finops.sealed_runs(
        exporter.reader.schema))
    assert reader.seals is not None
    days = reader.seals.seal(reader, now=START + timedelta(days=4, minutes=59))
    assert [d.isoformat() for d in days] == ["2025-03-01", "2025-03-02", "2025-03-03"]


@in_module_loop
async def test_an_event_arriving_late_for_a_sealed_day_counts_before_and_after_a_new_seal(
        make_exporter):
    """Until sealed again the day is answered from its rows; then from its new seal only
    (the older one deleted)."""
    live, sealed = await stored(make_exporter, "sealed_late")
    call = next(e for e in EVENTS if e.trace_id is None and e.cost_usd)
    late = [event_like(call, timestamp=int(START.timestamp()) * SECOND + 3 * DAY_NS + SECOND)]
    await export_later(make_exporter, "sealed_late", late)
    same_answers(live, sealed)
    assert sealed.seals is not None
    assert [d.isoformat() for d in sealed.seals.seal(sealed, now=NOW)] == ["2025-03-04"]
    same_answers(live, sealed)
    [(seals,)] = live.client.query(
        "SELECT uniqExact(seal) FROM sealed_late.llm_usage_run_seals "
        "WHERE day = '2025-03-04'").result_rows
    assert seals == 1


@in_module_loop
async def test_a_run_going_on_days_after_its_day_was_sealed_is_one_run(make_exporter):
    """A run contained in its day when sealed gets calls four days later: counted once,
    its later calls taking its agent; and once both days are sealed again (the run then
    spanning them), still once."""
    live, sealed = await stored(make_exporter, "sealed_continued")
    run = [e for e in EVENTS if e.trace_id == _contained_run()]
    later = [event_like(e, timestamp=e.timestamp + 4 * DAY_NS, agent_name=None,
                        operation="chat") for e in run[:2]]
    await export_later(make_exporter, "sealed_continued", later)
    same_answers(live, sealed)
    assert sealed.seals is not None
    assert [d.isoformat() for d in sealed.seals.seal(sealed, now=NOW)] == [
        "2025-03-04", "2025-03-08"]
    same_answers(live, sealed)


@in_module_loop
async def test_hours_held_open_are_answered_from_the_events(make_exporter):
    live, sealed = await stored(make_exporter, "sealed_open")
    hours = [int(START.timestamp()) + 86400 * d + 3600 * h for d, h in ((1, 5), (6, 0))]
    repair.open_hours(live.client, live.schema, hours, "writing")
    try:
        same_answers(live, sealed)
    finally:
        repair.close_hours(live.client, live.schema, hours, "writing")


@in_module_loop
async def test_a_window_of_sealed_days_reads_their_kept_answers_not_their_rows(
        make_exporter):
    """What makes it fast: with the rows of the sealed days' contained runs gone from
    the trace rollup, the answers over those days stay what they were."""
    live, sealed = await stored(make_exporter, "sealed_rows")
    window = Window(START + timedelta(days=1), START + timedelta(days=4))
    before = answers(live, window)
    live.client.command(
        "DELETE FROM sealed_rows.llm_usage_trace_1h WHERE hour >= toDateTime('2025-03-02') "
        "AND hour < toDateTime('2025-03-05') AND trace_id NOT IN "
        "(SELECT trace_id FROM sealed_rows.llm_usage_run_spanning)")
    assert answers(live, window) != before  # (the live answer reads those rows)
    check([(f"runs {where(window)}", answers(sealed, window), before)])


@in_module_loop
async def test_the_finops_extension_seals_the_closed_days_and_reads_them(make_exporter):
    exporter = await make_exporter("sealed_ext", database="sealed_ext")
    await exporter.export(ExportBatch("all", EVENTS))
    extension = finops_of(exporter, seal_interval="0.1s")
    await extension.start()
    try:
        client, days = exporter.reader.client, 0
        for _ in range(300):
            await asyncio.sleep(0.1)
            if client.query("EXISTS TABLE sealed_ext.llm_usage_run_seals").result_rows[0][0]:
                [(days,)] = client.query("SELECT uniqExact(day) FROM "
                                         "sealed_ext.llm_usage_run_seals").result_rows
            if days == DAYS:
                break
        assert days == DAYS
        reader = await extension.connect()
        assert reader.seals is extension.seals
        same_answers(exporter.reader, reader, FEW[1:])
    finally:
        await extension.shutdown()


def _contained_run() -> str:
    """A run whose events are all on one day of the data, in the middle."""
    days: dict[str, set[int]] = {}
    for e in EVENTS:
        if e.trace_id:
            days.setdefault(e.trace_id, set()).add(e.timestamp // DAY_NS)
    middle = int(START.timestamp()) * SECOND // DAY_NS + 3
    return next(t for t, d in sorted(days.items()) if d == {middle})


async def export_later(make_exporter, name: str, events: list[Event]) -> None:
    """`events` stored into the database `name` by another exporter (as a writer would)."""
    exporter = await make_exporter(f"{name}-2", database=name)
    await exporter.export(ExportBatch("late", events))
