"""The analytics API's answers (`/api/v1/analytics/*`, after seed 003).

Each function takes a `Reader`, a `Window` and the endpoint's parameters and
returns the JSON body. They read the rollups (by model, by user per week and day,
by tool, by trace: see `query.Reader`), so a 90-day question does not scan raw
events, except guardrails, which read raw events in the window. Latency
percentiles are t-digest estimates merged from the rollups' states; everything
else is exact.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from meterline.exporters.clickhouse.metrics import (
    HAS_GUARDRAIL,
    IS_GUARDRAIL_BLOCKED,
    IS_GUARDRAIL_MODIFIED,
    IS_MCP,
    IS_MCP_CONNECT,
    IS_MODEL_CALL,
    Figure,
    raw,
)
from meterline.exporters.clickhouse.query import (
    Condition,
    Dimension,
    Expressions,
    Filter,
    Reader,
    Where,
    Window,
    dimension,
    iso,
    literal,
)
from meterline.extensions.finops import finops
from meterline.extensions.finops.finops import cache, number, quantile, ratio, tool_call, usage
from meterline.params import quoted

if TYPE_CHECKING:
    from meterline.gateway.guardrails import GuardrailRule

_MODEL = [dimension("model"), dimension("provider")]
_ROLLING = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
_TOKENS = ("requests", "input_tokens", "output_tokens", "cost_usd")
_CACHE = ("cache_hits", "saved_cost_usd")
_LATENCY = ("duration_ms_sum", "duration_ms_count", "duration_ms_quantiles")
_GRANULARITIES = {"hourly": ("toStartOfHour", timedelta(hours=1)),
                  "daily": ("toStartOfDay", timedelta(days=1))}


def _filters(provider: str | None = None, model: str | None = None,
             user: str | None = None) -> list[Where]:
    wanted = {"provider": provider, "model": model, "user_id": user}
    return [Filter(column, value) for column, value in wanted.items()
            if value not in (None, "", "all")]


def _latency(row: dict[str, Any]) -> dict[str, Any]:
    p50, p95, p99 = (quantile(v) for v in row["duration_ms_quantiles"])
    return {"avg_latency_ms": ratio(row["duration_ms_sum"], row["duration_ms_count"], 1),
            "p50_latency_ms": p50, "p95_latency_ms": p95, "p99_latency_ms": p99}


def _rates(row: dict[str, Any]) -> dict[str, Any]:
    errors, requests = row["errors"], row["requests"]
    return {"error_rate": ratio(errors, requests, 4),
            "success_rate": ratio(requests - errors, requests, 4)}


def _header(window: Window, **params: Any) -> dict[str, Any]:
    return {**window.describe(), **params}


def models(reader: Reader, window: Window, provider: str | None = None) -> dict[str, Any]:
    """Per model (and provider): requests, tokens, latency, error and success rates, cost,
    and the rolling 24h/7d/30d figures up to the window's end."""
    longest = window.ending(max(_ROLLING.values()))
    span = Window(min(window.since, longest.since), window.until)
    within = {name: (name, window) for name in
              ("requests", "errors", "input_tokens", "output_tokens", "cost_usd", *_CACHE,
               *_LATENCY)}
    for label, length in _ROLLING.items():
        within |= {f"{name}_{label}": (name, window.ending(length)) for name in _TOKENS}
    rows = reader.select(span, by=_MODEL, filters=_filters(provider), within=within,
                         order_by=["cost_usd DESC", "model"])
    out = []
    for r in rows:
        if not r["requests"]:
            continue  # seen only in the rolling windows, not in the range asked
        out.append({
            "model": r["model"] or None, "provider": r["provider"] or None,
            "requests": number(r["requests"]), "errors": number(r["errors"]),
            "input_tokens": number(r["input_tokens"]),
            "output_tokens": number(r["output_tokens"]),
            "total_tokens": number(r["input_tokens"] + r["output_tokens"]),
            **_latency(r), **_rates(r), "cost_usd": number(r["cost_usd"]), **cache(r),
            "rolling": {label: {
                "requests": number(r[f"requests_{label}"]),
                "total_tokens": number(r[f"input_tokens_{label}"] + r[f"output_tokens_{label}"]),
                "cost_usd": number(r[f"cost_usd_{label}"])} for label in _ROLLING},
        })
    return {**_header(window, provider=provider or "all"), "models": out}


def timeseries(reader: Reader, window: Window, granularity: str | None = None,
               provider: str | None = None) -> dict[str, Any]:
    """Buckets over the window, hourly up to 24 hours and daily beyond unless asked;
    buckets without traffic are there, with zeros."""
    granularity = granularity or ("hourly" if window.length <= timedelta(days=1) else "daily")
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be hourly or daily, got {quoted(granularity)}")
    function, step = _GRANULARITIES[granularity]
    bucket = Dimension("time", None, f"formatDateTime({function}({{t}}), '%FT%TZ', 'UTC')",
                       grain=int(step.total_seconds()))
    rows = {r["time"]: r for r in reader.select(
        window, by=[bucket], filters=_filters(provider),
        figures=("requests", "errors", "input_tokens", "output_tokens", "cost_usd", *_CACHE,
                 "duration_ms_sum", "duration_ms_count"))}
    points = []
    start = window.since.replace(minute=0)
    if granularity == "daily":
        start = start.replace(hour=0)
    while start < window.until:
        r = rows.get(iso(start))
        points.append({"time": iso(start), **(_point(r) if r else _EMPTY_POINT)})
        start += step
    return {**_header(window, granularity=granularity, provider=provider or "all"),
            "points": points}


def _point(r: dict[str, Any]) -> dict[str, Any]:
    return {"requests": number(r["requests"]), "errors": number(r["errors"]),
            "input_tokens": number(r["input_tokens"]),
            "output_tokens": number(r["output_tokens"]),
            "total_tokens": number(r["input_tokens"] + r["output_tokens"]),
            "cost_usd": number(r["cost_usd"]), **cache(r),
            "avg_latency_ms": ratio(r["duration_ms_sum"], r["duration_ms_count"], 1)}


_EMPTY_POINT = {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0,
                "total_tokens": 0, "cost_usd": 0, "cache_hits": 0, "saved_cost_usd": 0,
                "avg_latency_ms": None}


def providers(reader: Reader, window: Window, provider: str | None = None) -> dict[str, Any]:
    """Per provider: how many models, requests, tokens, latency, cost, success rate."""
    rows = reader.select(window, by=[dimension("provider")], filters=_filters(provider),
                         figures=("requests", "errors", "input_tokens", "output_tokens",
                                  "cost_usd", *_CACHE, "duration_ms_sum", "duration_ms_count"),
                         extra={"model_count": "uniqExactIf(cityHash64(model), model != '')"},
                         order_by=["cost_usd DESC", "provider"])
    return {**_header(window, provider=provider or "all"), "providers": [{
        "provider": r["provider"] or None, "model_count": r["model_count"],
        "requests": number(r["requests"]), "errors": number(r["errors"]),
        "input_tokens": number(r["input_tokens"]),
        "output_tokens": number(r["output_tokens"]),
        "total_tokens": number(r["input_tokens"] + r["output_tokens"]),
        "avg_latency_ms": ratio(r["duration_ms_sum"], r["duration_ms_count"], 1),
        "cost_usd": number(r["cost_usd"]), **cache(r), **_rates(r)} for r in rows]}


def costs(reader: Reader, window: Window, group_by: str = "model",
          provider: str | None = None, limit: int = 100) -> dict[str, Any]:
    """Spend grouped by model, provider, day (or any FinOps dimension), with shares."""
    if group_by == finops.TOOL_DIMENSION:
        raise ValueError("group_by tool has no cost (a run's model calls are no one tool's): "
                         "see /api/v1/analytics/agents for tool calls")
    report = finops.spend(reader, window, by=group_by, top=limit, filters=_filters(provider))
    return {**_header(window, group_by=group_by, provider=provider or "all"),
            "total_cost_usd": report["total"]["cost_usd"],
            "costs": [{"key": row[group_by], **row} for row in report["rows"]]}


def usage_report(reader: Reader, window: Window, model_id: str | None = None,
                 user_id: str | None = None, provider: str | None = None) -> dict[str, Any]:
    """Total requests, tokens and cost, and the same per model, optionally for one model
    or one user."""
    report = finops.spend(reader, window, by="model", top=None,
                          filters=_filters(provider, model_id, user_id))
    return {**_header(window, model_id=model_id, user_id=user_id, provider=provider or "all"),
            "totals": report["total"], "models": report["rows"]}


def performance(reader: Reader, window: Window, model_id: str | None = None,
                provider: str | None = None) -> dict[str, Any]:
    """Per model, and over all of them (`totals`, so that a dashboard's percentiles are
    true percentiles rather than an average of each model's): latency (average and
    percentiles), time to first token, error rate and throughput (requests and tokens
    per minute)."""
    figures = ("requests", "errors", "input_tokens", "output_tokens", *_LATENCY,
               "ttft_ms_sum", "ttft_ms_count")
    filters = _filters(provider, model_id)
    rows, total = reader.select_with_total(window, by=_MODEL, filters=filters,
                                           figures=figures, order_by=["requests DESC", "model"])
    minutes = window.length / timedelta(minutes=1)
    return {**_header(window, model_id=model_id, provider=provider or "all"),
            "totals": _performance(total, minutes),
            "models": [{"model": r["model"] or None, "provider": r["provider"] or None,
                        **_performance(r, minutes)} for r in rows]}


def _performance(r: dict[str, Any], minutes: float) -> dict[str, Any]:
    return {"requests": number(r["requests"]), **_latency(r),
            "avg_ttft_ms": ratio(r["ttft_ms_sum"], r["ttft_ms_count"], 1), **_rates(r),
            "requests_per_minute": number(r["requests"] / minutes, 4),
            "tokens_per_minute": number((r["input_tokens"] + r["output_tokens"]) / minutes, 4)}


def users(reader: Reader, window: Window, limit: int = 100,
          provider: str | None = None) -> dict[str, Any]:
    """Per user, biggest spender first: usage, cost efficiency, latency, and activity
    (first and last request, active days, models and providers used)."""
    user = dimension("user")
    filters = _filters(provider)
    rows = reader.select(
        window, by=[user], filters=filters,
        figures=("requests", "errors", "input_tokens", "output_tokens", "cost_usd",
                 "unpriced_requests", *_CACHE, "duration_ms_sum", "duration_ms_count",
                 "first_seen", "last_seen", "max_request_tokens", "guardrail_blocked"),
        order_by=["cost_usd DESC", "user"], limit=limit)
    # The models, providers and days of the users listed only: merged for every user, they
    # would cost more than the rest of the answer.
    listed = ", ".join(literal(r["user"]) for r in rows)
    activity = {r["user"]: r for r in reader.select(
        window, by=[user], filters=[*filters, Condition(f"user_id IN ({listed})")],
        figures=("active_days", "models", "providers"))} if rows else {}
    return {**_header(window, provider=provider or "all"), "users": [{
        "user_id": r["user"] or None, **usage(r), **_rates(r),
        "avg_latency_ms": ratio(r["duration_ms_sum"], r["duration_ms_count"], 1),
        **_activity(activity[r["user"]], r["requests"]),
        "first_request": r["first_seen"], "last_request": r["last_seen"],
        "max_tokens_single_request": r["max_request_tokens"],
        "guardrail_violations": number(r["guardrail_blocked"]),
    } for r in rows]}


def _activity(row: dict[str, Any], requests: float) -> dict[str, Any]:
    return {"unique_models": sum(1 for m in row["models"] if m),
            "providers": sorted(p for p in row["providers"] if p),
            "days_active": row["active_days"],
            "avg_requests_per_day": ratio(requests, row["active_days"], 2)}


# --- agents, tools and MCP ---------------------------------------------------------------
def agents(reader: Reader, window: Window, limit: int = 100) -> dict[str, Any]:
    """Agent runs (traces with an agent) per agent, with their cost; tool calls per tool;
    and MCP: requests, sessions, connects (`initialize`) and their latency, per method."""
    runs = finops.runs(reader, window, "agent", top=limit, filters=[finops.NAMED_AGENT])
    tools = finops.tools(reader, window, top=limit)
    return {**_header(window), "totals": runs["total"], "agents": runs["rows"],
            "tools": tools["rows"], "tool_totals": tools["total"],
            "mcp": mcp(reader, window, limit)}


_MCP_METHOD = Dimension("method", "mcp_method")


def mcp(reader: Reader, window: Window, limit: int = 100) -> dict[str, Any]:
    """MCP requests (the gateway's MCP upstreams, MCP spans): sessions, connects and their
    latency, and per method calls, errors and latency."""
    where = [Condition(IS_MCP)]
    connect: Expressions = {
        "connects": Figure("requests", IS_MCP_CONNECT),
        "connect_ms_sum": Figure("duration_ms_sum", IS_MCP_CONNECT),
        "connect_ms_count": Figure("duration_ms_count", IS_MCP_CONNECT),
        "connect_ms_quantiles": Figure("duration_ms_quantiles", IS_MCP_CONNECT),
        "sessions": "uniqExactIf(mcp_session_id, mcp_session_id != '')"}
    [total] = reader.select(window, filters=where, figures=("requests", "errors"),
                            extra=connect)
    methods = reader.select(window, by=[_MCP_METHOD], filters=where,
                            figures=finops.TOOL_FIGURES, extra={"sessions": connect["sessions"]},
                            order_by=["requests DESC", "method"], limit=limit)
    _, p95, _ = total["connect_ms_quantiles"]
    return {"requests": number(total["requests"]), "errors": number(total["errors"]),
            "sessions": total["sessions"], "connects": number(total["connects"]),
            "avg_connect_latency_ms": ratio(total["connect_ms_sum"], total["connect_ms_count"], 1),
            "p95_connect_latency_ms": quantile(p95),
            "methods": [{"method": r["method"] or None, **tool_call(r), "sessions": r["sessions"]}
                        for r in methods]}


# --- guardrails --------------------------------------------------------------------------
_GUARDED = {"blocked": raw("requests", IS_GUARDRAIL_BLOCKED),
            "modified": raw("requests", IS_GUARDRAIL_MODIFIED),
            "flagged": raw("requests", HAS_GUARDRAIL)}
_TODAY = timedelta(hours=24)


def guardrails(reader: Reader, window: Window, provider: str | None = None, limit: int = 100,
               rules: list[GuardrailRule] | None = None,
               gateway: str | None = None) -> dict[str, Any]:
    """Seed 003's guardrails monitoring. Platform-wide: the models seen in the window, those
    that configured rules protect, the rules, and the calls blocked and modified in the
    last 24 hours of the window (and in the whole window); per model: its rules (all,
    input, output), calls, blocked, modified, block rate; per user with guardrail
    outcomes: violations (blocked calls) and modified calls. The rules are those of the
    `gateway` receiver (`rules` None: no gateway linked, so rule figures are unknown,
    None); the outcomes are every source's (gateway, LiteLLM, Otoroshi) events."""
    where = [*_filters(provider), Condition(IS_MODEL_CALL)]
    today = window.ending(min(_TODAY, window.length)).condition("timestamp")
    [total] = reader.select(window, filters=where, figures=("requests",), extra={
        **_GUARDED, "models": "arraySort(groupUniqArrayIf(model, model != ''))",
        "blocked_today": raw("requests", f"{IS_GUARDRAIL_BLOCKED} AND {today}"),
        "modified_today": raw("requests", f"{IS_GUARDRAIL_MODIFIED} AND {today}")})
    per_model = reader.select(window, by=[dimension("model")], filters=where,
                              figures=("requests",), extra=_GUARDED, limit=limit,
                              order_by=["blocked DESC", "modified DESC", "requests DESC",
                                        "model"])
    per_user = reader.select(window, by=[dimension("user")], filters=where,
                             figures=("requests",), extra=_GUARDED, having="_flagged > 0",
                             order_by=["blocked DESC", "modified DESC", "user"], limit=limit)
    protected = (None if rules is None else
                 sum(1 for m in total["models"] if _rules_of(rules, m)["rules_count"]))
    return {
        **_header(window, provider=provider or "all", gateway=gateway),
        "platform": {"total_models": len(total["models"]), "protected_models": protected,
                     "total_rules": None if rules is None else len(rules),
                     "blocked_today": number(total["blocked_today"]),
                     "modified_today": number(total["modified_today"]),
                     "requests": number(total["requests"]),
                     "blocked": number(total["blocked"]), "modified": number(total["modified"]),
                     "block_rate": ratio(total["blocked"], total["requests"], 4)},
        "models": [{"model": r["model"] or None, **_rules_of(rules, r["model"]),
                    "total_requests": number(r["requests"]), "blocked": number(r["blocked"]),
                    "modified": number(r["modified"]), "flagged": number(r["flagged"]),
                    "block_rate": ratio(r["blocked"], r["requests"], 4)} for r in per_model],
        "users": [{"user_id": r["user"] or None, "requests": number(r["requests"]),
                   "guardrail_violations": number(r["blocked"]),
                   "modified": number(r["modified"]), "flagged": number(r["flagged"])}
                  for r in per_user],
    }


def _rules_of(rules: list[GuardrailRule] | None, model: str) -> dict[str, Any]:
    """Whether configured rules protect `model`, and how many (all, on the prompt, on the
    answer); None for each when no gateway's rules are known."""
    if rules is None:
        return {"enabled": None, "rules_count": None, "input_rules": None, "output_rules": None}
    inputs = [r.name for r in rules if r.applies("input", model)]
    outputs = [r.name for r in rules if r.applies("output", model)]
    count = len({*inputs, *outputs})
    return {"enabled": count > 0, "rules_count": count, "input_rules": len(inputs),
            "output_rules": len(outputs)}
