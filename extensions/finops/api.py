"""The `finops` extension's admin API paths: `/api/v1/analytics/*`, `/api/v1/finops/*`,
`/api/v1/budgets`.

Every path takes `range` (24h, 7d, 30d, 90d; default 30d) or `since`/`until`
(ISO 8601), and the parameters of its function (`provider`, `granularity`,
`group_by`, `model_id`, `user_id`, `limit`, `by`, `top`), which are matched by
name. A bad parameter is a 400 naming it; ClickHouse unavailable is a 503.
Answers are JSON: a non-finite number (a table written before events were bounded
may sum to one) is `null`, never `Infinity` or `NaN`, which JSON does not have.
`meterline finops` reads `finops/*` and `budgets` when the daemon runs.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from meterline.component import AdminHandler, RetryableError
from meterline.exporters.clickhouse.connection import classify
from meterline.exporters.clickhouse.query import Window
from meterline.extensions.finops import analytics, finops
from meterline.extensions.finops.billing.reconcile import reconcile

if TYPE_CHECKING:
    from meterline.extensions.finops.extension import FinOps

REPORTS: dict[str, Callable[..., dict[str, Any]]] = {
    "analytics/models": analytics.models,
    "analytics/timeseries": analytics.timeseries,
    "analytics/providers": analytics.providers,
    "analytics/costs": analytics.costs,
    "analytics/usage": analytics.usage_report,
    "analytics/performance": analytics.performance,
    "analytics/users": analytics.users,
    "analytics/agents": analytics.agents,
    "analytics/guardrails": analytics.guardrails,
    "finops/spend": finops.spend,
    "finops/growth": finops.growth,
    "finops/variance": finops.variance,
    # billing (billing/reconcile.py): estimated against the providers' bills
    "finops/reconcile": reconcile,
    "analytics/reconciliation": reconcile,
}
_INTEGERS = {"limit": (1, 10_000), "top": (1, 10_000)}
# What a report gets from the extension, never from the query: the configured guardrails.
_LINKED = ("rules", "gateway")


def routes(extension: FinOps) -> dict[str, AdminHandler]:
    out: dict[str, AdminHandler] = {path: _report(extension, fn) for path, fn in REPORTS.items()}

    async def budgets(_: web.Request) -> web.StreamResponse:
        return await _answer(extension.budget_status)

    out["budgets"] = budgets
    return out


def _report(extension: FinOps, fn: Callable[..., dict[str, Any]]) -> AdminHandler:
    parameters = inspect.signature(fn).parameters
    accepted = [name for name in parameters
                if name not in ("reader", "window", "filters", *_LINKED)]
    linked = {"rules": extension.config.guardrails, "gateway": extension.config.gateway}
    linked = {k: v for k, v in linked.items() if k in parameters}

    async def handler(request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            window = Window.parse(query.get("range"), query.get("since"), query.get("until"))
            kwargs = {name: _value(name, query[name]) for name in accepted if query.get(name)}
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)

        async def run() -> dict[str, Any]:
            reader = await extension.connect()
            return await asyncio.to_thread(fn, reader, window, **kwargs, **linked)

        return await _answer(run)

    return handler


def _value(name: str, text: str) -> Any:
    if name not in _INTEGERS:
        return text
    low, high = _INTEGERS[name]
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {text!r}")
    return int(text)


async def _answer(compute: Callable[[], Any]) -> web.StreamResponse:
    try:
        body = await compute()
    except ValueError as e:  # a parameter the report cannot take (e.g. growth by day)
        return web.json_response({"error": str(e)}, status=400)
    except Exception as e:
        error = classify(e)
        status = 503 if isinstance(error, RetryableError) else 500
        return web.json_response({"error": str(error)}, status=status)
    return web.json_response(body, dumps=_dumps)


def _dumps(body: Any) -> str:
    """JSON, with non-finite floats as null (json.dumps writes `Infinity`, not JSON)."""
    return msgspec.json.encode(body).decode()
