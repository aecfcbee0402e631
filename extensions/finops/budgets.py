"""Budgets: the `budgets` of the `finops` extension, and spend against them.

```yaml
extensions:
  finops:
    budgets:
      search-team:
        scope: {team: search}            # team, api_key_id, api_key_name, provider, model,
        period: month                    # metadata: {KEY: VALUE}; all must match; {} is all
        limit_usd: 5000
        alert_thresholds: [0.5, 0.8, 1.0]
```

Spend is always computed from ClickHouse (the period so far, UTC), so it
survives restarts; it is published as `llm_gateway_budget_*` gauges on the
daemon's meter, which the `prometheus` exporter republishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from weakref import WeakKeyDictionary

import msgspec
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterline.component import Config
from meterline.exporters.clickhouse.query import Filter, Reader, Window, iso
from meterline.extensions.finops.finops import number, ratio


class BudgetScope(Config):
    """Which spend counts against the budget: every key given must match."""

    team: str | None = None  # spend of this team
    api_key_id: str | None = None  # of this API key id
    api_key_name: str | None = None  # of this API key name
    provider: str | None = None  # with this provider
    model: str | None = None  # on this model
    metadata: dict[str, str] = msgspec.field(default_factory=dict)  # with these metadata

    def filters(self) -> list[Filter]:
        fields = {name: getattr(self, name) for name in
                  ("team", "api_key_id", "api_key_name", "provider", "model")}
        out = [Filter(column, value) for column, value in fields.items() if value is not None]
        return out + [Filter("metadata", v, metadata_key=k) for k, v in self.metadata.items()]

    def describe(self) -> dict[str, str]:
        out = {name: value for name in ("team", "api_key_id", "api_key_name", "provider", "model")
               if (value := getattr(self, name)) is not None}
        return out | {f"metadata.{k}": v for k, v in self.metadata.items()}


class Budget(Config):
    limit_usd: float  # the spend allowed per period, in USD
    period: Literal["day", "month"] = "month"  # calendar day or month, UTC
    scope: BudgetScope = msgspec.field(default_factory=BudgetScope)
    # fractions of the limit at which an alert is logged and counted
    alert_thresholds: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.8, 1.0])

    def __post_init__(self) -> None:
        if self.limit_usd <= 0:
            raise ValueError(f"limit_usd must be positive, got {self.limit_usd}")
        if any(t <= 0 for t in self.alert_thresholds):
            raise ValueError("alert_thresholds are fractions of the limit and must be positive "
                             "(e.g. [0.5, 0.8, 1.0])")
        self.alert_thresholds = sorted(set(self.alert_thresholds))


def period_window(period: str, now: datetime) -> Window:
    """The current day or calendar month, UTC."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return Window(day, day + timedelta(days=1))
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return Window(start, end)


def status(reader: Reader, budgets: Mapping[str, Budget],
           now: datetime | None = None) -> list[dict[str, Any]]:
    """Spend so far in each budget's current period, against its limit."""
    now = now or datetime.now(UTC)
    out = []
    for name, budget in budgets.items():
        window = period_window(budget.period, now)
        [row] = reader.select(window, filters=budget.scope.filters(), figures=["cost_usd"])
        spend = row["cost_usd"]
        utilization = spend / budget.limit_usd
        reached = max((t for t in budget.alert_thresholds if utilization >= t), default=None)
        out.append({
            "budget": name, "scope": budget.scope.describe(), "period": budget.period,
            "period_start": iso(window.since), "period_end": iso(window.until),
            "limit_usd": number(budget.limit_usd), "spend_usd": number(spend),
            "remaining_usd": number(max(budget.limit_usd - spend, 0.0)),
            "utilization": ratio(spend, budget.limit_usd, 4),
            "alert_thresholds": budget.alert_thresholds, "threshold_reached": reached,
            "status": ("exceeded" if utilization >= 1 else "warning" if reached else "ok"),
        })
    return out


class BudgetGauges:
    """The `llm_gateway_budget_*` gauges of one meter.

    The OpenTelemetry SDK keeps the callbacks of an instrument's first registration and
    ignores a second one's, so an extension rebuilt on reload cannot register its own:
    the gauges are registered once per meter and read what the current extension
    `publish`es here."""

    _by_meter: WeakKeyDictionary[Meter, BudgetGauges] = WeakKeyDictionary()

    GAUGES = (
        ("llm_gateway_budget_spend_usd", "spend_usd", "Spend so far in the budget's period"),
        ("llm_gateway_budget_limit_usd", "limit_usd", "The budget's limit for its period"),
        ("llm_gateway_budget_utilization_ratio", "utilization",
         "Spend so far over the limit (1 is the whole budget)"),
        ("llm_gateway_budget_threshold_reached_ratio", "threshold_reached",
         "The highest alert threshold the spend has reached (0: none)"),
    )

    def __init__(self, meter: Meter) -> None:
        self._statuses: list[dict[str, Any]] = []
        for name, key, description in self.GAUGES:
            meter.create_observable_gauge(name, callbacks=[self._observe(key)],
                                          description=description)

    @classmethod
    def of(cls, meter: Meter) -> BudgetGauges:
        if meter not in cls._by_meter:
            cls._by_meter[meter] = cls(meter)
        return cls._by_meter[meter]

    def publish(self, statuses: list[dict[str, Any]]) -> None:
        self._statuses = statuses

    def _observe(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for s in self._statuses:
                labels = {"budget": s["budget"], "period": s["period"],
                          "scope": ",".join(f"{k}={v}" for k, v in s["scope"].items())}
                yield Observation(float(s[key] or 0), labels)
        return callback
