"""ClickHouse exporters on a chDB directory, for the tests that need several or one, and
`finops` extensions reading them."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterline import registry
from meterline.config import ComponentConfig, PipelineFile, convert
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
from meterline.exporters.clickhouse.query import Reader, Window
from meterline.extensions.finops import analytics, budgets, finops
from meterline.extensions.finops.config import FinOpsConfig, link
from meterline.extensions.finops.extension import FinOps
from tests.helpers import make_context

Make = Callable[..., Awaitable[ClickHouseExporter]]


@contextlib.asynccontextmanager
async def clickhouse_exporters(tmp_path: Path, **defaults: Any) -> AsyncIterator[Make]:
    """`make(name, start=True, **config)` builds an exporter on the chDB directory
    `tmp_path/ch` (`defaults` under `config`), its own data directory under
    `tmp_path/name`; all are shut down (chDB released) on leaving."""
    made: list[ClickHouseExporter] = []

    async def make(name: str = "", start: bool = True, **config: Any) -> ClickHouseExporter:
        config = {"endpoint": f"chdb://{tmp_path / 'ch'}", **defaults, **config}
        context = make_context(tmp_path / name, "clickhouse")
        exporter = ClickHouseExporter(convert(config, ClickHouseConfig), context)
        made.append(exporter)
        if start:
            await exporter.start()
        return exporter

    try:
        yield make
    finally:
        for exporter in made:
            await exporter.shutdown()


def finops_of(exporter: ClickHouseExporter, **config: Any) -> FinOps:
    """A `finops` extension (not started) reading `exporter`'s tables, with its context (data
    directory, meter); `config`: the extension's options, budgets for one."""
    spec = ComponentConfig("clickhouse", registry.factory("exporter", "clickhouse"),
                           exporter.config)
    linked = link(convert(config, FinOpsConfig), PipelineFile("pipeline.yaml",
                                                              exporters={"clickhouse": spec}))
    return FinOps(linked, dataclasses.replace(exporter.context, id="finops"))


DIMENSIONS = ["provider", "model", "team", "api_key", "status", "day", "user",
              "metadata.customer"]
RUN_DIMENSIONS = ["agent", "session", "trace", "tool"]  # the trace rollup's


def clickhouse_windows(now: datetime) -> dict[str, Window]:
    """The ranges ending now, and `days`: the last 60 whole days (UTC), which the daily
    rollups answer without raw events."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {**{r: Window.parse(r, now=now) for r in ("24h", "7d", "30d", "90d")},
            "days": Window(midnight - timedelta(days=60), midnight)}


def every_finops_answer(reader: Reader, now: datetime,
                        budgeted: Mapping[str, budgets.Budget] | None = None) -> dict[str, Any]:
    """Every FinOps report and analytics answer over what `reader` reads (latency
    percentiles left out: t-digest estimates depend on the order states are merged in)."""
    w = clickhouse_windows(now)
    out = {f"spend {by} {r}": finops.spend(reader, w[r], by, top=1000)
           for by in DIMENSIONS for r in ("24h", "90d", "days")}
    out |= {f"spend {by} {r}": finops.spend(reader, w[r], by, top=1000)
            for by in RUN_DIMENSIONS for r in ("24h", "90d", "days")}
    out |= {f"agents {r}": analytics.agents(reader, w[r]) for r in ("90d", "days")}
    out |= {"growth": finops.growth(reader, w["30d"], "model", top=1000),
            "growth by user": finops.growth(reader, w["30d"], "user", top=1000),
            "growth by agent": finops.growth(reader, w["30d"], "agent", top=1000),
            "variance": finops.variance(reader, w["90d"], "provider"),
            "models": analytics.models(reader, w["90d"]),
            "timeseries 24h": analytics.timeseries(reader, w["24h"]),
            "timeseries 90d": analytics.timeseries(reader, w["90d"]),
            "providers": analytics.providers(reader, w["90d"]),
            "costs by day": analytics.costs(reader, w["30d"], "day"),
            "usage of u2": analytics.usage_report(reader, w["90d"], user_id="u2"),
            "usage of u2, days": analytics.usage_report(reader, w["days"], user_id="u2"),
            "costs by customer": analytics.costs(reader, w["30d"], "metadata.customer"),
            "users, days": analytics.users(reader, w["days"]),
            "performance": analytics.performance(reader, w["7d"]),
            "users": analytics.users(reader, w["90d"])}
    if budgeted:
        out["budgets"] = budgets.status(reader, budgeted, now=now)
    return _without_percentiles(out)


def _without_percentiles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_percentiles(v) for k, v in value.items()
                if k not in ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms")}
    if isinstance(value, list):
        return [_without_percentiles(v) for v in value]
    return value
