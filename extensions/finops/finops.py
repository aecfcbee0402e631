"""FinOps reports: spend by a dimension, growth, estimated against actual cost.

Each report is a plain dict (`report`, the window, `by`, `rows`, and `total`
where a total makes sense), the same whether `meterline finops` computes it
itself or gets it from the daemon's admin API (`/api/v1/finops/<report>`).
Budgets are in `budgets.py`.

`spend` by `agent`, `session` or `trace` is the `runs` report (the cost of agent runs
and conversations: their model calls, tool calls and durations), and by `tool` the
`tools` report (calls, errors, latency and sizes of each tool; no cost: a run's model
calls are not any one tool's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from meterline.exporters.clickhouse.metrics import IS_MODEL_CALL, IS_TOOL_CALL, Figure
from meterline.exporters.clickhouse.query import (
    EARLIEST,
    Condition,
    Dimension,
    Expressions,
    Reader,
    Where,
    Window,
    dimension,
    iso,
)
from meterline.exporters.clickhouse.schema import Schema
from meterline.exporters.clickhouse.seals import Question, SealedRuns
from meterline.params import quoted

SPEND_FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd",
                 "unpriced_requests", "cache_hits", "saved_cost_usd")
RUN_DIMENSIONS = ("agent", "session", "trace")
TOOL_DIMENSION = "tool"
VARIANCE_FIGURES = ("estimated_cost_of_actual_usd", "actual_cost_usd", "actual_cost_requests",
                    "unestimated_actual_requests", "unestimated_actual_cost_usd")


def number(value: Any, digits: int = 6) -> Any:
    """A figure for output: whole floats as ints (weighted counts are floats), others
    rounded (costs to the micro-dollar), None kept."""
    if value is None or isinstance(value, int):
        return value
    value = round(float(value), digits)
    return int(value) if value.is_integer() else value


def ratio(part: float, whole: float, digits: int = 6) -> float | None:
    return number(part / whole, digits) if whole else None


def usage(row: dict[str, Any]) -> dict[str, Any]:
    """Requests, errors, tokens and cost of a row, with the rates derived from them, and
    the cache hits among the requests (answered without a provider: no spend) with what
    the provider would have billed for them."""
    requests, cost = row["requests"], row["cost_usd"]
    tokens = row["input_tokens"] + row["output_tokens"]
    return {
        "requests": number(requests), "errors": number(row["errors"]),
        "error_rate": ratio(row["errors"], requests, 4),
        "input_tokens": number(row["input_tokens"]),
        "output_tokens": number(row["output_tokens"]), "total_tokens": number(tokens),
        "cost_usd": number(cost), "cost_per_request_usd": ratio(cost, requests),
        "cost_per_1k_tokens_usd": ratio(cost * 1000, tokens),
        "unpriced_requests": number(row["unpriced_requests"]),
        **cache(row),
    }


def cache(row: dict[str, Any]) -> dict[str, Any]:
    return {"cache_hits": number(row["cache_hits"]),
            "saved_cost_usd": number(row["saved_cost_usd"])}


def keys(row: dict[str, Any], by: Dimension) -> dict[str, Any]:
    """The group's key (None for "not reported"), and the key's name for API keys."""
    value = row[by.name]
    out: dict[str, Any] = {by.name: None if value in ("", 0) and not by.is_time else value}
    if by.name == "api_key":
        out["api_key_name"] = row.get("api_key_name") or None
    return out


def _key_extra(by: Dimension) -> dict[str, str]:
    return {"api_key_name": "any(api_key_name)"} if by.name == "api_key" else {}


def _order(by: Dimension, figure: str) -> list[str]:
    return [by.name] if by.is_time else [f"{figure} DESC", by.name]


def spend(reader: Reader, window: Window, by: str = "provider", top: int | None = 20,
          filters: Sequence[Where] | None = None) -> dict[str, Any]:
    """Requests, errors, tokens and cost by `by`, biggest spend first (time buckets in
    order), with cost per request and per 1K tokens and each group's share of the spend.
    By agent, session or trace: the `runs` report; by tool: the `tools` report."""
    if by in RUN_DIMENSIONS:
        return runs(reader, window, by, top, filters)
    if by == TOOL_DIMENSION:
        return tools(reader, window, top, filters)
    dim = dimension(by)
    rows, total = reader.select_with_total(
        window, by=[dim], filters=filters or (), figures=SPEND_FIGURES, extra=_key_extra(dim),
        order_by=_order(dim, "cost_usd"), limit=None if dim.is_time else top)
    total_cost = total["cost_usd"]
    return {
        "report": "spend", "by": by, **window.describe(),
        "rows": [{**keys(r, dim), **usage(r), "share": ratio(r["cost_usd"], total_cost, 4)}
                 for r in rows],
        "total": usage(total),
    }


# --- agent runs, conversations and tools ---------------------------------------------------
# Per run (a trace): its model calls' figures (the agent run's own event, which may repeat
# their usage, and tool and MCP calls are no model calls), its tool calls, its failed
# calls (of any kind), and how long it took: its first event's start to its last one's end.
# The calls of no trace come as one row (`_run` ''), each call a run of its own: their
# count, those that failed, their durations summed, their first and last start.
_PER_RUN: Expressions = {
    "run_llm_calls": Figure("requests", IS_MODEL_CALL),
    "run_input_tokens": Figure("input_tokens", IS_MODEL_CALL),
    "run_output_tokens": Figure("output_tokens", IS_MODEL_CALL),
    "run_cost_usd": Figure("cost_usd", IS_MODEL_CALL),
    "run_unpriced": Figure("unpriced_requests", IS_MODEL_CALL),
    "run_tool_calls": Figure("requests", IS_TOOL_CALL),
    "run_tool_ms_sum": Figure("duration_ms_sum", IS_TOOL_CALL),
    "run_tool_ms_count": Figure("duration_ms_count", IS_TOOL_CALL),
    "run_errors": Figure("errors"),
    "run_events": Figure("events"),
    "run_failed_events": Figure("failed_events"),
    "run_events_ms": Figure("event_ms"),
    "run_start": Figure("first_ns"),
    "run_last_start": Figure("last_ns"),
    "run_end": Figure("last_end_ns"),
}
_TRACED = "_run != ''"


_RUNS = {
    "runs": f"sum(if({_TRACED}, 1, _run_events))", "llm_calls": "sum(_run_llm_calls)",
    "input_tokens": "sum(_run_input_tokens)", "output_tokens": "sum(_run_output_tokens)",
    "cost_usd": "sum(_run_cost_usd)", "unpriced_llm_calls": "sum(_run_unpriced)",
    "tool_calls": "sum(_run_tool_calls)", "tool_ms_sum": "sum(_run_tool_ms_sum)",
    "tool_ms_count": "sum(_run_tool_ms_count)", "errors": "sum(_run_errors)",
    "failed_runs": f"sum(if({_TRACED}, toUInt64(_run_errors > 0), _run_failed_events))",
    "run_ms_sum": f"sum(if({_TRACED}, (_run_end - _run_start) / 1e6, _run_events_ms))",
    "first_ns": "min(_run_start)",
    "last_ns": f"max(if({_TRACED}, _run_start, _run_last_start))",
}
# The agents of each group's runs, for an answer by session or trace only: a set of names
# per run is a sixth of the answer by agent (1,640 -> 1,300 ms at 100 million events,
# docs/finops.md), where each group is one agent anyway.
_AGENTS_PER_RUN: Expressions = {"run_agents": "groupUniqArrayIf(agent_name, agent_name != '')"}
_AGENTS: Expressions = {"agents": "groupUniqArrayArray(_run_agents)"}
# Agents with a name: `analytics/agents`' runs.
NAMED_AGENT = Condition(f"{dimension('agent').sql('raw')} != ''", uses=(dimension("agent"),))


def run_questions() -> list[Question]:
    """The `runs` answers kept per closed day (`seals.py`): by agent, session and trace,
    and by named agent (`analytics/agents`). Each is `runs`' own question: any other
    filter is answered live."""
    return [Question(dimension("agent"), (), _PER_RUN, _RUNS),
            Question(dimension("agent"), (NAMED_AGENT,), _PER_RUN, _RUNS),
            *(Question(dimension(by), (), {**_PER_RUN, **_AGENTS_PER_RUN},
                       {**_RUNS, **_AGENTS}) for by in ("session", "trace"))]


def sealed_runs(schema: Schema) -> SealedRuns:
    """The kept answers a `Reader` of `schema` reads (`Reader(seals=...)`)."""
    return SealedRuns(schema, run_questions())


def runs(reader: Reader, window: Window, by: str = "agent", top: int | None = 20,
         filters: Sequence[Where] | None = None) -> dict[str, Any]:
    """The cost of agent runs (a run is a trace) by agent, session or trace, biggest spend
    first: runs, the runs' model calls (their count, tokens and cost), tool calls and
    their average latency, failed calls and runs, and the average run duration."""
    if by not in RUN_DIMENSIONS:
        raise ValueError(f"runs are grouped by {', '.join(RUN_DIMENSIONS)}, got {quoted(by)}")
    dim = dimension(by)
    per_run, extra = ((_PER_RUN, _RUNS) if by == "agent"
                      else ({**_PER_RUN, **_AGENTS_PER_RUN}, {**_RUNS, **_AGENTS}))
    rows, total = reader.select_with_total(window, by=[dim], filters=filters or (),
                                           per_run=per_run, extra=extra,
                                           order_by=["cost_usd DESC", "runs DESC", by],
                                           limit=top)
    return {
        "report": "runs", "by": by, **window.describe(),
        "rows": [{**keys(r, dim), **_run(r, by),
                  "share": ratio(r["cost_usd"], total["cost_usd"], 4)} for r in rows],
        "total": _run(total, by),
    }


def _iso_of_ns(ns: int) -> str:
    """A time in Unix nanoseconds as ISO 8601 UTC text, to the second."""
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(row: dict[str, Any], by: str) -> dict[str, Any]:
    runs_, cost = row["runs"], row["cost_usd"]
    tokens = row["input_tokens"] + row["output_tokens"]
    return {
        "runs": runs_, "cost_usd": number(cost), "cost_per_run_usd": ratio(cost, runs_),
        "llm_calls": number(row["llm_calls"]), "input_tokens": number(row["input_tokens"]),
        "output_tokens": number(row["output_tokens"]), "total_tokens": number(tokens),
        "unpriced_llm_calls": number(row["unpriced_llm_calls"]),
        "tool_calls": number(row["tool_calls"]),
        "avg_tool_latency_ms": ratio(row["tool_ms_sum"], row["tool_ms_count"], 1),
        "errors": number(row["errors"]), "failed_runs": row["failed_runs"],
        "avg_run_duration_ms": ratio(row["run_ms_sum"], runs_, 1),
        **({} if by == "agent" else {"agents": sorted(row["agents"])}),
        "first_seen": _iso_of_ns(row["first_ns"]) if runs_ else None,
        "last_seen": _iso_of_ns(row["last_ns"]) if runs_ else None,
    }


TOOL_FIGURES = ("requests", "errors", "duration_ms_sum", "duration_ms_count",
                "duration_ms_quantiles")


def tools(reader: Reader, window: Window, top: int | None = 20,
          filters: Sequence[Where] | None = None) -> dict[str, Any]:
    """Per tool (`tool_name` of the tool calls: `execute_tool` events, an MCP `tools/call`
    included), most called first: calls, errors, latency (average, p95) and the bytes of
    arguments and results, and the runs (traces) that called it."""
    dim = dimension(TOOL_DIMENSION)
    where = [*(filters or []), Condition(IS_TOOL_CALL)]
    extra: Expressions = {"request_bytes": Figure("request_bytes"),
                          "response_bytes": Figure("response_bytes"),
                          "runs": Figure("traces")}
    rows, total = reader.select_with_total(
        window, by=[dim], filters=where, figures=TOOL_FIGURES, extra=extra,
        order_by=["requests DESC", TOOL_DIMENSION], limit=top)
    return {"report": "tools", "by": TOOL_DIMENSION, **window.describe(),
            "rows": [{**keys(r, dim), **tool_call(r)} for r in rows], "total": tool_call(total)}


def tool_call(row: dict[str, Any]) -> dict[str, Any]:
    """Calls, errors, latency and sizes of a row of calls (tools, MCP methods)."""
    p50, p95, _ = (quantile(v) for v in row["duration_ms_quantiles"])
    return {"calls": number(row["requests"]), "errors": number(row["errors"]),
            "error_rate": ratio(row["errors"], row["requests"], 4),
            "avg_latency_ms": ratio(row["duration_ms_sum"], row["duration_ms_count"], 1),
            "p50_latency_ms": p50, "p95_latency_ms": p95,
            **{k: row[k] for k in ("request_bytes", "response_bytes", "runs") if k in row}}


def quantile(value: float | None) -> float | None:
    """A t-digest estimate for output; None (not NaN) when there was nothing to measure."""
    return None if value is None or math.isnan(value) else number(value, 1)


def _model_calls(by: str) -> list[Where]:
    """By agent, session or trace, the cost is that of model calls only (as in `runs`: an
    agent run's own event repeats their usage); tools have none."""
    if by == TOOL_DIMENSION:
        raise ValueError("tools have no cost (a run's model calls are no one tool's): "
                         "--by tool is for spend (the tools report) only")
    return [Condition(IS_MODEL_CALL)] if by in RUN_DIMENSIONS else []


def growth(reader: Reader, window: Window, by: str = "model",
           top: int | None = 20) -> dict[str, Any]:
    """Spend in this window against the one before it, fastest growing first."""
    dim = dimension(by)
    if dim.is_time:
        raise ValueError("growth compares groups across two periods: --by cannot be a time")
    previous = window.previous()
    if previous.since < EARLIEST:
        raise ValueError(f"growth compares with the period of the same length before: "
                         f"{iso(previous.since)} is before {iso(EARLIEST)}, the earliest "
                         "time ClickHouse holds; ask for a later or shorter window")
    rows = reader.select(
        Window(previous.since, window.until), by=[dim], filters=_model_calls(by),
        extra={**_key_extra(dim), "change_usd": "_cost_usd - _previous_cost_usd"},
        within={"cost_usd": ("cost_usd", window), "previous_cost_usd": ("cost_usd", previous),
                "requests": ("requests", window), "previous_requests": ("requests", previous)},
        order_by=["change_usd DESC", dim.name], limit=top)
    return {
        "report": "growth", "by": by, **window.describe(),
        "previous": previous.describe(),
        "rows": [{**keys(r, dim), "cost_usd": number(r["cost_usd"]),
                  "previous_cost_usd": number(r["previous_cost_usd"]),
                  "change_usd": number(r["change_usd"]),
                  "growth": ratio(r["change_usd"], r["previous_cost_usd"], 4),
                  "requests": number(r["requests"]),
                  "previous_requests": number(r["previous_requests"])} for r in rows],
    }


def variance(reader: Reader, window: Window, by: str = "provider",
             top: int | None = 20) -> dict[str, Any]:
    """Estimated (cost processor) against actual (reported by the source) cost, biggest gap
    first (then the most requests without estimate). The comparison is over the requests
    with both: a request whose source reported a cost but which has no estimate (its
    model has no price) is counted apart (`requests_without_estimate`,
    `actual_cost_without_estimate_usd`), never taken as an estimate of 0; a group with no
    request to compare shows no estimate and no variance (None), not a perfect match."""
    dim = dimension(by)
    filters = _model_calls(by)
    compared_actual = "_actual_cost_usd - _unestimated_actual_cost_usd"
    rows, total = reader.select_with_total(
        window, by=[dim], filters=filters, figures=VARIANCE_FIGURES,
        extra={**_key_extra(dim),
               "gap": f"abs({compared_actual} - _estimated_cost_of_actual_usd)"},
        having="_actual_cost_requests > 0",
        order_by=[dim.name] if dim.is_time
        else ["gap DESC", "unestimated_actual_requests DESC", dim.name], limit=top)
    return {
        "report": "variance", "by": by, **window.describe(),
        "rows": [{**keys(r, dim), **_variance(r)} for r in rows],
        "total": _variance(total),
    }


def _variance(row: dict[str, Any]) -> dict[str, Any]:
    unestimated = row["unestimated_actual_requests"]
    compared = row["actual_cost_requests"] - unestimated
    out: dict[str, Any] = {"requests_with_actual": number(row["actual_cost_requests"]),
                           "requests_without_estimate": number(unestimated)}
    if round(compared, 6) > 0:  # weighted counts are float sums: 1e-9 is none
        estimated = row["estimated_cost_of_actual_usd"]
        actual = row["actual_cost_usd"] - row["unestimated_actual_cost_usd"]
        out |= {"estimated_cost_usd": number(estimated), "actual_cost_usd": number(actual),
                "variance_usd": number(actual - estimated),
                "variance_ratio": ratio(actual - estimated, estimated, 4)}
    else:
        out |= {"estimated_cost_usd": None, "actual_cost_usd": None, "variance_usd": None,
                "variance_ratio": None}
    out["actual_cost_without_estimate_usd"] = number(row["unestimated_actual_cost_usd"])
    return out
