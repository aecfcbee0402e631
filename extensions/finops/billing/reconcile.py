"""Estimated against billed: `meterline finops reconcile`, `/api/v1/finops/reconcile` (and
`/api/v1/analytics/reconciliation`), and the `meterline_billing_*` gauges.

Both sides are summed per provider, model and UTC day (the grain of a bill) over the
window's whole days: the estimate is the events' `cost_usd` (from the rollups), the billed
amount the billing lines' USD amounts. Models are matched in their base form
(`lines.model_key`: `gpt-4o-2024-08-06` is `gpt-4o`) on both sides. Only providers with
billing lines in the window are reconciled (the others, whose bill was not imported, are
listed apart in `not_billed`), and a line in another currency without a USD amount is
counted apart (`billed_other_currencies`), never converted by a guess.

Spend no event explains (`unexplained_usd`): the billed amount of a provider, model and
day without any event (a line naming no model: a provider and day without events).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.metrics import Observation

from meterline.exporters.clickhouse.query import Reader, Window, dimension
from meterline.extensions.finops.billing import store
from meterline.extensions.finops.billing.lines import model_key
from meterline.extensions.finops.finops import number, ratio
from meterline.extensions.finops.gauges import PublishedGauges

BY = ("provider", "model", "day")
_DAY = timedelta(days=1)
Cell = tuple[str, str, str]  # provider, model (base form, '' for none), day


def whole_days(window: Window) -> Window:
    """The window widened to whole UTC days (a bill's grain)."""
    since = window.since.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    until = window.until.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return Window(since, until if until == window.until else until + _DAY)


def reconcile(reader: Reader, window: Window, by: str = "provider", top: int | None = None,
              provider: str | None = None) -> dict[str, Any]:
    """Per `by` (provider, model or day): the estimated and the billed cost, the variance
    (billed - estimated, and over the estimate) and the billed spend no event explains."""
    return _reconcile(reader, window, by, top, provider)


def _reconcile(reader: Reader, window: Window, by: str, top: int | None = None,
               provider: str | None = None, billed_days_only: bool = False) -> dict[str, Any]:
    """`reconcile`; `billed_days_only`: only the days a provider has billing lines for (a
    bill arriving late is no variance: the gauges)."""
    if by not in BY:
        raise ValueError(f"reconcile is by {', '.join(BY)}, got {by!r}")
    days = whole_days(window)
    estimated = reader.select(days, by=[dimension("provider"), dimension("model"),
                                        dimension("day")], figures=("requests", "cost_usd"))
    billed = store.cells(reader.client, reader.schema, days.since.date(), days.until.date())
    cells: dict[Cell, dict[str, Any]] = defaultdict(lambda: {
        "estimated": 0.0, "requests": 0.0, "billed": 0.0, "lines": 0, "other": {}})
    for r in estimated:
        cell = cells[(r["provider"], model_key(r["model"]), r["day"])]
        cell["estimated"] += r["cost_usd"]
        cell["requests"] += r["requests"]
    for b in billed:
        cell = cells[(b["provider"], b["model"], b["day"])]
        cell["billed"] += b["billed_usd"]
        cell["lines"] += b["lines"]
        for currency, amount in b["other"].items():
            cell["other"][currency] = cell["other"].get(currency, 0) + amount
    called = {(p, d) for (p, _, d), c in cells.items() if c["requests"] > 0}
    billed_days = {(p, d) for (p, _, d), c in cells.items() if c["lines"]}
    covered = {p for p, _ in billed_days}
    not_billed: dict[str, float] = defaultdict(float)
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for (p, m, d), c in cells.items():
        if provider not in (None, "", "all") and p != provider:
            continue
        if p not in covered:
            not_billed[p] += c["estimated"]
            continue
        if billed_days_only and (p, d) not in billed_days:
            continue
        key = {"provider": (p,), "model": (p, m), "day": (d,)}[by]
        g = groups.setdefault(key, {"estimated": 0.0, "billed": 0.0, "unexplained": 0.0,
                                    "lines": 0, "requests": 0.0, "other": {}})
        explained = c["requests"] > 0 if m else (p, d) in called
        g["estimated"] += c["estimated"]
        g["billed"] += c["billed"]
        g["unexplained"] += 0 if explained else c["billed"]
        g["lines"] += c["lines"]
        g["requests"] += c["requests"]
        for currency, amount in c["other"].items():
            g["other"][currency] = g["other"].get(currency, 0) + amount
    names = {"provider": ("provider",), "model": ("provider", "model"), "day": ("day",)}[by]
    rows = [{**dict(zip(names, (k or None for k in key), strict=True)), **_figures(g)}
            for key, g in groups.items()]
    if by == "day":
        rows.sort(key=lambda r: r["day"])
    else:
        rows.sort(key=lambda r: (-abs(r["variance_usd"]), *(r[n] or "" for n in names)))
    total = _figures(_sum(groups.values()))
    return {"report": "reconcile", "by": by, **days.describe(),
            "provider": provider or "all", "rows": rows[:top] if top else rows,
            "total": total,
            "not_billed": [{"provider": p or None, "estimated_cost_usd": number(v)}
                           for p, v in sorted(not_billed.items(), key=lambda kv: -kv[1])]}


def _sum(groups: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"estimated": 0.0, "billed": 0.0, "unexplained": 0.0, "lines": 0,
                           "requests": 0.0, "other": {}}
    for g in groups:
        for k in ("estimated", "billed", "unexplained", "lines", "requests"):
            out[k] += g[k]
        for currency, amount in g["other"].items():
            out["other"][currency] = out["other"].get(currency, 0) + amount
    return out


def _figures(g: dict[str, Any]) -> dict[str, Any]:
    variance = g["billed"] - g["estimated"]
    return {"estimated_cost_usd": number(g["estimated"]), "billed_cost_usd": number(g["billed"]),
            "variance_usd": number(variance), "variance_ratio": ratio(variance, g["estimated"], 4),
            "unexplained_usd": number(g["unexplained"]), "requests": number(g["requests"]),
            "billing_lines": g["lines"],
            "billed_other_currencies": {c: number(a) for c, a in sorted(g["other"].items())}}


def variance_by_provider(reader: Reader, days: int,
                         now: datetime | None = None) -> list[dict[str, Any]]:
    """The gauges' figures: per provider, the last `days` whole days before today, only
    the days its bill has lines for."""
    today = (now or datetime.now(UTC)).astimezone(UTC).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
    window = Window(today - days * _DAY, today)
    return _reconcile(reader, window, "provider", billed_days_only=True)["rows"]


class VarianceGauges(PublishedGauges):
    """`meterline_billing_variance_ratio`, `_billed_usd`, `_estimated_usd` and
    `_unexplained_usd`, labelled `provider`, from the reconciliation rows."""

    GAUGES = (
        ("meterline_billing_variance_ratio", "variance_ratio",
         "(billed - estimated) / estimated cost over the billed days of the variance window"),
        ("meterline_billing_billed_usd", "billed_cost_usd",
         "Billed cost (USD) over the billed days of the variance window"),
        ("meterline_billing_estimated_usd", "estimated_cost_usd",
         "Estimated cost of the events (USD) over the billed days of the variance window"),
        ("meterline_billing_unexplained_usd", "unexplained_usd",
         "Billed cost (USD) of provider/model/days without events, in the variance window"),
    )

    def observe(self, row: dict[str, Any], key: str) -> Observation | None:
        if row[key] is None:  # no estimate: no ratio
            return None
        return Observation(float(row[key]), {"provider": row["provider"] or ""})
