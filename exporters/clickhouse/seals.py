"""Sealed run answers: each closed day's answer kept, so that a month is 30 rows a group.

An answer per run (`Reader.select_with_total(per_run=...)`: spend by agent, session or
trace) groups every run of its window, and a run's figures and agent come from all its
rows: 30 days at 100 million events are 1.9 million trace-rollup rows joined to their
traces' values, over a second on two cores. No rollup can hold it (a run is counted once
however many hours it spans), but a day's runs do not change once the day is over: a
`SealedRuns` computes, for each closed day and each of its questions, the answer over
that day's runs (`select_with_total`'s groups and total, before any HAVING or LIMIT)
and keeps it; a window's answer is then the kept answers of its whole closed days merged
with the same query over the rest, its ends and today's runs (each figure an aggregate
that merges: `sum`, `min`, `max`, `groupUniqArrayArray`).

What makes it exact, whatever arrives late or races:

- **Only runs contained in the day.** A run that also has rows on another day (as seen
  when sealing: the whole trace rollup) is *spanning*: it is left out of the day's
  answer and listed with its hours there, and answers compute it live from its rows in
  their window (reading those hours of the sealed days, no others).
- **A day is sealed an hour after it is over** (`SETTLE`): a run crossing midnight is
  then seen on both sides, unless it goes on later (below).
- **A seal holds while its day counts the same events.** It keeps the day's event
  count (the daily model rollup's); an event arriving late for that day, a rollup
  rebuilt, or an hour of it open (being written: answers read it from raw events) makes
  the count differ or the day open, and the day is answered live until sealed again.
- **A run sealed as contained that goes on later** (an event of its trace on another
  day, after the seal) would be counted twice: answers check the runs they compute live
  against each kept day's contained runs (64-bit hashes of their trace ids: a collision
  only costs time) and answer a day that shares one live as well.

A seal is written all or nothing for readers: its answers, spanning runs and contained
hashes first, then the row in `..._run_seals` that makes it the day's latest (a day
sealed again reads only its latest seal; older ones are deleted after). A `Reader` given a
`SealedRuns` (`seals=`) reads them; sealing runs in the `finops` extension
(`seal_interval`) and in `bench/clickhouse_bench.py`. On a cluster nothing is sealed
(answers are computed live).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from meterline.exporters.clickhouse.query import (
    EARLIEST,
    Condition,
    Dimension,
    Expressions,
    Reader,
    Where,
    Window,
    literal,
    settings_clause,
    sql_time,
)
from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, Schema

SETTLE = timedelta(hours=1)  # a day is sealed this long after it is over
_DAY = timedelta(days=1)
# How a kept figure merges with the same figure of other days and of the live rows.
_MERGES = {"sum": "sum", "min": "min", "max": "max",
           "groupUniqArrayArray": "groupUniqArrayArray"}
_AGGREGATE = re.compile(r"^(\w+)\(")
_WRITE = settings_clause({"insert_deduplicate": 0, **FINAL_SETTINGS})
_DELETE = settings_clause({"lightweight_deletes_sync": 2, "mutations_sync": 2})


@dataclass(frozen=True)
class Question:
    """One per-run answer kept per day: `select_with_total`'s arguments."""

    by: Dimension
    filters: tuple[Where, ...]
    per_run: Expressions
    extra: Expressions

    def __post_init__(self) -> None:
        for name, sql in self.extra.items():
            if not isinstance(sql, str) or _merge(sql) is None:
                raise ValueError(f"a sealed figure must be one of {', '.join(_MERGES)} "
                                 f"over the runs: {name} = {sql!r}")

    @property
    def key(self) -> str:
        return _key(self.by, self.filters, self.per_run, self.extra)


def _key(by: Dimension, filters: Sequence[Where], per_run: Expressions,
         extra: Expressions) -> str:
    """Names a question's table: another question, or a figure defined otherwise (its SQL
    changed), is another table, never read as this one."""
    def sql(expressions: Expressions) -> list[tuple[str, str]]:
        return sorted((name, v if isinstance(v, str) else f"{v.sql('raw')} {v.sql('rollup')}")
                      for name, v in expressions.items())

    text = repr((by, [f.sql("raw") for f in filters], sql(per_run), sql(extra)))
    return f"{by.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _merge(sql: str) -> str | None:
    match = _AGGREGATE.match(sql)
    return _MERGES.get(match.group(1)) if match and sql.endswith(")") else None


class SealedRuns:
    """The kept answers of `questions`: written by `seal`, read through `Reader`."""

    def __init__(self, schema: Schema, questions: Sequence[Question]) -> None:
        self.schema = schema
        self.questions = {q.key: q for q in questions}
        self._seals = schema.qualified(schema.usage_table("run_seals"))
        self._spanning = schema.qualified(schema.usage_table("run_spanning"))
        self._contained = schema.qualified(schema.usage_table("run_contained"))
        self._tables: set[str] | None = None  # the questions' tables that exist

    def table(self, question: Question) -> str:
        return self.schema.qualified(self.schema.usage_table(f"runs_{question.key}"))

    # --- reading -------------------------------------------------------------------
    def for_question(self, by: Sequence[Dimension], filters: Sequence[Where],
                     per_run: Expressions, extra: Expressions) -> _Answers | None:
        """What `Reader.select_with_total` reads for this question (`Reader.seals`), or
        None if it is not one of the sealed questions."""
        if len(by) != 1 or self.schema.cluster:
            return None
        question = self.questions.get(_key(by[0], filters, per_run, extra))
        return _Answers(self, question) if question else None

    def exists(self, reader: Reader, question: Question) -> bool:
        if self._tables is None:
            self._tables = {row[0] for row in reader.client.query(
                f"SELECT name FROM system.tables WHERE database = "
                f"{literal(self.schema.database)}").result_rows}
        return self.schema.usage_table(f"runs_{question.key}") in self._tables

    # --- sealing -------------------------------------------------------------------
    def seal(self, reader: Reader, now: datetime | None = None,
             most: int | None = None) -> list[date]:
        """Seal the closed days (those `SETTLE` allows) whose latest seal is missing or
        no longer holds (at most `most` of them, the latest first), then the days whose
        contained runs went on into a day sealed now; returns the days sealed. Blocking:
        run it in a thread."""
        if self.schema.cluster:
            return []
        self._create(reader)
        last = ((now or datetime.now(UTC)) - SETTLE).date() - _DAY
        client = reader.client
        counts = self._counts(client, EARLIEST.date(), last + _DAY)
        latest = {(q, d): n for q, d, n in client.query(
            f"SELECT question, day, argMax(events, seal) FROM {self._seals} "
            f"WHERE day <= {_day(last)} GROUP BY question, day").result_rows}
        opened = self._open_days(client)
        stale = sorted(d for d, n in counts.items() if d not in opened and any(
            latest.get((q, d)) != n for q in self.questions))[-most if most else 0:]
        self._seal_days(reader, stale, counts)
        continued = sorted(d for d in self._continued(client, stale)
                           if d in counts and d not in opened and d not in stale)
        self._seal_days(reader, continued, counts)
        if stale or continued:
            self._drop_superseded(client)
        return sorted([*stale, *continued])

    def _create(self, reader: Reader) -> None:
        """The tables, unless all are there already (a question's table is made from its
        query, which takes a planning of that query)."""
        if all(self.exists(reader, q) for q in self.questions.values()):
            return
        client = reader.client
        for sql in (
            f"CREATE TABLE IF NOT EXISTS {self._seals} (question String, day Date, "
            "seal UInt64, events UInt64) ENGINE = MergeTree ORDER BY (question, day, seal)",
            f"CREATE TABLE IF NOT EXISTS {self._spanning} (day Date, seal UInt64, "
            "trace_id String, hour DateTime('UTC')) ENGINE = MergeTree "
            "ORDER BY (day, seal, trace_id)",
            f"CREATE TABLE IF NOT EXISTS {self._contained} (day Date, seal UInt64, "
            "h UInt64) ENGINE = MergeTree ORDER BY (day, seal, h)",
        ):
            client.command(sql)
        a_day = Window(datetime(2000, 1, 1, tzinfo=UTC), datetime(2000, 1, 2, tzinfo=UTC))
        for question in self.questions.values():
            client.command(
                f"CREATE TABLE IF NOT EXISTS {self.table(question)} ENGINE = MergeTree "
                f"ORDER BY (_day, _seal) EMPTY AS SELECT toDate('2000-01-01') AS _day, "
                f"toUInt64(0) AS _seal, * FROM ({self._answer_sql(reader, question, a_day)})")
        self._tables = None

    def _counts(self, client: Any, start: date, end: date) -> dict[date, int]:
        return dict(client.query(
            f"SELECT {_count_sql(self.schema, start, end)}").result_rows)

    def _open_days(self, client: Any) -> set[date]:
        return {row[0] for row in client.query(
            f"SELECT DISTINCT toDate(hour) FROM {self.schema.open_hours}").result_rows}

    def _seal_days(self, reader: Reader, days: Sequence[date],
                   counts: dict[date, int]) -> None:
        """Seal `days`, a month at a time: their spanning runs (one pass over the trace
        rollup), their contained runs' hashes, each question's answer over each day's
        contained runs, then the seal rows that make them read."""
        client, trace = reader.client, self.schema.qualified(self.schema.trace_rollup.table)
        for chunk in (days[i:i + 31] for i in range(0, len(days), 31)):
            seal = time.time_ns()
            listed = ", ".join(map(_day, chunk))
            on_days = (f"hour >= {_time(chunk[0])} AND hour < {_time(chunk[-1] + _DAY)} "
                       f"AND toDate(hour) IN ({listed})")
            client.command(  # (each hour of theirs: answers read those hours for them)
                f"INSERT INTO {self._spanning} (day, seal, trace_id, hour) {_WRITE} "
                f"SELECT toDate(hour) AS day, {seal}, trace_id, hour FROM {trace} WHERE "
                f"{on_days} AND trace_id IN (SELECT trace_id FROM {trace} WHERE trace_id IN "
                f"(SELECT trace_id FROM {trace} WHERE {on_days} AND trace_id != '') "
                f"GROUP BY trace_id HAVING min(toDate(hour)) != max(toDate(hour))) "
                f"GROUP BY day, trace_id, hour")
            spanning = f"(SELECT trace_id FROM {self._spanning} WHERE seal = {seal})"
            client.command(
                f"INSERT INTO {self._contained} (day, seal, h) {_WRITE} "
                f"SELECT toDate(hour) AS day, {seal}, cityHash64(trace_id) FROM {trace} "
                f"WHERE {on_days} AND trace_id != '' AND trace_id NOT IN {spanning} "
                f"GROUP BY day, trace_id")
            contained = Condition(f"trace_id NOT IN {spanning}", whole_runs=True)
            for day in chunk:
                window = Window(_at(day), _at(day + _DAY))
                for question in self.questions.values():
                    client.command(
                        f"INSERT INTO {self.table(question)} {_WRITE} SELECT {_day(day)}, "
                        f"{seal}, * FROM ({self._answer_sql(reader, question, window, contained)})")
            rows = " UNION ALL ".join(
                f"SELECT {literal(q)}, {_day(day)}, {seal}, {int(counts[day])}"
                for day in chunk for q in self.questions)
            client.command(f"INSERT INTO {self._seals} (question, day, seal, events) "
                           f"{_WRITE} {rows}")

    def _answer_sql(self, reader: Reader, question: Question, window: Window,
                    *more: Where) -> str:
        return reader.grouped_sql(window, by=[question.by],
                                  filters=[*question.filters, *more],
                                  per_run=question.per_run, extra=question.extra)

    def _continued(self, client: Any, days: Sequence[date]) -> set[date]:
        """The sealed days other than `days` some of whose contained runs have rows on
        one of `days`: a run that went on after its day was sealed."""
        if not days:
            return set()
        trace = self.schema.qualified(self.schema.trace_rollup.table)
        listed = ", ".join(_day(d) for d in days)
        return {row[0] for row in client.query(
            f"SELECT DISTINCT day FROM {self._contained} WHERE day NOT IN ({listed}) "
            f"AND h IN (SELECT cityHash64(trace_id) FROM {trace} WHERE toDate(hour) IN "
            f"({listed}) AND trace_id != '')").result_rows}

    def _drop_superseded(self, client: Any) -> None:
        """Delete the rows of the seals a later seal of their day replaced (not those of
        a seal still being written, which has no row in `..._run_seals` yet)."""
        old = (f"IN (SELECT day, seal FROM {self._seals}) AND ({{day}}, {{seal}}) NOT IN "
               f"(SELECT day, max(seal) FROM {self._seals} GROUP BY day)")
        for table, day, seal in ((self._spanning, "day", "seal"),
                                 (self._contained, "day", "seal"),
                                 *((self.table(q), "_day", "_seal")
                                   for q in self.questions.values()),
                                 (self._seals, "day", "seal")):
            client.command(f"DELETE FROM {table} WHERE ({day}, {seal}) "
                           f"{old.format(day=day, seal=seal)} {_DELETE}")


@dataclass(frozen=True)
class _Answers:
    """One question's kept answers, as `Reader` reads them (`query.SealedAnswers`)."""

    sealed: SealedRuns
    question: Question

    def grouped_sql(self, reader: Reader, window: Window, by: Sequence[Dimension],
                    extra: Expressions, live: Callable[[Sequence[Where]], str]) -> str | None:
        valid = self.valid_seals(reader, window)
        if not valid:
            return None
        sealed = self.sealed
        seals = _seal_list(valid)
        # The rows computed live: those outside the sealed days, and the spanning runs'
        # in them, each a condition on the rows' hour (which leads the sort key: a query
        # reads those hours only, not every row's trace id).
        kept = [f"({{t}} >= {_time(a)} AND {{t}} < {_time(b)})"
                for a, b in _outside(window.since, window.until, (d for d, _ in valid))]
        hours = [_at_unix(h) for (h,) in reader.client.query(
            f"SELECT DISTINCT toUnixTimestamp(hour) AS h FROM {sealed._spanning} WHERE "
            f"(day, seal) IN ({seals}) ORDER BY h").result_rows]
        if hours:
            kept.append(f"(toStartOfHour({{t}}) IN ({', '.join(hours)}) AND trace_id IN "
                        f"(SELECT trace_id FROM {sealed._spanning} WHERE (day, seal) IN "
                        f"({seals})))")
        keep = Condition(" OR ".join(kept) or "0", whole_runs=True)
        keys = ", ".join(f"`_{n}`" for n in ("is_total", *(d.name for d in by)))
        columns = ", ".join([keys, *(f"`_{n}`" for n in extra)])
        merged = ", ".join([keys, *(f"{_merge(str(sql))}(`_{n}`) AS `_{n}`"
                                    for n, sql in extra.items())])
        return (f"SELECT {merged} FROM (SELECT {columns} FROM ({live([keep])}) UNION ALL "
                f"SELECT {columns} FROM {sealed.table(self.question)} WHERE (_day, _seal) "
                f"IN ({seals})) GROUP BY {keys}")

    def valid_seals(self, reader: Reader, window: Window) -> list[tuple[date, int]]:
        """The whole days of `window` whose answers are read from their latest seal (and
        that seal): it counts the events the day holds, none of its hours is open, and
        none of its contained runs has rows among those the answer computes live. Small
        queries of their own, their findings written into the next as literals: chDB
        plans a query in time that grows with its text, and these subqueries written
        into the answer would be planned in each branch its rows are read from."""
        start, end = _ceil_day(window.since), _floor_day(window.until)
        if end <= start or not self.sealed.exists(reader, self.question):
            return []
        schema, sealed, client = self.sealed.schema, self.sealed, reader.client
        opened = dict(client.query(  # (Unix seconds: the hour, and its day)
            f"SELECT toUnixTimestamp(hour), toDate(hour) FROM {schema.open_hours} WHERE "
            f"hour >= {_time(_floor_hour(window.since))} AND hour < {_time(window.until)}"
        ).result_rows)
        candidates = dict(client.query(
            f"SELECT day, latest FROM (SELECT day, max(seal) AS latest, argMax(events, seal) "
            f"AS n FROM {sealed._seals} WHERE question = {literal(self.question.key)} AND "
            f"day >= {_day(start)} AND day < {_day(end)} GROUP BY day) AS _s INNER JOIN "
            f"(SELECT {_count_sql(schema, start, end)}) AS _c ON _s.day = _c.day "
            f"WHERE _s.n = _c.n").result_rows)
        for day in opened.values():
            candidates.pop(day, None)
        if not candidates:
            return []
        seals = _seal_list(candidates.items())
        # the runs the answer computes live: those of its other hours, spanning days, or
        # in hours held open (which may not be in the trace rollup yet)
        trace = schema.qualified(schema.trace_rollup.table)
        other = " OR ".join(f"(hour >= {_time(a)} AND hour < {_time(b)})" for a, b in
                            _outside(_floor_hour(window.since), window.until, candidates))
        live_runs = [f"SELECT trace_id FROM {sealed._spanning} WHERE (day, seal) IN ({seals})"]
        if other:
            live_runs.append(f"SELECT trace_id FROM {trace} WHERE {other}")
        if opened:
            live_runs.append(
                f"SELECT trace_id FROM {schema.deduplicated_events} WHERE "
                f"{window.condition('timestamp')} AND toStartOfHour(timestamp) IN "
                f"({', '.join(map(_at_unix, sorted(opened)))})")
        continued = {row[0] for row in client.query(
            f"SELECT DISTINCT day FROM {sealed._contained} WHERE (day, seal) IN ({seals}) "
            f"AND h IN (SELECT cityHash64(trace_id) FROM ({' UNION ALL '.join(live_runs)}) "
            f"WHERE trace_id != '') {settings_clause(FINAL_SETTINGS)}").result_rows}
        return sorted((day, int(seal)) for day, seal in candidates.items()
                      if day not in continued)


def _seal_list(seals: Iterable[tuple[date, int]]) -> str:
    """SQL: (day, seal) tuples, for `(day, seal) IN (...)`."""
    return ", ".join(f"({_day(day)}, {int(seal)})" for day, seal in seals)


def _outside(since: datetime, until: datetime,
             days: Iterable[date]) -> list[tuple[datetime, datetime]]:
    """The parts of [since, until) outside `days` (whole days), in order."""
    parts, at = [], since
    for day in sorted(days):
        if _at(day) > at:
            parts.append((at, min(_at(day), until)))
        at = max(at, _at(day + _DAY))
    if at < until:
        parts.append((at, until))
    return parts


def _count_sql(schema: Schema, start: date, end: date) -> str:
    """SQL (columns and FROM): each day's event count from the daily model rollup."""
    rollup = schema.model_rollups[1]
    day = f"toDate({rollup.time_column})"
    return (f"{day} AS day, sum(events) AS n FROM {schema.qualified(rollup.table)} "
            f"WHERE {rollup.time_column} >= {_time(start)} AND {rollup.time_column} < "
            f"{_time(end)} GROUP BY day")


def _at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _day(day: date) -> str:
    return f"toDate('{day.isoformat()}')"


def _time(value: date | datetime) -> str:
    return sql_time(value if isinstance(value, datetime) else _at(value))


def _at_unix(seconds: int) -> str:
    return sql_time(datetime.fromtimestamp(seconds, UTC))


def _ceil_day(value: datetime) -> date:
    day = value.date()
    return day if value == _at(day) else day + _DAY


def _floor_day(value: datetime) -> date:
    return value.date()


def _floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)
