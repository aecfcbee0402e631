"""Rollup repair: recent hours whose rollups count an event twice are rebuilt.

Two writers may store the same event at the same moment (two collectors of a
Kafka consumer group during a rebalance, both inserting a redelivered batch):
each one's "already stored?" check runs before the other's insert. `llm_events`
then holds two copies until `ReplacingMergeTree` merges them, and queries on it
read it deduplicated (`FINAL`) meanwhile; but the materialized views added both
copies to the rollups, which no merge takes back.

A repair pass looks at the last `repair_lookback` hours: per hour, the events the
rollups count (`sum(events)`, each rollup) against the distinct `event_id`s in
`llm_events`. An hour whose rollup counts more is rebuilt: its rollup rows are
deleted and written again from the deduplicated events with the views' own query
(`Schema.rollup_select`, over `metrics.AGGREGATES`). The rollups are read before
the events, so an insert landing during the check can only make the events
count more, never flag an hour that is right.

A pass is cheap: a few `GROUP BY hour`s over the look-back, then two statements
per rollup when some hour needs them. An insert into an hour in the instant
between its delete and its rewrite would be counted twice again: the next pass
sees that and rebuilds the hour once more, so the rollups converge.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from exporters.clickhouse.schema import Schema

# Deleting waits until the rows are gone. A rewrite is never taken for a retry of an
# earlier one: servers that deduplicate `INSERT ... SELECT` blocks would otherwise skip an
# hour rebuilt a second time with the same rows (chDB 26.9 does not deduplicate them).
_DELETE_SETTINGS = {"lightweight_deletes_sync": 2, "mutations_sync": 2}
_REWRITE_SETTINGS = {"insert_deduplicate": 0, "distributed_foreground_insert": 1}


def overcounted_hours(client: Any, schema: Schema, since: datetime) -> list[int]:
    """The hours (Unix seconds) from `since` on whose rollups count more events than
    `llm_events` holds distinct event ids."""
    start = f"toDateTime({int(since.timestamp())}, 'UTC')"
    rolled: dict[int, int] = {}
    for rollup in schema.rollups:  # before the events: see the module's docstring
        for hour, events in client.query(
                f"SELECT toUnixTimestamp(toStartOfHour({rollup.time_column})) AS h, "
                f"sum(events) FROM {schema.qualified(rollup.table)} "
                f"WHERE {rollup.time_column} >= {start} GROUP BY h").result_rows:
            rolled[hour] = max(rolled.get(hour, 0), events)
    stored = dict(client.query(
        "SELECT toUnixTimestamp(toStartOfHour(timestamp)) AS h, uniqExact(event_id) "
        f"FROM {schema.qualified(schema.events)} WHERE timestamp >= {start} "
        "GROUP BY h").result_rows)
    return sorted(hour for hour, events in rolled.items() if events > stored.get(hour, 0))


def rebuild(client: Any, schema: Schema, hours: list[int]) -> None:
    """Write the rollups of `hours` again from the deduplicated events."""
    listed = ", ".join(f"toDateTime({hour}, 'UTC')" for hour in hours)
    for rollup in schema.rollups:
        client.command(schema.delete_rollup_hours(rollup, listed), settings=_DELETE_SETTINGS)
        client.command(schema.rebuild_rollup_hours(rollup, listed), settings=_REWRITE_SETTINGS)


def repair(client: Any, schema: Schema, lookback: timedelta,
           now: datetime | None = None) -> list[int]:
    """One pass over the hours of the last `lookback`: returns the hours rebuilt."""
    start = (now or datetime.now(UTC)) - lookback
    hours = overcounted_hours(client, schema, start.replace(minute=0, second=0, microsecond=0))
    if hours:
        rebuild(client, schema, hours)
    return hours
