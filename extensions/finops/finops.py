"""FinOps reports: spend by a dimension, growth, estimated against actual cost.

Each report is a plain dict (`report`, the window, `by`, `rows`, and `total`
where a total makes sense), the same whether `meterline finops` computes it
itself or gets it from the daemon's admin API (`/api/v1/finops/<report>`).
Budgets are in `budgets.py`.
"""

from __future__ import annotations

from typing import Any

from meterline.exporters.clickhouse.query import Dimension, Filter, Reader, Window, dimension

SPEND_FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd",
                 "unpriced_requests", "cache_hits", "saved_cost_usd")
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
          filters: list[Filter] | None = None) -> dict[str, Any]:
    """Requests, errors, tokens and cost by `by`, biggest spend first (time buckets in
    order), with cost per request and per 1K tokens and each group's share of the spend."""
    dim = dimension(by)
    rows = reader.select(window, by=[dim], filters=filters or [], figures=SPEND_FIGURES,
                         extra=_key_extra(dim), order_by=_order(dim, "cost_usd"),
                         limit=None if dim.is_time else top)
    [total] = reader.select(window, filters=filters or [], figures=SPEND_FIGURES)
    total_cost = total["cost_usd"]
    return {
        "report": "spend", "by": by, **window.describe(),
        "rows": [{**keys(r, dim), **usage(r), "share": ratio(r["cost_usd"], total_cost, 4)}
                 for r in rows],
        "total": usage(total),
    }


def growth(reader: Reader, window: Window, by: str = "model",
           top: int | None = 20) -> dict[str, Any]:
    """Spend in this window against the one before it, fastest growing first."""
    dim = dimension(by)
    if dim.is_time:
        raise ValueError("growth compares groups across two periods: --by cannot be a time")
    previous = window.previous()
    rows = reader.select(
        Window(previous.since, window.until), by=[dim],
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
    compared_actual = "_actual_cost_usd - _unestimated_actual_cost_usd"
    rows = reader.select(
        window, by=[dim], figures=VARIANCE_FIGURES,
        extra={**_key_extra(dim),
               "gap": f"abs({compared_actual} - _estimated_cost_of_actual_usd)"},
        having="_actual_cost_requests > 0",
        order_by=[dim.name] if dim.is_time
        else ["gap DESC", "unestimated_actual_requests DESC", dim.name], limit=top)
    [total] = reader.select(window, figures=VARIANCE_FIGURES)
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
