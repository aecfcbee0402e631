"""The spent `action: enforce` budgets as blocks for the linked gateway (gateway/budgets.py).

A block is in the terms the gateway knows of a request before forwarding it: user,
API key id, provider, model (the requested one) and metadata. Team and API key name
are set later, by the `labels` processor, so a budget scoped (or `per`) by team or key
name is enforced on the API keys that spent under it in the window: a key that has
not spent there yet is not refused until it has.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from meterline.exporters.clickhouse.query import Filter, Reader, Window, dimension, parse_time
from meterline.extensions.finops.budgets import Budget, filters_of, usd
from meterline.gateway.budgets import Block

# Scope columns the gateway does not know (the labels processor sets them); the others
# (user_id, api_key_id, provider, model, metadata.KEY) are its term names.
_BY_KEY = ("team", "api_key_name")
_HOUR = timedelta(hours=1)


def blocks(reader: Reader, budgets: dict[str, Budget], statuses: list[dict[str, Any]]
           ) -> list[Block]:
    """Blocks for the exceeded enforced budgets of `statuses` (blocking: run in a thread)."""
    out = []
    for s in statuses:
        budget = budgets[s["budget"]]
        if s["status"] != "exceeded" or budget.action != "enforce":
            continue
        given = budget.scope.given()
        if budget.per is not None:
            per = budget.per
            given[per if per.startswith("metadata.") else dimension(per).column or per] = \
                s["member"]
        terms = {(c, v) for c, v in given.items() if c not in _BY_KEY}
        keyed = {c: v for c, v in given.items() if c in _BY_KEY}
        member = f" ({budget.per} {s['member']})" if s["member"] else ""
        span = f"in the last {s['period']}" if s["rolling"] else f"this {s['period']}"
        message = (f"budget {s['budget']!r}{member} exceeded: {usd(s['spend_usd'])} of "
                   f"{usd(s['limit_usd'])} {span}")
        window = Window(parse_time(s["period_start"], "period_start"),
                        parse_time(s["period_end"], "period_end"))
        until = (_under_limit_at(reader, budget.limit_usd, window, filters_of(given))
                 if s["rolling"] else window.until).timestamp()
        if not keyed:
            out.append(Block(s["budget"], frozenset(terms), message, until))
            continue
        out += [Block(s["budget"], frozenset({*terms, ("api_key_id", key)}), message, until)
                for key in _keys(reader, budget, window, keyed)]
    return out


def _under_limit_at(reader: Reader, limit: float, window: Window,
                    filters: list[Filter]) -> datetime:
    """When the spend of a rolling window ending now falls back under `limit`, if nothing
    more is spent: the oldest hours leave the window first. An hour counts as gone only
    once all of it has left, so the time told is never too early (by at most an hour)."""
    rows = reader.select(window, by=[dimension("hour")], filters=filters, figures=["cost_usd"])
    spend = sum(r["cost_usd"] or 0.0 for r in rows)
    length = window.until - window.since
    when = window.until  # (under the limit already: at once)
    for row in sorted(rows, key=lambda r: r["hour"]):
        if spend < limit:
            break
        spend -= row["cost_usd"] or 0.0
        when = parse_time(row["hour"], "hour") + _HOUR + length
    return when


def _keys(reader: Reader, budget: Budget, window: Window, keyed: dict[str, str]) -> list[str]:
    """The API key ids that spent under the budget's scope (and member) in its window."""
    filters = budget.scope.filters() + [Filter(c, v) for c, v in keyed.items()
                                        if c not in budget.scope.given()]
    rows = reader.select(window, by=[dimension("api_key")], filters=filters,
                         figures=["events"])
    return [r["api_key"] for r in rows if r["api_key"]]
