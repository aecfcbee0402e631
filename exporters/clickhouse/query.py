"""The query layer under the FinOps reports and the analytics API.

A question is: a time `Window`, the `Dimension`s to group by, `Filter`s, and the
figures wanted (`metrics.AGGREGATES`). `Reader.select` answers it from the first
family of rollups (`Schema.families`, fewest rows first) that keeps every column
the question's dimensions, filters, conditions and expressions read and every
figure it asks for: whole buckets of its coarsest grain (a week, a day), the
buckets around them from its finer ones (hours, minutes), and what is left (the
partial days around a daily rollup's) from raw events. The hours some writer
holds open are read from raw events in the same query. Anything
else (`organization`, `route`, `tag`, guardrails...) reads raw events,
deduplicated (`FINAL`: an event two writers stored is counted once); the figures
are defined once, so all give the same numbers.

Agents, sessions and traces (`agent`, `session`, `trace`) are read from the trace
rollup: an event that does not name its agent (or session) takes that of its trace
(`Dimension.trace`, an aggregate over the rows of each trace, rollup rows or events
alike, joined back to them), and `select(per_run=...)` computes figures per run (a
trace) before summing them by the dimensions asked.

Windows are whole minutes (the finest rollup's grain): `since` is rounded down
to its minute and `until` up, so `--range 24h` is the 24 hours up to the end of
the current minute, and a rollup answer equals the raw one.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from meterline.exporters.clickhouse.metrics import (
    BY_NAME,
    Figure,
    Source,
    status_expression,
)
from meterline.exporters.clickhouse.metrics import time_column as _time_column
from meterline.exporters.clickhouse.schema import COLUMNS, FINAL_SETTINGS, Rollup, Schema
from meterline.fieldpath import FieldPath
from meterline.params import quoted

RANGES = ("24h", "7d", "30d", "90d")
# What a ClickHouse DateTime holds: a window outside it is a bad parameter (400), not a
# query that fails ("date value out of range") or a datetime that overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2106, 1, 1, tzinfo=UTC)
MAX_BUCKETS = 10_000  # time buckets in one answer: 416 days by hour, 27 years by day
_RANGE = re.compile(r"^0*([0-9]+)([hd])$")  # ASCII digits: `\d` takes '٣' too
_MINUTE = timedelta(minutes=1)


# What ClickHouse string literals escape with a backslash (clickhouse-connect's `escape_str`,
# as one C-level `translate`: a batch's ids go into a query 10,000 at a time).
_ESCAPES = str.maketrans({c: "\\" + c for c in ("\\", "'", "`", "\t", "\n")})


def literal(value: str) -> str:
    """A string as a quoted, escaped ClickHouse literal."""
    return f"'{value.translate(_ESCAPES)}'"


def settings_clause(settings: Mapping[str, str | int]) -> str:
    """`SETTINGS name = value, ...`, to write into a statement rather than pass as a call's
    `settings`: clickhouse-connect's chDB backend applies those with a query of
    `system.settings`, a `SET` each and a `SET` each back, which cost an embedded insert
    more statements than its own (about a millisecond each). In an `INSERT`, the clause
    goes before its `SELECT`."""
    return "SETTINGS " + ", ".join(
        f"{name} = {literal(value) if isinstance(value, str) else int(value)}"
        for name, value in settings.items())


_LITERALS = re.compile(r"'(?:[^'\\]|\\.)*'")
_EVENT_COLUMNS = frozenset(c.name for c in COLUMNS)


def columns_read(sql: str) -> frozenset[str]:
    """The event columns an SQL expression reads (the words outside its string literals
    that name one): which rollups can answer a question that uses it."""
    return frozenset(re.findall(r"\w+", _LITERALS.sub("", sql))) & _EVENT_COLUMNS


# --- time windows ----------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    since: datetime  # inclusive, a whole minute, UTC
    until: datetime  # exclusive, a whole minute, UTC

    @classmethod
    def parse(cls, range_: str | None = None, since: str | None = None,
              until: str | None = None, now: datetime | None = None) -> Window:
        """From `range` (24h, 7d, 30d, 90d, or any Nh / Nd) ending now, or from
        `since`/`until` (ISO 8601 dates or times, UTC unless they say otherwise); `range`
        with `until` ends there. Both `range` and `since` are refused: one would be ignored."""
        if range_ and since:
            raise ValueError(f"give range or since, not both (range={quoted(range_)}, "
                             f"since={quoted(since)})")
        end = parse_time(until, "until") if until else (now or datetime.now(UTC))
        if end > LATEST:
            raise ValueError(f"until must be before {iso(LATEST)}, got {quoted(until)}")
        if end <= EARLIEST:  # (else a range ending there is refused "at most -3653d")
            raise ValueError(f"until must be after {iso(EARLIEST)}, got {quoted(until)}")
        end = _ceil_minute(end)
        if since:
            start = _floor_minute(parse_time(since, "since"))
            if start < EARLIEST:
                raise ValueError(f"since must be from {iso(EARLIEST)}, got {quoted(since)}")
        else:
            range_ = range_ or "30d"
            length = parse_range(range_)
            if length > end - EARLIEST:
                raise ValueError(f"range must start from {iso(EARLIEST)}: at most "
                                 f"{(end - EARLIEST).days}d, got {quoted(range_)}")
            start = end - length
        if start >= end:
            raise ValueError("since must be before until")
        return cls(start, end)

    @property
    def length(self) -> timedelta:
        return self.until - self.since

    def check_buckets(self, seconds: int, what: str) -> None:
        """ValueError if the window spans more than `MAX_BUCKETS` buckets of `seconds`: an
        answer by hour since 1970 would be half a million rows (seconds to compute, tens
        of megabytes to send), which no chart or table shows."""
        count = -(-int(self.length.total_seconds()) // seconds)
        if count > MAX_BUCKETS:
            raise ValueError(f"{what} answers at most {MAX_BUCKETS:,} buckets: this window "
                             f"has {count:,}; ask for a coarser bucket or a shorter window")

    def previous(self) -> Window:
        """The window of the same length just before this one."""
        return Window(self.since - self.length, self.since)

    def ending(self, length: timedelta) -> Window:
        """The last `length` of this window (the rolling 24h/7d/30d figures)."""
        return Window(self.until - length, self.until)

    def condition(self, column: str) -> str:
        """SQL: `column` (a time column, or `{t}`) falls in the window."""
        return (f"{column} >= toDateTime({int(self.since.timestamp())}, 'UTC') "
                f"AND {column} < toDateTime({int(self.until.timestamp())}, 'UTC')")

    def describe(self) -> dict[str, str]:
        return {"since": iso(self.since), "until": iso(self.until)}


def parse_range(text: str) -> timedelta:
    m = _RANGE.match(text.strip())
    if not m or int(m.group(1)[:1]) == 0:  # (leading zeros are cut: "0h" leaves "0")
        raise ValueError(f"range must be one of {', '.join(RANGES)} (or Nh, Nd), "
                         f"got {quoted(text)}")
    # (a count of more than 9 digits is longer than any window: and int() refuses 4,300)
    n = int(m.group(1)) if len(m.group(1)) <= 9 else 10**9
    days = n / 24 if m.group(2) == "h" else n
    if days > (LATEST - EARLIEST).days:  # would overflow a timedelta, and no window is longer
        raise ValueError(f"range must be at most {(LATEST - EARLIEST).days}d, got {quoted(text)}")
    return timedelta(hours=n) if m.group(2) == "h" else timedelta(days=n)


def parse_time(text: str, name: str) -> datetime:
    """`text` (ISO 8601) in UTC; ValueError naming `name` when it is none, or when its
    offset moves it past the years Python holds (0001-01-01T00:00+00:01 is in year 0)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 date or time such as 2025-05-01 or "
                         f"2025-05-01T12:00:00Z, got {quoted(text)}") from None
    except OverflowError:
        raise ValueError(f"{name} must be from {iso(EARLIEST)} to {iso(LATEST)}, "
                         f"got {quoted(text)}") from None


def iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def split(window: Window, cuts: Iterable[datetime] = ()) -> tuple[list[Window], list[Window]]:
    """The window as whole hours (for the hourly rollup) and the minutes around them (for
    the per-minute one). `cuts` are times no hour may straddle: the bounds of the
    sub-windows a question compares (this period and the previous one, rolling 24h...)."""
    hours, minutes = split_grains(window, (3600,), cuts)
    return hours, minutes


def split_grains(window: Window, grains: Sequence[int],
                 cuts: Iterable[datetime] = ()) -> list[list[Window]]:
    """The window as whole buckets of each grain (seconds, coarsest first: the
    buckets of a finer grain are what the coarser ones leave), and what is left: one list
    of windows per grain, and the rest. No bucket straddles a cut."""
    inside = (c for c in cuts if window.since < c < window.until)
    points = sorted({window.since, window.until, *inside})
    pending = [Window(a, b) for a, b in itertools.pairwise(points)]
    out: list[list[Window]] = []
    for grain in grains:
        taken: list[Window] = []
        rest: list[Window] = []
        for part in pending:
            first = _ceil(part.since, grain)
            last = _floor(part.until, grain)
            if first >= last:
                rest.append(part)
                continue
            taken.append(Window(first, last))
            rest += [Window(a, b) for a, b in ((part.since, first), (last, part.until)) if a < b]
        out.append(_joined(taken))
        pending = rest
    return [*out, _joined(sorted(pending, key=lambda w: w.since))]


def _floor(value: datetime, grain: int) -> datetime:
    seconds = int(value.timestamp())
    return datetime.fromtimestamp(seconds - seconds % grain, UTC)


def _ceil(value: datetime, grain: int) -> datetime:
    floor = _floor(value, grain)
    return floor if floor == value else floor + timedelta(seconds=grain)


def _joined(windows: list[Window]) -> list[Window]:
    out: list[Window] = []
    for w in windows:
        if out and out[-1].until == w.since:
            out[-1] = Window(out[-1].since, w.until)
        else:
            out.append(w)
    return out


def _floor_minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


def _ceil_minute(value: datetime) -> datetime:
    floor = _floor_minute(value)
    return floor if floor == value else floor + _MINUTE


# --- dimensions and filters --------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """Something to group by: `provider`, `day`, `metadata.customer_id`..."""

    name: str
    column: str | None  # the event column; None for time buckets
    expression: str = ""  # SQL over the source, `{t}` standing for its time column
    # for an event without a `column` value, SQL over the events of its trace giving the
    # trace's value (an aggregate over raw events or the trace rollup's rows, grouped by
    # trace; `{first}` stands for the time of the first event of a row)
    trace: str = ""
    grain: int = 60  # a time bucket: its length in seconds (a rollup must be as fine)

    @property
    def is_time(self) -> bool:
        return self.column is None

    @property
    def traced(self) -> str:
        """The column `Reader` adds to raw events for a `trace` dimension."""
        return f"trace_{self.name}"

    @property
    def columns(self) -> frozenset[str]:
        """The event columns a rollup needs to answer by this dimension."""
        if self.column is None:
            return frozenset()
        if not self.trace:
            return frozenset({self.column})
        return frozenset({self.column, "trace_id"}) | columns_read(self.trace)

    def traced_sql(self, source: Source) -> str:
        """The column `Reader` adds for a `trace` dimension: the value of a trace, an
        aggregate over its rows."""
        first = "timestamp" if source == "raw" else "first_seen"
        return f"{self.trace.replace('{first}', first)} AS {self.traced}"

    @property
    def splits(self) -> bool:
        """An event counts in several groups (one per tag): the rows grouped are no longer
        one per event, so no total can be taken over them."""
        return "arrayJoin" in self.expression

    @property
    def metadata_key(self) -> str | None:
        return self.name.removeprefix("metadata.") if self.column == "metadata" else None

    def sql(self, source: Source) -> str:
        if self.column == "status_code":
            return status_expression(source)
        if self.metadata_key is not None and source == "rollup":
            return "meta_value"  # the metadata rollup, on this key's rows
        if self.trace:
            return f"if({self.column} != '', {self.column}, {self.traced})"
        return (self.expression or self.column or "").replace("{t}", _time_column(source))


_DIMENSIONS = {d.name: d for d in (
    Dimension("provider", "provider"),
    Dimension("model", "model"),
    Dimension("team", "team"),
    Dimension("api_key", "api_key_id"),
    Dimension("user", "user_id"),
    Dimension("status", "status_code"),
    Dimension("day", None, "toString(toDate({t}))", grain=86400),
    Dimension("hour", None, "formatDateTime(toStartOfHour({t}), '%FT%H:00:00Z', 'UTC')",
              grain=3600),
    Dimension("organization", "organization"),
    Dimension("operation", "operation"),
    Dimension("source", "source"),
    Dimension("route", "route"),
    Dimension("upstream", "upstream"),
    Dimension("service_tier", "service_tier"),  # flex, priority... (what a tier saves)
    # each of an event's tags (an event with two counts in both groups, one with a tag
    # given twice once in its group; one without, in the "not reported" group): raw events
    Dimension("tag", "tags", "arrayJoin(if(empty(tags), [''], arrayDistinct(tags)))"),
    # agents, tools and conversations (the trace rollup). An event without agent_name is
    # the agent's of its trace: the invoke_agent event's (the first, when a run starts
    # sub-agents), else the first agent_name any event of the trace carries.
    Dimension("agent", "agent_name", trace="argMinIf(agent_name, "
              "(operation != 'invoke_agent', {first}), agent_name != '')"),
    Dimension("session", "session_id", trace="minIf(session_id, session_id != '')"),
    Dimension("trace", "trace_id"),
    Dimension("tool", "tool_name"),
)}
# What `select(per_run=...)` groups by first: a trace. The calls of no trace (each a run of
# its own) make one group, '', which the `per_run` figures take as that many runs.
RUN = Dimension("run", "trace_id")
DIMENSION_NAMES = (*_DIMENSIONS, "metadata.KEY")
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def dimension(name: str) -> Dimension:
    """The dimension `name` (as `--by` and `group_by` write it); ValueError if unknown."""
    if name in _DIMENSIONS:
        return _DIMENSIONS[name]
    if name.startswith("metadata."):
        key = name.removeprefix("metadata.")
        if not _METADATA_KEY.match(key):
            raise ValueError(f"metadata key must be letters, digits and _.:- , got {quoted(key)}")
        path = FieldPath(name)  # the one grammar: the `metadata` map, key `key`
        return Dimension(name, path.kind, f"{path.kind}[{literal(path.key)}]")
    raise ValueError(f"cannot group by {quoted(name)} "
                     f"(expected one of: {', '.join(DIMENSION_NAMES)})")


@dataclass(frozen=True)
class Condition:
    """Any SQL condition over raw events (`metrics.IS_TOOL_CALL`...); one over the value
    of a dimension with a `trace` value (`Dimension.sql`) names it in `uses`."""

    expression: str
    uses: tuple[Dimension, ...] = ()
    # It keeps or drops whole runs: a condition on a row's `trace_id` and time (`{t}`),
    # whose subqueries read other tables. It narrows the rows before their trace values
    # are computed, not after.
    whole_runs: bool = False

    @property
    def columns(self) -> frozenset[str]:
        """The event columns it reads: a rollup that keeps them all can answer."""
        if self.whole_runs:
            return frozenset({"trace_id"})
        return columns_read(self.expression).union(*(d.columns for d in self.uses))

    def sql(self, source: Source) -> str:
        """In parentheses: it is joined to others with AND."""
        return f"({self.expression.replace('{t}', _time_column(source))})"


@dataclass(frozen=True)
class Filter:
    """`column = value` on an event column (or on one metadata key)."""

    column: str
    value: str | int
    metadata_key: str | None = None

    def sql(self, source: Source) -> str:
        if self.metadata_key is not None and source == "rollup":
            return f"meta_value = {literal(str(self.value))}"  # the metadata rollup
        if self.metadata_key is not None:
            return f"metadata[{literal(self.metadata_key)}] = {literal(str(self.value))}"
        if self.column == "status_code":
            return f"{status_expression(source)} = {int(self.value)}"
        return f"{self.column} = {literal(str(self.value))}"


Where = Filter | Condition  # what narrows the events a question is about
_IS_TOTAL = "is_total"  # `Reader.select_with_total`: the total's row, not a group
Expressions = Mapping[str, str | Figure]  # a query's named expressions: SQL, or figures


class SealedQuestions(Protocol):
    """The questions whose answers are kept per closed day (`seals.SealedRuns`)."""

    def for_question(self, by: Sequence[Dimension], filters: Sequence[Where],
                     per_run: Expressions, extra: Expressions) -> SealedAnswers | None:
        ...


class SealedAnswers(Protocol):
    """Answers kept for closed days (`seals.SealedRuns`), read instead of those days'
    rows: `grouped_sql` is `select_with_total`'s query before HAVING, ORDER BY and LIMIT,
    given `live`, the same query over the rows the kept answers do not hold (narrowed
    by the conditions given), or None when none is kept for the window."""

    def grouped_sql(self, reader: Reader, window: Window, by: Sequence[Dimension],
                    extra: Expressions, live: Callable[[Sequence[Where]], str]) -> str | None:
        ...


# --- reading ---------------------------------------------------------------------------
@dataclass
class Reader:
    """Runs questions against one exporter's tables (blocking: call it in a thread)."""

    client: Any
    schema: Schema = field(default_factory=Schema)
    seals: SealedQuestions | None = None  # answers kept per closed day (`seals.py`)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        """Rows as dicts. Result names are written `_name` in SQL and stripped here: ClickHouse
        resolves a name to an alias before a column, so `sum(cost_usd) AS cost_usd` would
        capture `cost_usd` in every other expression of the query."""
        result = self.client.query(sql)
        return [{k.removeprefix("_"): v for k, v in row.items()}
                for row in result.named_results()]

    def select(self, window: Window, *, by: Sequence[Dimension] = (),
               filters: Iterable[Where] = (), figures: Iterable[str] = (),
               extra: Expressions | None = None,
               within: dict[str, tuple[str, Window]] | None = None,
               having: str | None = None, order_by: Sequence[str] = (),
               limit: int | None = None,
               per_run: Expressions | None = None) -> list[dict[str, Any]]:
        """One row per group: the dimensions (by name), the figures, `extra` expressions
        (SQL, `{t}` standing for the time of a row, or a `Figure`; results usable as
        `_name` there and in `having`), and figures `within` a part of the window (name ->
        (figure, window)). `order_by` items are result names, optionally with DESC.

        With `per_run` (name -> an aggregate: SQL or a `Figure`), the events are first
        grouped by run (`RUN`: a trace; the calls of no trace together) within each group,
        those expressions computed per run as `_name`, and `extra` then aggregates the
        runs' rows (`_run` is the trace, '' for the calls of no trace)."""
        return self.rows(self._select_sql(window, by, list(filters), figures, extra or {},
                                          within or {}, having, order_by, limit, per_run))

    def select_with_total(self, window: Window, *, by: Sequence[Dimension],
                          filters: Iterable[Where] = (), figures: Iterable[str] = (),
                          extra: Expressions | None = None, having: str | None = None,
                          order_by: Sequence[str] = (), limit: int | None = None,
                          per_run: Expressions | None = None,
                          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """`select`'s groups, and the same figures over every event of the question (not
        only the groups `having` and `limit` keep), from one query: `GROUP BY GROUPING SETS
        ((by), ())`. A second query for the total would cost as much again (each query
        costs some 40 ms on chDB whatever it reads) and read the same rows. By a dimension
        that `splits` events (tags), the total is a query of its own. With `per_run`, by
        another dimension than the run itself (`trace`), a run may be in two groups (two
        agents), which a total of the groups would count twice: the runs are then grouped
        by (the dimensions, run) and by the run alone (`GROUPING SETS`), in one pass over
        the rows and the join of their trace values, and the total sums the latter.
        A question of `seals` reads the answers kept for the closed days of its window."""
        filters = list(filters)
        if not by:
            raise ValueError("a total is that of groups: `by` cannot be empty")
        if any(d.splits for d in by):
            return (self.select(window, by=by, filters=filters, figures=figures, extra=extra,
                                having=having, order_by=order_by, limit=limit),
                    self.select(window, filters=filters, figures=figures, extra=extra)[0])
        def live(more: Sequence[Where] = ()) -> str:
            return self._grouped_sql(window, by, [*filters, *more], figures, extra or {}, {},
                                     per_run, total=True)

        sealed = (self.seals.for_question(by, filters, per_run, extra or {})
                  if self.seals is not None and per_run is not None else None)
        grouped = sealed.grouped_sql(self, window, by, extra or {}, live) if sealed else None
        rows = self.rows(self._finished(grouped or live(), having, order_by, limit,
                                        total=True))
        if not rows:  # (no run at all: the runs' grouping sets make no row, not even a total)
            return [], self.select(window, filters=filters, figures=figures, extra=extra,
                                   per_run=per_run)[0]
        for row in rows:
            del row[_IS_TOTAL]
        return rows[1:], rows[0]  # (the total comes first: `_select_sql`)

    def grouped_sql(self, window: Window, *, by: Sequence[Dimension],
                    filters: Sequence[Where], per_run: Expressions,
                    extra: Expressions) -> str:
        """`select_with_total(per_run=...)`'s query before HAVING, ORDER BY and LIMIT: the
        groups and the total's row (`_is_total`), as `seals` keeps them."""
        return self._grouped_sql(window, by, list(filters), (), extra, {}, per_run,
                                 total=True)

    def _select_sql(self, window: Window, by: Sequence[Dimension], filters: list[Where],
                    figures: Iterable[str], extra: Expressions,
                    within: dict[str, tuple[str, Window]], having: str | None,
                    order_by: Sequence[str], limit: int | None,
                    per_run: Expressions | None, total: bool = False) -> str:
        """The query of `select` (with `total`, of `select_with_total`: the total row
        first, whatever `having` and `limit` leave out)."""
        return self._finished(self._grouped_sql(window, by, filters, figures, extra, within,
                                                per_run, total),
                              having, order_by, limit, total)

    def _grouped_sql(self, window: Window, by: Sequence[Dimension], filters: list[Where],
                     figures: Iterable[str], extra: Expressions,
                     within: dict[str, tuple[str, Window]], per_run: Expressions | None,
                     total: bool = False) -> str:
        """SELECT ... GROUP BY of `_select_sql`: the groups (and the total's row)."""
        for d in by:
            if d.is_time:
                window.check_buckets(d.grain, f"an answer by {d.name}")
        inner = per_run if per_run is not None else extra
        wanted = {*(v.name for v in inner.values() if isinstance(v, Figure))}
        if per_run is None:
            wanted |= {*figures, *(figure for figure, _ in within.values())}
        reads = " ".join(v if isinstance(v, str) else v.condition or ""  # (a Figure's)
                         for v in inner.values())
        plan = self._plan([*by, *((RUN,) if per_run is not None else ())], filters, reads,
                          wanted)
        source: Source = "rollup" if plan else "raw"
        if per_run is not None:
            by_runs = total and [d.column for d in by] != [RUN.column]
            runs = self._query(source, window, [*by, RUN], filters, (), per_run, {}, [],
                               plan=plan, total=by_runs, total_by=(RUN,))
            groups = [Dimension(d.name, f"_{d.name}") for d in by]
            if by_runs:  # (the runs' rows of the total are marked: a key of the groups)
                groups = [Dimension(_IS_TOTAL, f"_{_IS_TOTAL}"), *groups]
            return self._query("raw", window, groups, [], figures, extra, {}, [],
                               rows=f"({runs})", total=total and not by_runs)
        return self._query(source, window, by, filters, figures, extra, within,
                           [bound for _, part in within.values()
                            for bound in (part.since, part.until)], plan=plan, total=total)

    @staticmethod
    def _finished(sql: str, having: str | None, order_by: Sequence[str],
                  limit: int | None, total: bool) -> str:
        """`sql` (`_grouped_sql`'s) with HAVING, ORDER BY, LIMIT and the settings."""
        if total:
            having = f"`_{_IS_TOTAL}` OR ({having})" if having else None
            order_by = [f"{_IS_TOTAL} DESC", *order_by]
            limit = limit + 1 if limit else None
        if having:
            sql += f" HAVING {having}"
        if order_by:
            sql += " ORDER BY " + ", ".join(f"`_{o.split()[0]}` {' '.join(o.split()[1:])}"
                                            for o in order_by)
        if limit:
            sql += f" LIMIT {int(limit)}"
        # (a rollup answer reads the hours being written from raw events too)
        return f"{sql} {settings_clause(FINAL_SETTINGS)}"

    def _query(self, source: Source, window: Window, by: Sequence[Dimension],
               filters: list[Where], figures: Iterable[str], extra: Expressions,
               within: dict[str, tuple[str, Window]], cuts: list[datetime],
               rows: str | None = None, plan: tuple[Rollup, ...] = (),
               total: bool = False, total_by: Sequence[Dimension] = ()) -> str:
        """SELECT ... FROM ... GROUP BY: the groups of `rows` (default: the window's
        events or rollup rows, filtered), and with `total` the row of all of them too
        (`_IS_TOTAL` 1, the dimensions not in `total_by` empty), or with `total_by` (the
        last of `by`) one such row per value of those."""
        t = _time_column(source)
        # A rollup row is marked once for each condition an aggregate tests (a part of the
        # window figures are asked `within`, a `Figure`'s condition), and the aggregates
        # test the mark: ClickHouse plans a condition written into every aggregate once per
        # aggregate and branch of the rows it reads, and on chDB planning costs more than
        # reading rollup rows (`analytics/models`, 24 aggregates over 4 parts of its
        # window: 168 -> 141 ms at 100 million events; docs/finops.md).
        conditions = [*(part.condition(t) for _, part in within.values()),
                      *(v.condition for v in extra.values()
                        if isinstance(v, Figure) and v.condition)]
        marks = ({condition: f"_if_{k}" for k, condition in enumerate(dict.fromkeys(
            conditions))} if source == "rollup" else {})

        def figure(name: str, condition: str | None) -> str:
            return BY_NAME[name].sql(source, condition and marks.get(condition, condition))

        exprs = {d.name: d.sql(source) for d in by}
        exprs |= {f: BY_NAME[f].sql(source) for f in figures}
        exprs |= {name: figure(sql.name, sql.condition) if isinstance(sql, Figure)
                  else sql.replace("{t}", t) for name, sql in extra.items()}
        exprs |= {name: figure(measured, part.condition(t))
                  for name, (measured, part) in within.items()}
        columns = ", ".join(f"{sql} AS `_{name}`" for name, sql in exprs.items())
        marked = ", ".join(f"{condition} AS {mark}" for condition, mark in marks.items())
        rows = rows or self._rows_of(window, filters, cuts, by, plan, f"{columns} {marked}")
        if marks:
            rows = f"(SELECT *, {marked} FROM {rows})"
        keys = ", ".join(f"`_{d.name}`" for d in by)
        if total:  # (`grouping` is 1 where the dimension is not a key: the total)
            kept = ", ".join(f"`_{d.name}`" for d in total_by)
            return (f"SELECT {columns}, grouping(`_{by[0].name}`) AS `_{_IS_TOTAL}` "
                    f"FROM {rows} GROUP BY GROUPING SETS (({keys}), ({kept}))")
        return f"SELECT {columns} FROM {rows}" + (f" GROUP BY {keys}" if by else "")

    def _plan(self, by: Sequence[Dimension], filters: list[Where], reads: str = "",
              figures: Iterable[str] = ()) -> tuple[Rollup, ...]:
        """The rollups that can answer (coarsest first), or () for raw events: those of the
        first family (`Schema.families`, fewest rows first) that keeps every column the
        dimensions, filters and expressions (`reads`: SQL over events) read and every
        figure wanted, at a grain no coarser than the finest time bucket asked (its
        coarser grains skipped); by a metadata key, the metadata rollup when it keeps that
        key and the question asks for no time bucket finer than a day."""
        columns = (columns_read(reads).union(*(d.columns for d in by))
                   | {f.column for f in filters if isinstance(f, Filter)}
                   | set().union(*(f.columns for f in filters if isinstance(f, Condition))))
        keys = ({d.metadata_key for d in by if d.metadata_key is not None}
                | {f.metadata_key for f in filters
                   if isinstance(f, Filter) and f.metadata_key is not None})
        finest = min((d.grain for d in by if d.is_time), default=None)
        wanted = set(figures)

        def usable(family: Sequence[Rollup]) -> tuple[Rollup, ...]:
            finer = tuple(r for r in family if finest is None or r.seconds <= finest)
            if finer and finer[-1] == family[-1] and all(
                    columns <= r.event_columns and wanted <= r.figures for r in finer):
                return finer
            return ()

        if not keys:
            return next(filter(None, map(usable, self.schema.families)), ())
        meta = self.schema.metadata_rollup
        if meta and len(keys) == 1 and keys <= set(meta.metadata_keys):
            return usable((dataclasses.replace(meta, metadata_keys=tuple(keys)),))
        return ()

    def _rows_of(self, window: Window, filters: list[Where], cuts: list[datetime],
                 by: Sequence[Dimension], plan: tuple[Rollup, ...], columns: str) -> str:
        """The FROM clause: raw events in the window, or the rows of `plan`'s rollups
        covering it (with the figures `columns`, the query's expressions, read). For a
        dimension with a `trace` value, the rows get it as a column (computed over every
        row of the window, before the filters, so that a filter leaving out a run's agent
        event does not leave its calls without agent; with `cuts` inside the window, over
        the rows of each part apart: growth's two periods are each their own `runs`
        report)."""
        uses = [d for f in filters if isinstance(f, Condition) for d in f.uses]
        traced = list({d.name: d for d in (*by, *uses) if d.trace}.values())
        pushed = [f for f in filters
                  if not traced or (isinstance(f, Condition) and f.whole_runs)]
        source: Source = "rollup" if plan else "raw"
        if plan:
            used = set(re.findall(r"\w+", " ".join([columns, *(f.sql(source) for f in filters),
                                                    *(d.traced_sql(source) for d in traced)])))
            used |= {"trace_id"} if traced else set()  # (what the trace values join on)
            rows = self._rolled_rows(window, pushed, cuts, (*plan[:-1], _narrowed(plan[-1], used)),
                                     sorted(plan[-1].figures & used))
        else:
            rows = " AND ".join([f"{self.schema.deduplicated_events} WHERE "
                                 f"{window.condition('timestamp')}",
                                 *(f.sql(source) for f in pushed)])
        if not traced:
            return rows
        # Each row joined with its trace's values (a row of no trace gets ''): a join
        # rather than a window function over the rows, which would sort them all by trace
        # (measured: 400 ms for the 1.8 million rows of 30 days at 100 million events).
        model = ", model" if source == "raw" else ""  # (a materialized column: not in *)
        inside = sorted({c for c in cuts if window.since < c < window.until})
        part = "".join(f" + ({_time_column(source)} >= {sql_time(c)})" for c in inside)
        every = f"(SELECT *{model}{f', 0{part} AS _part' if inside else ''} FROM {rows})"
        key = "trace_id, _part" if inside else "trace_id"
        values = ", ".join(d.traced_sql(source) for d in traced)
        matching = [f.sql(source) for f in filters if f not in pushed]
        return (f"(SELECT * FROM {every} AS _rows LEFT JOIN (SELECT {key}, {values} FROM "
                f"{every} WHERE trace_id != '' GROUP BY {key}) AS _traces USING ({key}))"
                + (f" WHERE {' AND '.join(matching)}" if matching else ""))

    def _rolled_rows(self, window: Window, filters: list[Where], cuts: list[datetime],
                     plan: tuple[Rollup, ...], figures: Sequence[str]) -> str:
        """Rows shaped as `plan`'s finest rollup's rows (`t`, its dimensions, `figures`):
        whole buckets from each rollup, coarsest first, and from raw events (deduplicated)
        what is left (the partial days around a daily rollup's) and every bucket that
        holds an hour some writer holds open (an insert or a rebuild in progress: see
        repair.py), so that no answer ever counts what a rollup holds twice or short."""
        parts = split_grains(window, [r.seconds for r in plan], cuts)
        finest = plan[-1]
        open_hours = self.schema.open_hours
        columns = ", ".join([*(name for name, _ in finest.dimensions), *figures])
        matching = [f.sql("rollup") for f in filters]
        if finest.metadata_keys:
            matching.append(f"meta_key = {literal(finest.metadata_keys[0])}")
        branches = []
        raw = [p.condition("timestamp") for p in parts[-1]]
        for rollup, windows in zip(plan, parts, strict=False):
            if not windows:
                continue
            when = " OR ".join(f"({p.condition(rollup.time_column)})" for p in windows)
            opened = rollup.open_buckets(open_hours)
            where = " AND ".join([f"({when})", f"{rollup.row_bucket} NOT IN "
                                               f"{opened}", *matching])
            branches.append(f"SELECT {rollup.time_column} AS t, {columns} FROM "
                            f"{self.schema.qualified(rollup.table)} WHERE {where}")
            raw_when = " OR ".join(f"({p.condition('timestamp')})" for p in windows)
            raw.append(f"(({raw_when}) AND toStartOfHour(timestamp) IN "
                       f"{rollup.open_hours_of(open_hours)})")
        where = " AND ".join([f"({' OR '.join(f'({r})' for r in raw)})",
                              *(f.sql("raw") for f in filters)])
        branches.append(self.schema.rollup_select(finest, self.schema.deduplicated_events,
                                                  where, _raw_time(finest, cuts), "t", figures))
        return f"({' UNION ALL '.join(branches)})"


def _narrowed(rollup: Rollup, used: set[str]) -> Rollup:
    """`rollup` with only the dimensions a query uses (`used`: the words of its SQL): the
    rows read are grouped again by the query's own dimensions, so the others need not be
    read, nor the raw events grouped by them (a sixth of an answer by user)."""
    keep = used | ({"meta_key"} if "meta_value" in used else set())  # (meta_value's key)
    return dataclasses.replace(rollup, dimensions=tuple(d for d in rollup.dimensions
                                                        if d[0] in keep))


def _raw_time(rollup: Rollup, cuts: Iterable[datetime]) -> str:
    """SQL: the time of the rows `Reader` makes of raw events alongside `rollup`'s: their
    bucket of it (a day's events of a user are one row, not one per minute), or the last
    cut within that bucket they are past (growth's periods meet mid-day): a row's time is
    then in every part of the window its events are in, and in the day they are in."""
    time = rollup.bucket_of("timestamp")
    inside = sorted({c for c in cuts if int(c.timestamp()) % rollup.seconds}, reverse=True)
    if not inside:
        return time
    later = ", ".join(f"timestamp >= {sql_time(c)}, greatest({time}, {sql_time(c)})"
                      for c in inside)
    return f"multiIf({later}, {time})"


def sql_time(value: datetime) -> str:
    """SQL: a moment as a UTC DateTime (whole seconds)."""
    return f"toDateTime({int(value.timestamp())}, 'UTC')"
