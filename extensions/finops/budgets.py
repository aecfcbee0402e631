"""Budgets: the `budgets` of the `finops` extension, and spend against them.

```yaml
extensions:
  finops:
    budgets:
      search-team:
        scope: {team: search}            # user, team, api_key_id, api_key_name, provider,
        period: month                    # model, metadata: {KEY: VALUE}; all must match
        limit_usd: 5000
        notify_at: [0.5, 0.8, 1.0]
        notify: [slack-finops]           # notifiers (notifiers.py)
      per-user-daily:
        per: user                        # each user gets the limit (user, api_key, team,
        window: 24h                      # metadata.KEY); rolling 24h
        limit_usd: 20
        action: enforce                  # the gateway answers 429 once it is spent
```

Spend is always computed from ClickHouse (the window so far), so it survives restarts,
through `Reader.select`, which answers from the rollups that fit the scope; it is
published as `llm_gateway_budget_*` gauges on the daemon's meter, which the `prometheus`
exporter republishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec
from opentelemetry.metrics import Observation

from meterline.component import Config
from meterline.exporters.clickhouse.query import (
    Filter,
    Reader,
    Window,
    dimension,
    iso,
    parse_range,
)
from meterline.extensions.finops.finops import number, ratio
from meterline.extensions.finops.gauges import PublishedGauges

# scope key -> the event column it matches
SCOPE_COLUMNS = {"user": "user_id", "team": "team", "api_key_id": "api_key_id",
                 "api_key_name": "api_key_name", "provider": "provider", "model": "model"}
PER = ("user", "api_key", "team")  # or metadata.KEY


class BudgetScope(Config):
    """Which spend counts against the budget: every key given must match."""

    user: str | None = None  # spend of this end user (user_id)
    team: str | None = None  # of this team
    api_key_id: str | None = None  # of this API key id
    api_key_name: str | None = None  # of this API key name
    provider: str | None = None  # with this provider
    model: str | None = None  # on this model
    metadata: dict[str, str] = msgspec.field(default_factory=dict)  # with these metadata

    def given(self) -> dict[str, str]:
        """The scope as {column: value}, metadata keys as `metadata.KEY`."""
        out = {column: value for name, column in SCOPE_COLUMNS.items()
               if (value := getattr(self, name)) is not None}
        return out | {f"metadata.{k}": v for k, v in self.metadata.items()}

    def filters(self) -> list[Filter]:
        return filters_of(self.given())

    def describe(self) -> dict[str, str]:
        out = {name: value for name in SCOPE_COLUMNS if (value := getattr(self, name)) is not None}
        return out | {f"metadata.{k}": v for k, v in self.metadata.items()}


def usd(amount: float) -> str:
    """An amount for people to read: cents from a dollar up, and below a dollar as many
    decimals as show its first two digits ($0.000028), so that a small limit or spend
    (a test budget, a cheap model's calls) never reads as $0.00."""
    if amount == 0 or abs(amount) >= 1:
        return f"${amount:,.2f}"
    return f"${amount:.{max(2, 1 - math.floor(math.log10(abs(amount))))}f}"


def filters_of(given: dict[str, str]) -> list[Filter]:
    """{column: value} (metadata keys as `metadata.KEY`) as the filters of a question."""
    return [Filter("metadata", v, metadata_key=c.removeprefix("metadata."))
            if c.startswith("metadata.") else Filter(c, v) for c, v in given.items()]


class Budget(Config):
    limit_usd: float  # the spend allowed per window, in USD (for each member, with `per`)
    # a calendar window, UTC (weeks start on Monday); month when neither this nor `window`
    period: Literal["day", "week", "month"] | None = None
    window: str | None = None  # a rolling window instead: 24h, 7d, 30d (any Nh or Nd)
    scope: BudgetScope = msgspec.field(default_factory=BudgetScope)
    # each member gets the limit: user, api_key (its id), team or metadata.KEY
    per: str | None = None
    # fractions of the limit at which a notification is sent, once per crossing
    notify_at: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.8, 1.0])
    notify: list[str] = msgspec.field(default_factory=list)  # notifier names (notifiers:)
    # notify: only notifications; enforce: also the linked gateway answers 429 once spent
    action: Literal["notify", "enforce"] = "notify"

    def __post_init__(self) -> None:
        if self.limit_usd <= 0:
            raise ValueError(f"limit_usd must be positive, got {self.limit_usd}")
        if any(t <= 0 for t in self.notify_at):
            raise ValueError("notify_at are fractions of the limit and must be positive "
                             "(e.g. [0.5, 0.8, 1.0])")
        self.notify_at = sorted(set(self.notify_at))
        if self.period and self.window:
            raise ValueError("give period (calendar) or window (rolling), not both")
        if self.window is not None:
            parse_range(self.window)
        elif self.period is None:
            self.period = "month"
        if self.per is not None and self.per not in PER and not self.per.startswith("metadata."):
            raise ValueError(f"per must be one of {', '.join(PER)} or metadata.KEY, "
                             f"got {self.per!r}")
        if self.per is not None:
            dimension(self.per)  # a valid metadata key

    @property
    def span(self) -> str:
        """The window as the gauges and the API name it: day, week, month, 24h..."""
        return self.window or self.period or "month"

    def window_at(self, now: datetime) -> Window:
        """The current calendar period, or the rolling window ending now."""
        if self.window is not None:
            return Window.parse(self.window, now=now)
        day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "day":
            return Window(day, day + timedelta(days=1))
        if self.period == "week":
            start = day - timedelta(days=day.weekday())
            return Window(start, start + timedelta(days=7))
        start = day.replace(day=1)
        return Window(start, (start + timedelta(days=32)).replace(day=1))


def status(reader: Reader, budgets: Mapping[str, Budget],
           now: datetime | None = None) -> list[dict[str, Any]]:
    """Spend so far in each budget's current window, against its limit: one row per
    budget, or with `per`, one per member that reached its lowest threshold (members
    below it are not listed: a per-user budget would otherwise be a row, and a gauge
    series, per user)."""
    now = now or datetime.now(UTC)
    out = []
    for name, budget in budgets.items():
        window = budget.window_at(now)
        filters = budget.scope.filters()
        if budget.per is None:
            [row] = reader.select(window, filters=filters, figures=["cost_usd"])
            spends = {None: row["cost_usd"] or 0.0}
        else:
            floor = budget.limit_usd * min([*budget.notify_at, 1.0])
            rows = reader.select(window, by=[dimension(budget.per)], filters=filters,
                                 figures=["cost_usd"], having=f"_cost_usd >= {floor!r}",
                                 order_by=["cost_usd DESC"])
            spends = {r[budget.per]: r["cost_usd"] for r in rows if r[budget.per]}
        out += [_row(name, budget, window, member, spend) for member, spend in spends.items()]
    return out


def _row(name: str, budget: Budget, window: Window, member: str | None,
         spend: float) -> dict[str, Any]:
    utilization = spend / budget.limit_usd
    reached = max((t for t in budget.notify_at if utilization >= t), default=None)
    return {
        "budget": name, "scope": budget.scope.describe(), "per": budget.per, "member": member,
        "period": budget.span, "rolling": budget.window is not None,
        "period_start": iso(window.since), "period_end": iso(window.until),
        "limit_usd": number(budget.limit_usd), "spend_usd": number(spend),
        "remaining_usd": number(max(budget.limit_usd - spend, 0.0)),
        "utilization": ratio(spend, budget.limit_usd, 4),
        "notify_at": budget.notify_at, "threshold_reached": reached, "action": budget.action,
        "status": ("exceeded" if utilization >= 1 else "warning" if reached else "ok"),
    }


class BudgetGauges(PublishedGauges):
    """The `llm_gateway_budget_*` gauges of one meter, from the budget statuses."""

    GAUGES = (
        ("llm_gateway_budget_spend_usd", "spend_usd",
         "Spend so far in the budget's window (by member, for a budget `per` member)"),
        ("llm_gateway_budget_limit_usd", "limit_usd", "The budget's limit for its window"),
        ("llm_gateway_budget_utilization_ratio", "utilization",
         "Spend so far over the limit (1 is the whole budget)"),
        ("llm_gateway_budget_threshold_reached_ratio", "threshold_reached",
         "The highest notify_at threshold the spend has reached (0: none)"),
    )

    def observe(self, row: dict[str, Any], key: str) -> Observation:
        labels = {"budget": row["budget"], "period": row["period"],
                  "scope": ",".join(f"{k}={v}" for k, v in row["scope"].items()),
                  "member": row["member"] or ""}
        return Observation(float(row[key] or 0), labels)
