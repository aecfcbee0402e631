"""Open hours and rollup repair: no answer counts what a rollup holds twice or short.

The rollups are filled by materialized views as each insert lands, and two things
can make them disagree with the raw events:

- **An event stored twice.** Two writers may store the same event at the same moment
  (two collectors of a Kafka consumer group during a rebalance, both inserting a
  redelivered batch): each one's "already stored?" check runs before the other's
  insert. `llm_events` then holds two copies until `ReplacingMergeTree` merges them,
  and queries on it read it deduplicated (`FINAL`) meanwhile; but the views added both
  copies to the rollups, which no merge takes back.
- **An insert cut short.** An insert and the inserts of its views are not one atomic
  step: a daemon killed (`kill -9`, power loss) after the raw rows were written but
  before some view's were leaves the rollups short.

So a writer holds the hours it writes *open* (a `+1` mark under its token in
`llm_usage_open_hours`, before the insert) until they are known to count right
(`-1`), and answers read open hours from the raw events. After its insert the
exporter looks its batch's ids up for copies; of two writers racing, the one that
looks last sees both. If it finds some, it waits for the writers that opened those
hours before it, checks them, and rebuilds those counted wrong (`reconcile`).

A check compares, per hour and per rollup (per day for a daily rollup, per key for the
metadata rollup), the events the rollup counts (`sum(events)`) with the distinct
events in `llm_events` (its rows read `FINAL`); a rebuild, under a mark of its own,
deletes the rollup rows and writes them again from the deduplicated events with the
views' own query (`Schema.rollup_select`), checks again, and closes its mark once
right. The exporter also checks:

- every `repair_interval`, the hours of the last `repair_lookback`, and the hours of
  marks abandoned by a writer that died mid-insert (closed once right);
- right after a batch some of whose events were already stored (a redelivery after a
  crash, or a source sending again), those events' hours.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from meterline.exporters.clickhouse.query import literal, settings_clause
from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, Rollup, Schema

# Deleting waits until the rows are gone. A rewrite (or a mark) is never taken for a
# retry of an earlier one: servers that deduplicate `INSERT ... SELECT` blocks would
# otherwise skip an hour rebuilt a second time with the same rows (chDB 26.9 does not
# deduplicate them); on a cluster it is on the shards before the call returns.
_DELETE_SETTINGS = {"lightweight_deletes_sync": 2, "mutations_sync": 2}
_WRITE_SETTINGS = {"insert_deduplicate": 0, "distributed_foreground_insert": 1}


# A mark older than this is a writer's that died (or timed out) mid-insert: the repair
# pass checks its hours, rebuilds them if need be, and closes it.
ABANDONED_AFTER = 600
_REBUILD_TRIES = 3
WAIT_FOR_OLDER = 60.0  # seconds a writer waits for the writers that opened hours before it


def miscounted_hours(client: Any, schema: Schema, *, since: int | None = None,
                     among: Collection[int] = ()) -> list[int]:
    """The hours (Unix seconds) where some rollup counts a number of events other than
    the distinct event ids `llm_events` holds: the hours from `since` on, or those
    `among` the hours listed. A rollup is compared per hour, or per bucket when its
    buckets are longer (a day, a week); a bucket it counts wrong is named by the hours
    listed in it, or by its first hour (rebuilding an hour rebuilds the whole bucket of
    the rollups that coarse)."""
    def chosen(rollup: Rollup, hour: str) -> str:
        """SQL: the check bucket of `hour` (SQL, a whole hour) is one of those asked."""
        if since is not None:
            start = rollup.check_bucket(f"toDateTime({since}, 'UTC')")
            return f"{rollup.check_bucket(hour)} >= {start}"
        return (f"{rollup.check_bucket(hour)} IN (SELECT {rollup.check_bucket('h')} "
                f"FROM (SELECT arrayJoin([{_listed(among)}]) AS h))")

    # Distinct ids counted as the rows of `FINAL` (copies of an event share its hour, the
    # table's key is (hour, event_id)): a merge of sorted parts, where `uniqExact` would
    # hold every id of an hour in memory (millions, past the query memory cap).
    def stored(rollup: Rollup) -> dict[int, int]:
        return dict(client.query(
            f"SELECT toUnixTimestamp({rollup.check_bucket('timestamp')}) AS h, count() "
            f"FROM {schema.deduplicated_events} "
            f"WHERE {chosen(rollup, 'toStartOfHour(timestamp)')} "
            f"GROUP BY h {settings_clause(FINAL_SETTINGS)}").result_rows)

    expected: dict[int, dict[int, int]] = {}  # by the length of the buckets compared
    wrong: set[int] = set()
    for rollup in schema.rollups:
        grain = max(rollup.seconds, 3600)
        if grain not in expected:
            expected[grain] = stored(rollup)
        bucket = rollup.check_bucket(rollup.time_column)
        key = "meta_key" if rollup.metadata_keys else "''"
        counted: dict[tuple[int, str], int] = {
            (h, k): n for h, k, n in client.query(
                f"SELECT toUnixTimestamp({bucket}) AS h, {key} AS k, sum(events) "
                f"FROM {schema.qualified(rollup.table)} WHERE {chosen(rollup, bucket)} "
                "GROUP BY h, k").result_rows}
        buckets = {h for h, _ in counted} | expected[grain].keys()
        for k in rollup.metadata_keys or ("",):
            miscounted = {h for h in buckets
                          if counted.get((h, k), 0) != expected[grain].get(h, 0)}
            listed = {h for h in among if h - h % grain in miscounted}
            wrong |= listed if among else miscounted
    return sorted(wrong)


def open_hours(client: Any, schema: Schema, hours: Collection[int], token: str) -> None:
    """Mark `hours` open under `token`: until closed, answers read them from the events."""
    _mark(client, schema, hours, token, 1)


def close_hours(client: Any, schema: Schema, hours: Collection[int], token: str) -> None:
    _mark(client, schema, hours, token, -1)


def _mark(client: Any, schema: Schema, hours: Collection[int], token: str, state: int) -> None:
    if not hours:
        return
    rows = " UNION ALL ".join(f"SELECT toDateTime({h}, 'UTC'), {literal(token)}, {state}"
                              for h in sorted(hours))
    # (an INSERT ... SELECT: chDB applies no setting to an INSERT ... VALUES)
    client.command(f"INSERT INTO {schema.qualified(schema.open_hours_table)} "
                   f"(hour, token, state) {settings_clause(_WRITE_SETTINGS)} {rows}")


def wait_for_older(client: Any, schema: Schema, hours: Collection[int], token: str,
                   timeout: float | None = None) -> None:
    """Wait until no other mark on `hours` opened before `token`'s is open (marks are
    ordered by when they were opened, then by token: every writer sees the same order),
    so that of writers that found the same copies, one rebuilds at a time, the others
    find the hours right after it. Marks abandoned (older than `ABANDONED_AFTER`) are not
    waited for, nor anything past `timeout` (default `WAIT_FOR_OLDER`)."""
    table = schema.qualified(schema.open_hours_table)
    mine = literal(token)
    [(since,)] = client.query(f"SELECT toUnixTimestamp(min(at)) FROM {table} "
                              f"WHERE token = {mine}").result_rows
    if not since or not hours:
        return
    deadline = time.monotonic() + (WAIT_FOR_OLDER if timeout is None else timeout)
    while time.monotonic() < deadline:
        [(older,)] = client.query(
            f"SELECT count() FROM (SELECT token, toUnixTimestamp(min(at)) AS opened "
            f"FROM {table} WHERE hour IN ({_listed(hours)}) GROUP BY hour, token "
            f"HAVING sum(state) > 0) WHERE token != {mine} "
            f"AND opened > toUnixTimestamp(now()) - {ABANDONED_AFTER} "
            f"AND (opened < {since} OR (opened = {since} AND token < {mine}))").result_rows
        if not older:
            return
        time.sleep(0.05)


def rebuild(client: Any, schema: Schema, hours: list[int], wait: bool = True) -> bool:
    """Write the rollups of `hours` (and of their days, for the daily rollups) again
    from the deduplicated events, the hours held open meanwhile; checked afterwards and
    rebuilt again (another writer may have written meanwhile). Returns whether they count
    right: if not, they stay open (answers read them from the events) until a repair
    pass gets them right."""
    token = f"rebuild:{uuid.uuid4().hex}"
    open_hours(client, schema, hours, token)
    if wait:  # (a writer's reconcile waited already: under its batch's mark)
        wait_for_older(client, schema, hours, token)
    for _ in range(_REBUILD_TRIES):
        for rollup in schema.rollups:
            client.command(f"{schema.delete_rollup_hours(rollup, _listed(hours))} "
                           f"{settings_clause(_DELETE_SETTINGS)}")
            client.command(schema.rebuild_rollup_hours(rollup, _listed(hours),
                                                       settings_clause(_WRITE_SETTINGS)))
        if not miscounted_hours(client, schema, among=hours):
            close_hours(client, schema, hours, token)
            return True
    return False


def repair(client: Any, schema: Schema, lookback: timedelta,
           now: datetime | None = None, wait: bool = True) -> list[int]:
    """One pass over the hours of the last `lookback`, and over the hours of abandoned
    marks: returns the hours rebuilt. `wait=False`: no other writer can hold an hour open
    (see `reconcile`)."""
    start = ((now or datetime.now(UTC)) - lookback).replace(minute=0, second=0, microsecond=0)
    hours = miscounted_hours(client, schema, since=int(start.timestamp()))
    if hours:
        rebuild(client, schema, hours, wait=wait)
    abandoned = client.query(
        f"SELECT toUnixTimestamp(hour), token FROM {schema.qualified(schema.open_hours_table)} "
        f"GROUP BY hour, token HAVING sum(state) > 0 "
        f"AND max(at) < now() - {ABANDONED_AFTER}").result_rows
    if abandoned:
        marked = {h for h, _ in abandoned}
        wrong = miscounted_hours(client, schema, among=marked)
        if not wrong or rebuild(client, schema, wrong, wait=wait):
            for token in {t for _, t in abandoned}:
                close_hours(client, schema, [h for h, t in abandoned if t == token], token)
        hours = sorted({*hours, *wrong})
    return hours


def reconcile(client: Any, schema: Schema, hours: Collection[int],
              token: str | None = None, wait: bool = True) -> list[int]:
    """Check the hours listed (Unix seconds) and rebuild those counted wrong: after a
    batch whose events were (some of them) stored already, or stored twice. With the
    `token` of the batch's mark, the writers that opened the hours before it are waited
    for first. Returns the hours rebuilt. `wait=False` waits for no one: where no other
    writer can be writing (the writers of an embedded directory take turns), a mark
    still open is a dead writer's, left by a kill, and waiting for it would hold every
    redelivered batch for `WAIT_FOR_OLDER`."""
    if token is not None and wait:
        wait_for_older(client, schema, hours, token)
    wrong = miscounted_hours(client, schema, among=hours)
    if wrong:
        rebuild(client, schema, wrong, wait=wait and token is None)
    return wrong


def _listed(hours: Collection[int]) -> str:
    return ", ".join(f"toDateTime({hour}, 'UTC')" for hour in sorted(hours))
