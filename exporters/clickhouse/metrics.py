"""The figures FinOps answers are made of, defined once for the rollup and for raw events.

Each `Aggregate` is one ClickHouse aggregate over `llm_events` columns. The
materialized views write it into the per-minute and per-hour rollups; a query
reads it back from them (re-aggregating the stored partial results) or computes
it from raw events (for what the rollups do not keep, such as `metadata.KEY` or
users), with the same definition, so both give the same answer.

Counts and sums are weighted by `sample_weight` (1/p for an event kept by
probabilistic sampling), so they estimate what really happened; latencies are
over the events stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meterline.genai import CLIENT_CLOSED, GUARDRAIL_BLOCKED, NON_MODEL_OPERATIONS

# As `meterline.genai.failure` decides it: a call with an error category, or an HTTP
# error status other than a cancelled call (499: the client left, nothing failed).
IS_ERROR = (f"(error_type != '' OR (ifNull(status_code, 0) >= 400 "
            f"AND status_code != {CLIENT_CLOSED}))")
QUANTILES = (0.5, 0.95, 0.99)

# Kinds of events, for the questions about agents, tools, MCP and guardrails (raw events):
# a model call is an event that is no agent run, tool call or MCP request. An MCP request
# may have a session and no method (the gateway's GET stream or DELETE of a session):
# `meterline.genai.is_mcp_request`, as SQL.
IS_MCP = "(mcp_method != '' OR mcp_session_id != '' OR startsWith(operation, 'mcp_'))"
IS_MODEL_CALL = (f"(operation NOT IN ({', '.join(repr(o) for o in sorted(NON_MODEL_OPERATIONS))}) "
                 f"AND NOT {IS_MCP})")
IS_TOOL_CALL = "operation = 'execute_tool'"
IS_MCP_CONNECT = "mcp_method = 'initialize'"
# A call a guardrail blocked (a rule with action block fired, or the gateway's own error
# for it), and one it modified (a redact rule fired, and none blocked it).
_GUARDRAIL_ACTED = "arrayExists(g -> tupleElement(g, 'action') = '{}', guardrails)"
IS_GUARDRAIL_BLOCKED = (f"({_GUARDRAIL_ACTED.format('block')} "
                        f"OR error_type = '{GUARDRAIL_BLOCKED}')")
IS_GUARDRAIL_MODIFIED = f"({_GUARDRAIL_ACTED.format('redact')} AND NOT {IS_GUARDRAIL_BLOCKED})"
HAS_GUARDRAIL = f"(notEmpty(guardrails) OR {IS_GUARDRAIL_BLOCKED})"

Source = Literal["rollup", "raw"]


# Functions whose result is also their partial state (stored as a SimpleAggregateFunction);
# any other is stored as a partial state (AggregateFunction) and merged when read.
_SIMPLE = frozenset({"sum", "min", "max", "groupUniqArrayArray"})


@dataclass(frozen=True)
class Aggregate:
    name: str  # the rollup column, and the name of the figure
    function: str  # sum, min, max, or a function such as quantilesTDigest(0.5) or groupBitmap
    argument: str  # an expression over llm_events columns
    type: str  # the type of the stored value

    @property
    def simple(self) -> bool:
        """Stored as its value (SimpleAggregateFunction) rather than as a partial state."""
        return self.function in _SIMPLE

    def _split(self) -> tuple[str, str]:
        name, paren, params = self.function.partition("(")
        return name, paren + params

    def column_type(self) -> str:
        if self.simple:
            return f"SimpleAggregateFunction({self.function}, {self.type})"
        return f"AggregateFunction({self.function}, {self.type})"

    def view_expression(self) -> str:
        """What the materialized view computes for one inserted block."""
        if self.simple:
            return f"{self.function}({self.argument})"
        name, params = self._split()
        return f"{name}State{params}({self.argument})"

    def sql(self, source: Source, condition: str | None = None) -> str:
        """The figure over the rows a query selects (optionally only those matching
        `condition`), read from the rollup or computed from raw events. Times come out as
        ISO 8601 UTC text: the driver's own conversion depends on the host's time zone."""
        name, params = self._split()
        if source == "rollup":
            name, argument = (name if self.simple else f"{name}Merge"), self.name
        else:
            argument = self.argument
        if condition is None:
            sql = f"{name}{params}({argument})"
        else:
            sql = f"{name}If{params}({argument}, {condition})"
        if self.type.startswith("DateTime"):
            return f"formatDateTime({sql}, '%FT%TZ', 'UTC')"
        return sql


def _weighted(column: str) -> str:
    return f"ifNull({column}, 0) * sample_weight"


IS_CACHE_HIT = "ifNull(cache_hit, false)"
# A call's estimated cost: a cache hit's is 0 (the provider billed nothing), whatever its
# event says. The cost processor makes it so; an event that passed through none (a
# client's JSON) may carry a cost, which Prometheus's estimated spend leaves out too.
ESTIMATED_COST = f"if({IS_CACHE_HIT}, 0, cost_usd)"
_UNESTIMATED_ACTUAL = f"actual_cost_usd IS NOT NULL AND {ESTIMATED_COST} IS NULL"


AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("requests", "sum", "sample_weight", "Float64"),
    Aggregate("events", "sum", "toUInt64(1)", "UInt64"),
    Aggregate("errors", "sum", f"if({IS_ERROR}, sample_weight, 0)", "Float64"),
    Aggregate("input_tokens", "sum", _weighted("input_tokens"), "Float64"),
    Aggregate("output_tokens", "sum", _weighted("output_tokens"), "Float64"),
    Aggregate("cache_read_tokens", "sum", _weighted("cache_read_tokens"), "Float64"),
    Aggregate("cache_creation_tokens", "sum", _weighted("cache_creation_tokens"), "Float64"),
    Aggregate("reasoning_tokens", "sum", _weighted("reasoning_tokens"), "Float64"),
    Aggregate("cost_usd", "sum", _weighted(ESTIMATED_COST), "Float64"),
    Aggregate("unpriced_requests", "sum", f"if({ESTIMATED_COST} IS NULL, sample_weight, 0)",
              "Float64"),
    # calls answered from a cache: requests without provider spend (`ESTIMATED_COST`), and
    # what the provider would have billed for them (only they saved anything: a saving on
    # another call, which a client's JSON may carry, is not counted, as in Prometheus)
    Aggregate("cache_hits", "sum", f"if({IS_CACHE_HIT}, sample_weight, 0)", "Float64"),
    Aggregate("saved_cost_usd", "sum", f"if({IS_CACHE_HIT}, {_weighted('saved_cost_usd')}, 0)",
              "Float64"),
    # estimated against actual: only over the events whose source reported an actual cost;
    # those of them without an estimate (cost_usd NULL: unpriced) are counted apart, so
    # that variance compares an estimate with the actual cost, never a missing one as 0
    Aggregate("actual_cost_usd", "sum", _weighted("actual_cost_usd"), "Float64"),
    Aggregate("estimated_cost_of_actual_usd", "sum",
              f"if(actual_cost_usd IS NULL, 0, {_weighted(ESTIMATED_COST)})", "Float64"),
    Aggregate("actual_cost_requests", "sum", "if(actual_cost_usd IS NULL, 0, sample_weight)",
              "Float64"),
    Aggregate("unestimated_actual_requests", "sum",
              f"if({_UNESTIMATED_ACTUAL}, sample_weight, 0)", "Float64"),
    Aggregate("unestimated_actual_cost_usd", "sum",
              f"if({_UNESTIMATED_ACTUAL}, {_weighted('actual_cost_usd')}, 0)", "Float64"),
    Aggregate("duration_ms_sum", "sum", "ifNull(duration_ms, 0)", "Float64"),
    Aggregate("duration_ms_count", "sum", "toUInt64(duration_ms IS NOT NULL)", "UInt64"),
    Aggregate("duration_ms_quantiles", f"quantilesTDigest{QUANTILES}", "duration_ms",
              "Nullable(Float64)"),
    Aggregate("ttft_ms_sum", "sum", "ifNull(ttft_ms, 0)", "Float64"),
    Aggregate("ttft_ms_count", "sum", "toUInt64(ttft_ms IS NOT NULL)", "UInt64"),
    Aggregate("max_request_tokens", "max",
              "toUInt64(ifNull(input_tokens, 0) + ifNull(output_tokens, 0))", "UInt64"),
    # calls a guardrail blocked (the users' "violations", read from the user rollup)
    Aggregate("guardrail_blocked", "sum", f"if({IS_GUARDRAIL_BLOCKED}, sample_weight, 0)",
              "Float64"),
    Aggregate("first_seen", "min", "timestamp", "DateTime64(9, 'UTC')"),
    Aggregate("last_seen", "max", "timestamp", "DateTime64(9, 'UTC')"),
)
# What the trace rollup keeps besides: a run's (trace's) start, last start and end, and for
# the calls of no trace (each a run of its own) how many failed and their durations summed.
RUN_AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("first_ns", "min", "toUnixTimestamp64Nano(timestamp)", "Int64"),
    Aggregate("last_ns", "max", "toUnixTimestamp64Nano(timestamp)", "Int64"),
    Aggregate("last_end_ns", "max",
              "toUnixTimestamp64Nano(timestamp) + toInt64(ifNull(duration_ms, 0) * 1e6)", "Int64"),
    Aggregate("failed_events", "sum", f"toUInt64(if({IS_ERROR}, sample_weight, 0) > 0)", "UInt64"),
    Aggregate("event_ms", "sum", "toInt64(ifNull(duration_ms, 0) * 1e6) / 1e6", "Float64"),
    Aggregate("request_bytes", "sum", "ifNull(request_bytes, 0)", "UInt64"),
    Aggregate("response_bytes", "sum", "ifNull(response_bytes, 0)", "UInt64"),
)
# What the user totals keep besides (their weekly rows cannot be grouped by day, model or
# provider): the days a user was active, as a bitmap of day numbers, and the models and
# providers they called. The user rollup by model derives the same from its keys.
USER_AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("active_days", "groupBitmap", "toUInt32(toRelativeDayNum(timestamp))", "UInt32"),
    Aggregate("models", "groupUniqArrayArray", "[model]", "Array(String)"),
    Aggregate("providers", "groupUniqArrayArray", "[provider]", "Array(String)"),
)
# What the tool rollup keeps besides: the runs (traces) that called each tool, and the bytes
# of arguments and results. The traces are counted by a 64-bit hash of their id (a set of
# strings is kept as 128-bit hashes anyway): states half the size, merged three times
# faster, and two ids of a million colliding once in 10^7.
TOOL_AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("traces", "uniqExact", "if(trace_id = '', NULL, cityHash64(trace_id))",
              "Nullable(UInt64)"),
    *(a for a in RUN_AGGREGATES if a.name in ("request_bytes", "response_bytes")),
)
BY_NAME = {a.name: a for a in (*AGGREGATES, *RUN_AGGREGATES, *USER_AGGREGATES,
                               *TOOL_AGGREGATES)}


def raw(figure: str, condition: str | None = None) -> str:
    """SQL of a figure over raw events, over those `condition` holds for when given."""
    return BY_NAME[figure].sql("raw", condition)


@dataclass(frozen=True)
class Figure:
    """A figure in a query's expressions (optionally over the events `condition` holds),
    as SQL over whichever source answers: rollup rows or raw events."""

    name: str
    condition: str | None = None

    def sql(self, source: Source) -> str:
        return BY_NAME[self.name].sql(source, self.condition)


# The time rollups' key: per minute, hour and day, by these event columns (`model` is
# request_model, or response_model when no model was requested; absent values are '' and
# status 0). Users and metadata have rollups of their own, per day (`USER_DIMENSIONS`,
# `METADATA_DIMENSIONS`): a per-minute rollup by user has about as many rows as there
# are events (measured: bench/clickhouse_bench.py), a per-day one a few per active user.
ROLLUP_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("provider", "LowCardinality(String)"),
    ("model", "LowCardinality(String)"),
    ("team", "LowCardinality(String)"),
    ("api_key_id", "LowCardinality(String)"),
    ("api_key_name", "LowCardinality(String)"),
    ("status_code", "UInt16"),
)
USER_TOTAL_DIMENSIONS: tuple[tuple[str, str], ...] = (("user_id", "LowCardinality(String)"),)
USER_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("user_id", "LowCardinality(String)"),
    ("provider", "LowCardinality(String)"),
    ("model", "LowCardinality(String)"),
)
# One row per configured metadata key (`rollup_metadata`) and value: an event without the
# key counts under '' (not reported), so every key's rows count every event.
METADATA_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("meta_key", "LowCardinality(String)"),
    ("meta_value", "String"),
    ("provider", "LowCardinality(String)"),
    ("model", "LowCardinality(String)"),
)
# The trace rollup's key, per day: runs (traces), sessions, agents, tools and MCP, with the
# columns the questions about them filter on (`IS_MODEL_CALL`, `IS_TOOL_CALL`, `IS_MCP`...).
TRACE_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("trace_id", "String"),
    ("session_id", "String"),
    ("agent_name", "LowCardinality(String)"),
    ("tool_name", "LowCardinality(String)"),
    ("operation", "LowCardinality(String)"),
    ("mcp_method", "LowCardinality(String)"),
    ("mcp_session_id", "String"),
)
# The model rollups' key: the time rollups' with only provider and model (a few rows per
# minute, where the time rollups have one per key and status).
MODEL_DIMENSIONS = ROLLUP_DIMENSIONS[:2]
# The tool rollup's key, per day: tool calls and MCP requests (`IS_TOOL_CALL`, `IS_MCP`).
TOOL_DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("tool_name", "LowCardinality(String)"),
    ("operation", "LowCardinality(String)"),
    ("mcp_method", "LowCardinality(String)"),
    ("mcp_session_id", "String"),
)


def time_column(source: Source) -> str:
    """How a query names the time of a row (`t`: the bucket of either rollup)."""
    return "t" if source == "rollup" else "timestamp"


def status_expression(source: Source) -> str:
    return "status_code" if source == "rollup" else "ifNull(status_code, 0)"
