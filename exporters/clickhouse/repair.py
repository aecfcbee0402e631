"""Rollup repair: hours whose rollups do not count what `llm_events` holds are rebuilt.

The rollups are filled by materialized views as each insert lands, and two things
can make them disagree with the raw events for good:

- **An event stored twice.** Two writers may store the same event at the same moment
  (two collectors of a Kafka consumer group during a rebalance, both inserting a
  redelivered batch): each one's "already stored?" check runs before the other's
  insert. `llm_events` then holds two copies until `ReplacingMergeTree` merges them,
  and queries on it read it deduplicated (`FINAL`) meanwhile; but the views added both
  copies to the rollups, which no merge takes back.
- **An insert cut short.** An insert and the inserts of its views are not one atomic
  step: a daemon killed (`kill -9`, power loss) after the raw rows were written but
  before some view's were leaves the rollups short. The batch is delivered again after
  the restart, but its events are already stored, so nothing would reach the views.

A check compares, per hour and per rollup, the events the rollup counts (`sum(events)`)
with the distinct events in `llm_events` (its rows read `FINAL`); an hour where any
rollup counts differently is rebuilt: its rollup rows are deleted and written again from the
deduplicated events with the views' own query (`Schema.rollup_select`, over
`metrics.AGGREGATES`). The exporter runs the check on two occasions, both between
its own inserts (so an insert of its own is never half-visible to the check):

- every `repair_interval`, over the hours of the last `repair_lookback`;
- right after a batch some of whose events were already stored (a redelivery after a
  crash, or a source sending again), over those events' hours: a batch cut short by a
  kill is always delivered again, so the rollups are exact again as soon as the
  restarted daemon has sent its backlog.

Another writer's insert landing during a check may make an hour look wrong; the
rebuild then counts it once or twice, and the next check sees that and rebuilds the
hour again, so the rollups converge. A kill between a rebuild's delete and its
rewrite leaves the hour short until the next check.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, Schema

# Deleting waits until the rows are gone. A rewrite is never taken for a retry of an
# earlier one: servers that deduplicate `INSERT ... SELECT` blocks would otherwise skip an
# hour rebuilt a second time with the same rows (chDB 26.9 does not deduplicate them).
_DELETE_SETTINGS = {"lightweight_deletes_sync": 2, "mutations_sync": 2}
_REWRITE_SETTINGS = {"insert_deduplicate": 0, "distributed_foreground_insert": 1}


def miscounted_hours(client: Any, schema: Schema, *, since: int | None = None,
                     among: Collection[int] = ()) -> list[int]:
    """The hours (Unix seconds) where some rollup counts a number of events other than
    the distinct event ids `llm_events` holds: the hours from `since` on, or those
    `among` the hours listed."""
    def chosen(hour: str) -> str:
        if since is not None:
            return f"{hour} >= toDateTime({since}, 'UTC')"
        return f"{hour} IN ({_listed(among)})"

    # Distinct ids counted as the rows of `FINAL` (copies of an event share its hour, the
    # table's key is (hour, event_id)): a merge of sorted parts, where `uniqExact` would
    # hold every id of an hour in memory (millions, past the query memory cap).
    stored = dict(client.query(
        "SELECT toUnixTimestamp(toStartOfHour(timestamp)) AS h, count() "
        f"FROM {schema.deduplicated_events} WHERE {chosen('toStartOfHour(timestamp)')} "
        "GROUP BY h", settings=FINAL_SETTINGS).result_rows)
    wrong: set[int] = set()
    for rollup in schema.rollups:
        hour = f"toStartOfHour({rollup.time_column})"
        rolled = dict(client.query(
            f"SELECT toUnixTimestamp({hour}) AS h, sum(events) "
            f"FROM {schema.qualified(rollup.table)} WHERE {chosen(hour)} GROUP BY h").result_rows)
        wrong |= {h for h in rolled.keys() | stored.keys() if rolled.get(h, 0) != stored.get(h, 0)}
    return sorted(wrong)


def rebuild(client: Any, schema: Schema, hours: list[int]) -> None:
    """Write the rollups of `hours` again from the deduplicated events."""
    for rollup in schema.rollups:
        client.command(schema.delete_rollup_hours(rollup, _listed(hours)),
                       settings=_DELETE_SETTINGS)
        client.command(schema.rebuild_rollup_hours(rollup, _listed(hours)),
                       settings=_REWRITE_SETTINGS)


def repair(client: Any, schema: Schema, lookback: timedelta,
           now: datetime | None = None) -> list[int]:
    """One pass over the hours of the last `lookback`: returns the hours rebuilt."""
    start = ((now or datetime.now(UTC)) - lookback).replace(minute=0, second=0, microsecond=0)
    hours = miscounted_hours(client, schema, since=int(start.timestamp()))
    if hours:
        rebuild(client, schema, hours)
    return hours


def reconcile(client: Any, schema: Schema, hours: Collection[int]) -> list[int]:
    """Check the hours listed (Unix seconds) and rebuild those counted wrong: after a
    batch whose events were (some of them) stored already. Returns the hours rebuilt."""
    wrong = miscounted_hours(client, schema, among=hours)
    if wrong:
        rebuild(client, schema, wrong)
    return wrong


def _listed(hours: Collection[int]) -> str:
    return ", ".join(f"toDateTime({hour}, 'UTC')" for hour in sorted(hours))
