"""The tables: `llm_events` (one row per event), its rollups, and the open hours.

`llm_events` has a column per event field, typed (`DateTime64`,
`LowCardinality(String)`, `Map`, nullable counts and costs, ZSTD-compressed
content), partitioned by month and ordered by (hour, event_id): FinOps queries
select time ranges, and the exporter's "already stored?" check looks event ids
up within their hour. It is a `ReplacingMergeTree`, so should two writers ever
store the same event, merges keep one copy; queries read it `FINAL` meanwhile.

The rollups are `AggregatingMergeTree`s, each fed by a materialized view, of the
figures of `metrics.AGGREGATES`: `llm_usage_1m`, `_1h` and `_1d` per minute, hour
and day by provider, model, team, API key and status; `llm_usage_model_1h` and
`_1d` by provider and model; `llm_usage_user_total_7d` and `_1d` per week and day
by user (with `metrics.USER_AGGREGATES`); `llm_usage_user_1d` per day by user,
provider and model; `llm_usage_tool_1d` and `_1h` per day and hour by tool,
operation and MCP method and session (with `metrics.TOOL_AGGREGATES`);
`llm_usage_trace_1h` per hour by trace, session, agent, tool, operation, MCP method
and MCP session (with `metrics.RUN_AGGREGATES`: the runs); `llm_usage_metadata_1d`
per day by each configured metadata key (`rollup_metadata`) and value, provider and
model.
`query.Reader` answers from the first family of them (`Schema.families`) that fits
a question.

`llm_usage_open_hours` holds the hours some writer is writing (an insert, or a
rebuild of the rollups): answers read those from the events, deduplicated, so
that no answer counts an event two writers stored at once twice, nor a rollup
half rebuilt (see repair.py).

Every table keeps a window of insert deduplication tokens
(`non_replicated_deduplication_window`; replicated tables have their own), so a
retried batch is stored once, in the rollups too.

The schema migrates itself forward: `ensure_schema` creates what is missing
(a rollup new to a database with events is filled from them, a span of days at a
time, before its view exists), adds the columns a newer version defines to an existing
table (a rollup that gains a stored figure is emptied and filled again) and
applies a changed `ttl` (`MODIFY TTL`, or `REMOVE TTL`). A change to a view's
query gets a new view name (`_mv_vN`; the metadata rollup's also names its keys);
the old view is dropped. A rollup this version no longer keeps (`RETIRED_ROLLUPS`) loses
its view and its table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from meterline.event import Event
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.metrics import (
    AGGREGATES,
    BY_NAME,
    METADATA_DIMENSIONS,
    MODEL_DIMENSIONS,
    ROLLUP_DIMENSIONS,
    RUN_AGGREGATES,
    TOOL_AGGREGATES,
    TOOL_DIMENSIONS,
    TRACE_DIMENSIONS,
    USER_AGGREGATES,
    USER_DIMENSIONS,
    USER_TOTAL_DIMENSIONS,
    Aggregate,
)

VIEW_VERSION = 5  # 2: a cancelled call (499) is not an error; 3: cache hits, unestimated costs;
# 4: guardrail_blocked; 5: a cache hit costs nothing and only a cache hit saves
# Rollups an earlier version kept and this one does not (named after the events' table):
# `ensure_schema` drops their views, which would go on filling them at every insert, and
# their tables. `trace_1d`: the trace rollup is hourly (`trace_1h`) since 2026-12.
RETIRED_ROLLUPS = ("trace_1d",)
FINAL_SETTINGS = {"do_not_merge_across_partitions_select_final": 1}
# A fill reads the events deduplicated, each month partition on its own.
_FILL_SETTINGS = ("\nSETTINGS do_not_merge_across_partitions_select_final = 1, "
                  "insert_deduplicate = 0")
_TTL = re.compile(r" TTL (.+?)(?: SETTINGS |$)")
Prepare = Callable[[Sequence[Any]], Sequence[Any]]

_json = msgspec.json.Encoder()


def _empty_string(values: Sequence[Any]) -> list[Any]:
    return [v or "" for v in values]


def _empty_map(values: Sequence[Any]) -> list[Any]:
    return [v or {} for v in values]


def _empty_list(values: Sequence[Any]) -> list[Any]:
    return [v or [] for v in values]


def _guardrail_tuples(values: Sequence[Any]) -> list[Any]:
    return [[(g.rule, g.stage, g.action, g.detector or "") for g in v] if v else []
            for v in values]


def _json_text(values: Sequence[Any]) -> list[str]:
    return [_json.encode(v).decode() if v is not None else "" for v in values]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    prepare: Prepare | None = None  # event field values -> column values (None: as they are)
    materialized: str | None = None  # computed by ClickHouse, not inserted
    alias: str | None = None  # computed by ClickHouse when read, not stored

    def ddl(self) -> str:
        tail = (f" MATERIALIZED {self.materialized}" if self.materialized
                else f" ALIAS {self.alias}" if self.alias else "")
        return f"`{self.name}` {self.type}{tail}"


_LC = "LowCardinality(String)"
_TEXT = "String CODEC(ZSTD(3))"  # content and free text: compresses well

# Absent strings are stored as '' (ClickHouse keeps non-nullable strings cheaper, and
# the rollup keys cannot be nullable); counts, timings and costs are nullable, so that
# "not reported" stays distinct from 0.
COLUMNS: tuple[Column, ...] = (
    Column("event_id", "String"),
    Column("timestamp", "DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1))"),
    Column("trace_id", "String", _empty_string),
    Column("span_id", "String", _empty_string),
    Column("parent_span_id", "String", _empty_string),
    Column("source", _LC, _empty_string),
    Column("provider", _LC, _empty_string),
    Column("operation", _LC, _empty_string),
    Column("request_model", _LC, _empty_string),
    Column("response_model", _LC, _empty_string),
    Column("model", _LC, materialized="if(request_model != '', request_model, response_model)"),
    Column("streaming", "Nullable(Bool)"),
    Column("endpoint", _LC, _empty_string),
    Column("route", _LC, _empty_string),
    Column("upstream", _LC, _empty_string),
    Column("params", _TEXT, _json_text),
    Column("agent_name", _LC, _empty_string),
    Column("agent_id", "String", _empty_string),
    Column("tool_name", _LC, _empty_string),
    Column("tool_call_id", "String", _empty_string),
    Column("mcp_method", _LC, _empty_string),
    Column("mcp_session_id", "String", _empty_string),
    Column("request_bytes", "Nullable(UInt64)"),
    Column("response_bytes", "Nullable(UInt64)"),
    Column("status_code", "Nullable(UInt16)"),
    Column("error_type", _LC, _empty_string),
    Column("error_message", _TEXT, _empty_string),
    Column("finish_reasons", "Array(LowCardinality(String))", _empty_list),
    Column("input_tokens", "Nullable(UInt32)"),
    Column("output_tokens", "Nullable(UInt32)"),
    Column("cache_read_tokens", "Nullable(UInt32)"),
    Column("cache_creation_tokens", "Nullable(UInt32)"),
    Column("cache_creation_1h_tokens", "Nullable(UInt32)"),
    Column("reasoning_tokens", "Nullable(UInt32)"),
    Column("audio_input_tokens", "Nullable(UInt32)"),
    Column("audio_output_tokens", "Nullable(UInt32)"),
    Column("images", "Nullable(UInt32)"),
    Column("image_size", _LC, _empty_string),
    Column("image_quality", _LC, _empty_string),
    Column("audio_input_seconds", "Nullable(Float64)"),
    Column("audio_output_seconds", "Nullable(Float64)"),
    Column("characters", "Nullable(UInt32)"),
    Column("video_seconds", "Nullable(Float64)"),
    Column("search_queries", "Nullable(UInt32)"),
    Column("batch", "Nullable(Bool)"),
    Column("service_tier", _LC, _empty_string),
    Column("duration_ms", "Nullable(Float64)"),
    Column("provider_duration_ms", "Nullable(Float64)"),
    Column("overhead_ms", "Nullable(Float64)"),
    Column("ttft_ms", "Nullable(Float64)"),
    Column("itl_ms", "Nullable(Float64)"),
    Column("user_id", _LC, _empty_string),
    Column("api_key_id", _LC, _empty_string),
    Column("api_key_name", _LC, _empty_string),
    Column("team", _LC, _empty_string),
    Column("organization", _LC, _empty_string),
    Column("session_id", "String", _empty_string),
    Column("metadata", "Map(LowCardinality(String), String)", _empty_map),
    Column("ratelimit_requests_limit", "Nullable(UInt64)"),
    Column("ratelimit_requests_remaining", "Nullable(UInt64)"),
    Column("ratelimit_tokens_limit", "Nullable(UInt64)"),
    Column("ratelimit_tokens_remaining", "Nullable(UInt64)"),
    Column("attempts", "Nullable(UInt16)"),
    Column("fallback", "Nullable(Bool)"),
    Column("cache_hit", "Nullable(Bool)"),
    Column("tags", "Array(LowCardinality(String))", _empty_list),
    Column("policies", "Array(LowCardinality(String))", _empty_list),
    Column("guardrails", "Array(Tuple(rule LowCardinality(String), stage LowCardinality(String), "
                         "action LowCardinality(String), detector LowCardinality(String)))",
           _guardrail_tuples),
    Column("input_messages", _TEXT, _json_text),
    Column("output_messages", _TEXT, _json_text),
    Column("cost_input_usd", "Nullable(Float64)"),
    Column("cost_output_usd", "Nullable(Float64)"),
    Column("cost_usd", "Nullable(Float64)"),
    Column("actual_cost_usd", "Nullable(Float64)"),
    Column("saved_cost_usd", "Nullable(Float64)"),
    Column("pricing_ref", _LC, _empty_string),
    Column("sample_weight", "Float64 DEFAULT 1"),
    Column("redactions", "Map(LowCardinality(String), UInt32)", _empty_map),
    Column("attributes", _TEXT, _json_text),
)

_EVENT_FIELDS = {name: i for i, name in enumerate(Event.__struct_fields__)}


# Each grain a rollup can have: the SQL of a time's bucket, and its length in seconds.
# Weeks are 7 days from the Unix epoch (Thursdays), so that a window splits into them as
# into days (`query.split_grains`).
GRAINS: dict[str, tuple[str, int]] = {
    "minute": ("toStartOfMinute({})", 60),
    "hour": ("toStartOfHour({})", 3600),
    "day": ("toStartOfDay({})", 86400),
    "week": ("toStartOfInterval({}, INTERVAL 7 DAY)", 7 * 86400),
}


@dataclass(frozen=True)
class Rollup:
    """One aggregate table: the figures per `time_column` bucket, by `dimensions`."""

    table: str  # llm_usage_1m, llm_usage_1h, llm_usage_1d, llm_usage_user_1d...
    time_column: str  # a grain of `GRAINS`: minute, hour, day, week
    dimensions: tuple[tuple[str, str], ...] = ROLLUP_DIMENSIONS
    metadata_keys: tuple[str, ...] = ()  # the metadata rollup: the keys it keeps
    extra: tuple[Aggregate, ...] = ()  # figures of its own, after `AGGREGATES`
    # figures it derives from its keys (ALIAS columns: SQL over its columns, giving what
    # the figure's partial result would be), where another rollup stores them
    derived: tuple[tuple[str, str], ...] = ()

    @property
    def aggregates(self) -> tuple[Aggregate, ...]:
        """The figures stored, which the view writes."""
        return (*AGGREGATES, *self.extra)

    @property
    def figures(self) -> frozenset[str]:
        """The figures a query can read from it."""
        return frozenset(a.name for a in self.aggregates) | {name for name, _ in self.derived}

    def bucket_of(self, sql: str) -> str:
        """SQL: the bucket of this rollup a time (SQL) falls in."""
        return GRAINS[self.time_column][0].format(sql)

    def check_bucket(self, sql: str) -> str:
        """SQL: the bucket a repair compares counts per (an hour for the per-minute
        rollups, whose minutes' counts an hour sums)."""
        if self.time_column == "minute":
            return f"toStartOfHour({sql})"
        return self.bucket_of(sql)

    @property
    def view(self) -> str:
        keys = ""
        if self.metadata_keys:
            keys = "_" + hashlib.blake2b(",".join(self.metadata_keys).encode(),
                                         digest_size=4).hexdigest()
        return f"{self.view_prefix}{VIEW_VERSION}{keys}"

    @property
    def view_prefix(self) -> str:
        return view_prefix(self.table)

    @property
    def seconds(self) -> int:
        return GRAINS[self.time_column][1]

    @property
    def event_columns(self) -> frozenset[str]:
        """The event columns (and filters) this rollup can answer by."""
        names = {name for name, _ in self.dimensions} - {"meta_key", "meta_value"}
        return frozenset(names | ({"metadata"} if self.metadata_keys else set()))

    def dimension_sql(self) -> list[str]:
        """The dimensions as SQL over raw events (results named `_name`)."""
        keys = ", ".join(f"'{k}'" for k in self.metadata_keys)
        sql = {"status_code": "ifNull(status_code, 0)", "meta_key": f"arrayJoin([{keys}])",
               "meta_value": "metadata[_meta_key]"}
        return [sql.get(name, name) for name, _ in self.dimensions]

    def open_buckets(self, open_hours: str) -> str:
        """SQL: the buckets of this rollup that hold an open hour (`open_hours`: a
        subquery of hours)."""
        if self.time_column == "minute":
            return open_hours
        return f"(SELECT {self.bucket_of('hour')} FROM {open_hours})"

    @property
    def row_bucket(self) -> str:
        """SQL: the `open_buckets` value a row of this rollup falls in (a minute's hour; a
        row of a coarser rollup is a bucket of its own)."""
        if self.time_column == "minute":
            return "toStartOfHour(minute)"
        return self.time_column

    def open_hours_of(self, open_hours: str) -> str:
        """SQL: every hour of the buckets that hold an open hour. Raw events matched on
        their hour (`toStartOfHour(timestamp) IN` this) are read from those hours only:
        the hour leads `llm_events`' sort key, where a condition on their day would make
        a query read every granule of its window."""
        if self.seconds <= 3600:
            return open_hours
        return (f"(SELECT {self.bucket_of('hour')} + toIntervalHour(arrayJoin("
                f"range({self.seconds // 3600}))) FROM {open_hours})")


@dataclass(frozen=True)
class Schema:
    """The tables of one exporter: names, engines and columns, as DDL."""

    database: str = "meterline"
    events: str = "llm_events"
    columns: tuple[Column, ...] = COLUMNS
    dedup_window: int = 10_000
    ttl_seconds: int | None = None
    cluster: str | None = None
    rollup_metadata: tuple[str, ...] = ()  # metadata keys with a rollup of their own
    inserted: tuple[Column, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inserted", tuple(c for c in self.columns if not c.materialized))

    @classmethod
    def of(cls, config: ClickHouseConfig) -> Schema:
        return cls(database=config.database, events=config.table,
                   dedup_window=config.dedup_window,
                   ttl_seconds=int(config.ttl) if config.ttl else None,
                   cluster=config.cluster.name if config.cluster else None,
                   rollup_metadata=tuple(config.rollup_metadata))

    # --- names ---------------------------------------------------------------------
    @property
    def _base(self) -> str:
        return "llm_usage" if self.events == "llm_events" else f"{self.events}_usage"

    @property
    def time_rollups(self) -> tuple[Rollup, Rollup, Rollup]:
        """The per-minute, per-hour and per-day rollups by `ROLLUP_DIMENSIONS`."""
        base = self._base
        return (Rollup(f"{base}_1m", "minute"), Rollup(f"{base}_1h", "hour"),
                Rollup(f"{base}_1d", "day"))

    @property
    def model_rollups(self) -> tuple[Rollup, Rollup]:
        """Per hour and per day by provider and model only: what most answers group by, in
        a few rows per bucket (latency percentiles are merged from a state per row). The
        minutes around their hours are read from `llm_usage_1m`: a view more on every
        insert would cost more than the few minutes it would save reading."""
        base = self._base
        return (Rollup(f"{base}_model_1h", "hour", MODEL_DIMENSIONS),
                Rollup(f"{base}_model_1d", "day", MODEL_DIMENSIONS))

    @property
    def user_total_rollups(self) -> tuple[Rollup, Rollup]:
        """Per week and per day by user alone: answers by user read a row per user and week,
        the days around whole weeks from the daily one."""
        base = self._base
        return (Rollup(f"{base}_user_total_7d", "week", USER_TOTAL_DIMENSIONS,
                       extra=USER_AGGREGATES),
                Rollup(f"{base}_user_total_1d", "day", USER_TOTAL_DIMENSIONS,
                       extra=USER_AGGREGATES))

    @property
    def user_rollup(self) -> Rollup:
        """Per day by user, provider and model: answers by user with a provider or model."""
        return Rollup(f"{self._base}_user_1d", "day", USER_DIMENSIONS, derived=(
            ("active_days", "initializeAggregation('groupBitmapState', "
                            "toUInt32(toRelativeDayNum(day)))"),
            ("models", "[model]"), ("providers", "[provider]")))

    @property
    def metadata_rollup(self) -> Rollup | None:
        if not self.rollup_metadata:
            return None
        return Rollup(f"{self._base}_metadata_1d", "day", METADATA_DIMENSIONS,
                      self.rollup_metadata)

    @property
    def tool_rollups(self) -> tuple[Rollup, Rollup]:
        """Per day and per hour (coarsest first, as a family is read) by tool, operation,
        MCP method and MCP session: tool calls and MCP. The days between a range's ends,
        the hours at them: the daily rows are a 24th as many, and each holds t-digest and
        trace-set states to merge."""
        base = self._base
        return (Rollup(f"{base}_tool_1d", "day", TOOL_DIMENSIONS, extra=TOOL_AGGREGATES),
                Rollup(f"{base}_tool_1h", "hour", TOOL_DIMENSIONS, extra=TOOL_AGGREGATES))

    @property
    def trace_rollup(self) -> Rollup:
        """Per hour by trace, session, agent, tool and MCP method: the runs (a run's figures
        are summed over its hours, see query.py). Hourly, as few rows as daily (a run
        rarely spans an hour), so that a range's ends are read from the events only for
        minutes (`RETIRED_ROLLUPS`: it was daily)."""
        return Rollup(f"{self._base}_trace_1h", "hour", TRACE_DIMENSIONS,
                      extra=RUN_AGGREGATES)

    @property
    def families(self) -> tuple[tuple[Rollup, ...], ...]:
        """The rollups that answer alike at several grains (coarsest first), fewest rows
        first: the order in which `query.Reader` looks for one that can answer (each of a
        family's rollups must keep what a question reads). The metadata rollup answers by
        its keys alone."""
        return ((*reversed(self.model_rollups), self.time_rollups[0]),
                tuple(reversed(self.time_rollups)),
                self.user_total_rollups, (self.user_rollup,), self.tool_rollups,
                (self.trace_rollup,))

    @property
    def rollups(self) -> tuple[Rollup, ...]:
        """Every rollup, finest time rollup first: what the views fill, and what
        `ensure_schema` creates and fills and repair.py checks and rebuilds."""
        meta = self.metadata_rollup
        return (*self.time_rollups, *self.model_rollups, *self.user_total_rollups,
                self.user_rollup, *self.tool_rollups, self.trace_rollup,
                *((meta,) if meta else ()))

    @property
    def retired_rollups(self) -> tuple[str, ...]:
        """The tables of rollups an earlier version kept (`RETIRED_ROLLUPS`)."""
        return tuple(f"{self._base}_{name}" for name in RETIRED_ROLLUPS)

    def usage_table(self, suffix: str) -> str:
        """The name of a table of this exporter's derived figures (`llm_usage_...`)."""
        return f"{self._base}_{suffix}"

    @property
    def open_hours_table(self) -> str:
        """Hours being written: an insert, or a rollup rebuild, in progress (see repair.py)."""
        return self.usage_table("open_hours")

    @property
    def open_hours(self) -> str:
        """SQL subquery: the hours some writer holds open now."""
        return (f"(SELECT hour FROM {self.qualified(self.open_hours_table)} "
                "GROUP BY hour, token HAVING sum(state) > 0)")

    def qualified(self, table: str) -> str:
        """The name queries use (on a cluster, the Distributed table)."""
        return f"`{self.database}`.`{table}`"

    def _stored(self, table: str) -> str:
        """The table that holds the data (on a cluster, each shard's local table)."""
        return self.qualified(f"{table}_local" if self.cluster else table)

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER `{self.cluster}`" if self.cluster else ""

    # --- DDL -----------------------------------------------------------------------
    def _engine(self, family: str) -> str:
        if self.cluster:
            return f"Replicated{family}MergeTree"
        return f"{family}MergeTree"

    def _settings(self) -> str:
        if self.cluster:
            return f"SETTINGS replicated_deduplication_window = {self.dedup_window}"
        return f"SETTINGS non_replicated_deduplication_window = {self.dedup_window}"

    def create_database(self) -> str:
        return f"CREATE DATABASE IF NOT EXISTS `{self.database}`{self.on_cluster}"

    @property
    def ttl(self) -> str | None:
        """The raw events' TTL expression, as ClickHouse writes it back in `engine_full`."""
        if not self.ttl_seconds:
            return None
        return f"toDateTime(timestamp) + toIntervalSecond({self.ttl_seconds})"

    def create_events(self) -> str:
        ttl = f"\nTTL {self.ttl}" if self.ttl else ""
        columns = ",\n  ".join(c.ddl() for c in self.columns)
        return (f"CREATE TABLE IF NOT EXISTS {self._stored(self.events)}{self.on_cluster} (\n"
                f"  {columns}\n)\nENGINE = {self._engine('Replacing')}\n"
                "PARTITION BY toYYYYMM(timestamp)\n"
                f"ORDER BY (toStartOfHour(timestamp), event_id){ttl}\n{self._settings()}")

    def rollup_columns(self, rollup: Rollup) -> tuple[Column, ...]:
        return (Column(rollup.time_column, "DateTime('UTC')"),
                *(Column(name, type_) for name, type_ in rollup.dimensions),
                *(Column(a.name, a.column_type()) for a in rollup.aggregates),
                *(Column(name, BY_NAME[name].column_type(), alias=sql)
                  for name, sql in rollup.derived))

    def create_rollup(self, rollup: Rollup) -> str:
        key = ", ".join([rollup.time_column, *(name for name, _ in rollup.dimensions)])
        body = ",\n  ".join(c.ddl() for c in self.rollup_columns(rollup))
        return (f"CREATE TABLE IF NOT EXISTS {self._stored(rollup.table)}{self.on_cluster} (\n"
                f"  {body}\n)\nENGINE = {self._engine('Aggregating')}\n"
                f"PARTITION BY toYYYYMM({rollup.time_column})\nORDER BY ({key})\n"
                f"{self._settings()}")

    def create_open_hours(self) -> str:
        # Each writer adds +1 for the hours it is about to write and -1 once they are
        # right again; an hour is open while some token sums to more than 0. Old marks
        # expire (an abandoned one is closed by the repair pass long before).
        return (f"CREATE TABLE IF NOT EXISTS {self._stored(self.open_hours_table)}"
                f"{self.on_cluster} (\n  hour DateTime('UTC'), token String, state Int8,\n"
                "  at DateTime('UTC') DEFAULT now()\n)\n"
                f"ENGINE = {self._engine('')}\nORDER BY (hour, token)\n"
                "TTL at + INTERVAL 30 DAY")

    def rollup_select(self, rollup: Rollup, source: str, where: str | None = None,
                      time: str | None = None, time_name: str | None = None,
                      figures: Sequence[str] | None = None) -> str:
        """The rollup rows of the events in `source` (optionally only those `where` holds):
        what the view writes for an inserted block, what a repair writes for an hour, and
        (with the `time` of a row, SQL over `timestamp`, named `time_name`, and only the
        `figures` it needs) how a query reads raw events alongside the rollup."""
        # The inner query names its results apart (`_x`): ClickHouse resolves a name to an
        # alias before a column, so `sum(cost_usd) AS cost_usd` would capture `cost_usd`
        # in the other aggregates.
        dims = [name for name, _ in rollup.dimensions]
        time_name = time_name or rollup.time_column
        aggregates = rollup.aggregates if figures is None else [BY_NAME[f] for f in figures]
        names = [time_name, *dims, *(a.name for a in aggregates)]
        inner = [time or rollup.bucket_of("timestamp"), *rollup.dimension_sql(),
                 *(a.view_expression() for a in aggregates)]
        select = ",\n    ".join(f"{expr} AS _{name}" for expr, name in zip(inner, names,
                                                                            strict=True))
        group = ", ".join(f"_{name}" for name in names[:1 + len(dims)])
        outer = ", ".join(f"_{name} AS {name}" for name in names)
        filtered = f"\n  WHERE {where}" if where else ""
        return (f"SELECT {outer}\nFROM (\n  SELECT\n    {select}\n  FROM {source}{filtered}\n"
                f"  GROUP BY {group}\n)")

    def create_view(self, rollup: Rollup) -> str:
        return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS "
                f"{self.qualified(rollup.view)}{self.on_cluster}\n"
                f"TO {self._stored(rollup.table)}\n"
                f"AS {self.rollup_select(rollup, self._stored(self.events))}")

    def fill_rollup(self, rollup: Rollup, where: str | None = None, settings: str = "") -> str:
        """Write a rollup's rows from the deduplicated events (those `where` holds), with
        the insert's `SETTINGS` clause, if any."""
        columns = ", ".join(c.name for c in self.rollup_columns(rollup) if not c.alias)
        return (f"INSERT INTO {self.qualified(rollup.table)} ({columns}) {settings}\n"
                + self.rollup_select(rollup, self.deduplicated_events, where))

    @property
    def deduplicated_events(self) -> str:
        """`llm_events` as queries read it: one row per event even before merges have
        dropped a second copy (`FINAL`; copies of an event share a timestamp, hence a month
        partition, so `FINAL_SETTINGS` lets each partition be deduplicated on its own)."""
        return f"{self.qualified(self.events)} FINAL"

    def delete_rollup_hours(self, rollup: Rollup, hours: str) -> str:
        """Delete a rollup's rows of the buckets holding the hours listed (`hours`: SQL
        DateTimes, comma-separated): for a daily rollup, their whole days."""
        return (f"DELETE FROM {self._stored(rollup.table)}{self.on_cluster} "
                f"WHERE {self._buckets_of(rollup, rollup.time_column, hours)}")

    def rebuild_rollup_hours(self, rollup: Rollup, hours: str, settings: str = "") -> str:
        """Write a rollup's rows of those buckets again, from the deduplicated events."""
        return self.fill_rollup(rollup, self._buckets_of(rollup, "timestamp", hours), settings)

    @staticmethod
    def _buckets_of(rollup: Rollup, column: str, hours: str) -> str:
        if rollup.seconds <= 3600:
            return f"toStartOfHour({column}) IN ({hours})"
        return (f"{rollup.bucket_of(column)} IN (SELECT DISTINCT {rollup.bucket_of('h')} "
                f"FROM (SELECT arrayJoin([{hours}]) AS h))")

    def create_distributed(self, table: str, sharding_key: str) -> str:
        return (f"CREATE TABLE IF NOT EXISTS {self.qualified(table)}{self.on_cluster} "
                f"AS {self._stored(table)}\n"
                f"ENGINE = Distributed(`{self.cluster}`, `{self.database}`, `{table}_local`, "
                f"{sharding_key})")

    def objects(self) -> list[tuple[str, str]]:
        """(table name, CREATE statement) of everything in the database, in creation order."""
        local = "_local" if self.cluster else ""
        out = [(self.events + local, self.create_events())]
        out += [(r.table + local, self.create_rollup(r)) for r in self.rollups]
        out.append((self.open_hours_table + local, self.create_open_hours()))
        if self.cluster:
            out.append((self.events, self.create_distributed(self.events,
                                                             "cityHash64(event_id)")))
            out += [(t, self.create_distributed(t, "rand()"))
                    for t in (*(r.table for r in self.rollups), self.open_hours_table)]
        return out + [(r.view, self.create_view(r)) for r in self.rollups]

    def add_column(self, table: str, column: Column, after: str) -> list[str]:
        """The ALTERs that add a newer version's column to an existing table."""
        alter = (f"ALTER TABLE {self._stored(table)}{self.on_cluster} ADD COLUMN IF NOT EXISTS "
                 f"{column.ddl()} AFTER `{after}`")
        if not self.cluster:
            return [alter]
        bare = Column(column.name, column.type.split(" CODEC")[0].split(" DEFAULT")[0])
        return [alter, f"ALTER TABLE {self.qualified(table)}{self.on_cluster} "
                       f"ADD COLUMN IF NOT EXISTS {bare.ddl()} AFTER `{after}`"]

    def change_ttl(self) -> str:
        """The ALTER that gives an existing events table this schema's TTL (or none). Rows
        past a new, shorter TTL are deleted in the background (`materialize_ttl_after_modify`)."""
        change = f"MODIFY TTL {self.ttl}" if self.ttl else "REMOVE TTL"
        return f"ALTER TABLE {self._stored(self.events)}{self.on_cluster} {change}"

    # --- rows ----------------------------------------------------------------------
    def column_batch(self, events: Sequence[Event]) -> list[Sequence[Any]]:
        """The events as one value list per inserted column (a column-oriented insert)."""
        by_field = list(zip(*map(msgspec.structs.astuple, events), strict=True))
        out: list[Sequence[Any]] = []
        for column in self.inserted:
            values = by_field[_EVENT_FIELDS[column.name]]
            out.append(column.prepare(values) if column.prepare else values)
        return out


def ensure_schema(client: Any, schema: Schema) -> list[str]:
    """Create what is missing, add the columns this version defines to existing tables (old
    rows read the new column's default) and drop superseded views. Returns the statements
    run, for the log: none when the schema is up to date."""
    run: list[str] = []

    def execute(sql: str) -> None:
        client.command(sql)
        run.append(sql)

    spans: list[tuple[int, int]] = []

    def fill(rollup: Rollup) -> None:
        """Fill a rollup from the events stored so far, a span of days at a time (see
        `_fill_spans`), logged as one change."""
        spans[:] = spans or _fill_spans(client, schema)
        for since, until in spans:
            client.command(schema.fill_rollup(
                rollup, f"timestamp >= toDateTime({since}, 'UTC') "
                        f"AND timestamp < toDateTime({until}, 'UTC')") + _FILL_SETTINGS)
        run.append(f"INSERT INTO {schema.qualified(rollup.table)} (filled from the events "
                   f"stored, in {len(spans)} spans of days)")

    execute(schema.create_database())
    run.clear()  # IF NOT EXISTS: not a change worth logging
    existing = _existing_columns(client, schema)
    tables = [(schema.events, schema.columns)]
    tables += [(r.table, schema.rollup_columns(r)) for r in schema.rollups]
    refill: set[str] = set()  # rollups that gained a stored figure: their rows lack it
    for table, columns in tables:
        have = existing.get(table)
        for previous, column in itertools.pairwise(columns):
            if have and column.name not in have:
                for sql in schema.add_column(table, column, previous.name):
                    execute(sql)
                if table != schema.events and not column.alias:
                    refill.add(table)
    present = _tables(client, schema)
    stored_events = schema.events + ("_local" if schema.cluster else "")
    if stored_events in present and present[stored_events] != schema.ttl:
        execute(schema.change_ttl())
    meta = schema.metadata_rollup
    if meta and meta.view not in present and meta.table in present:
        kept = {k for (k,) in client.query(
            f"SELECT DISTINCT meta_key FROM {schema.qualified(meta.table)}").result_rows}
        new_keys = tuple(k for k in meta.metadata_keys if k not in kept)
        if new_keys and stored_events in present:  # keys added to rollup_metadata: filled
            # before the new view exists
            fill(dataclasses.replace(meta, metadata_keys=new_keys))
    rollups = {r.table: r for r in schema.rollups}
    for table in sorted(refill):  # written again from the events, under the new view only
        for name in sorted(present):
            if name.startswith(rollups[table].view_prefix):
                execute(f"DROP VIEW IF EXISTS {schema.qualified(name)}{schema.on_cluster}")
                del present[name]
        execute(f"TRUNCATE TABLE {schema._stored(table)}{schema.on_cluster}")
        fill(rollups[table])
    for name, create in schema.objects():
        if name in present:
            continue
        execute(create)
        added = rollups.get(name.removesuffix("_local"))
        if added is not None and stored_events in present:
            # a rollup new to an existing database: filled from the events stored so far
            # (before its view exists, so that nothing is counted twice)
            fill(added)
    # the views of an earlier version: of a kept rollup, all but its own; of a retired one,
    # all (they would go on filling it)
    stale: list[tuple[str, str | None]] = [(r.view_prefix, r.view) for r in schema.rollups]
    stale += [(view_prefix(table), None) for table in schema.retired_rollups]
    for prefix, own in stale:
        for name in sorted(present):
            if name.startswith(prefix) and name != own:
                execute(f"DROP VIEW IF EXISTS {schema.qualified(name)}{schema.on_cluster}")
    for table in schema.retired_rollups:
        for name in (table, f"{table}_local"):
            if name in present:
                execute(f"DROP TABLE IF EXISTS {schema.qualified(name)}{schema.on_cluster}")
    return run


def view_prefix(table: str) -> str:
    """What the names of the views feeding rollup `table` begin with, in every version."""
    return f"{table}_mv_v"


FILL_EVENTS = 500_000  # events per query that fills a rollup (a day's at least)


def _fill_spans(client: Any, schema: Schema) -> list[tuple[int, int]]:
    """The stored events' days as spans (Unix seconds) of at most `FILL_EVENTS` events:
    one query over them all would hold every group of a large rollup in memory at once
    (a month of 8 million events by user and day takes over 2 GiB)."""
    days = client.query(f"SELECT toUnixTimestamp(toStartOfDay(timestamp)) AS d, count() "
                        f"FROM {schema.qualified(schema.events)} GROUP BY d ORDER BY d"
                        ).result_rows
    spans: list[tuple[int, int]] = []
    events = 0
    for day, count in days:
        if spans and events + count <= FILL_EVENTS:
            spans[-1], events = (spans[-1][0], day + 86400), events + count
        else:
            spans.append((day, day + 86400))
            events = count
    return spans


def _existing_columns(client: Any, schema: Schema) -> dict[str, set[str]]:
    """Columns of the tables that hold the data, by their logical names."""
    local = "_local" if schema.cluster else ""
    names = [schema.events + local, *(r.table + local for r in schema.rollups)]
    rows = client.query(
        "SELECT table, name FROM system.columns WHERE database = {db:String} "
        "AND has({tables:Array(String)}, table)",
        parameters={"db": schema.database, "tables": names}).result_rows
    out: dict[str, set[str]] = {}
    for table, name in rows:
        out.setdefault(table.removesuffix("_local"), set()).add(name)
    return out


def missing_tables(client: Any, schema: Schema) -> list[str]:
    """The tables queries read (`llm_events` and the rollups) that the database lacks: a
    reader of another component's tables waits until that component has created them."""
    present = _tables(client, schema)
    wanted = (schema.events, *(r.table for r in schema.rollups), schema.open_hours_table)
    return [t for t in wanted if t not in present]


def _tables(client: Any, schema: Schema) -> dict[str, str | None]:
    """The tables and views of the database, with the TTL each table has (None: none)."""
    rows = client.query("SELECT name, engine_full FROM system.tables WHERE database = {db:String}",
                        parameters={"db": schema.database}).result_rows
    return {name: (m.group(1) if (m := _TTL.search(engine)) else None) for name, engine in rows}
