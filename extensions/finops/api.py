"""The `finops` extension's admin API paths: `/api/v1/analytics/*`, `/api/v1/finops/*`,
`/api/v1/budgets`, and `POST /api/v1/billing/import`.

Every path takes `range` (24h, 7d, 30d, 90d; default 30d) or `since`/`until`
(ISO 8601; not both `range` and `since`), and the parameters of its function
(`provider`, `granularity`, `group_by`, `model_id`, `user_id`, `limit`, `by`, `top`),
which are matched by name. A bad parameter is a 400 naming it; ClickHouse unavailable is a 503.
Answers are JSON: a non-finite number (a table written before events were bounded
may sum to one) is `null`, never `Infinity` or `NaN`, which JSON does not have.
`meterline finops` reads `finops/*` and `budgets` when the daemon runs.

`POST /api/v1/billing/import` stores billing lines (`{"lines": [...]}`, each with the
fields of `billing.lines.BillingLine`, `day` as `YYYY-MM-DD`) through the extension's
own client, which for `chdb://` is the daemon's embedded engine: what `meterline billing
import` sends while the daemon holds the data directory. At most `MAX_IMPORT_LINES`
lines and `MAX_IMPORT_BYTES` of body a request (413 past them, as sent or decoded: the body
may be gzip, deflate or zstd encoded, read with `httpserver.read_body`); a body that is not
such lines is a 400 naming the line and field; nothing of a refused request is stored. It
answers `{"received": N, "stored": M}`, M the lines of the table in all.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from meterline.component import AdminHandler, RetryableError
from meterline.exporters.clickhouse.connection import classify
from meterline.exporters.clickhouse.query import Window, dimension
from meterline.extensions.finops import analytics, finops
from meterline.extensions.finops.billing import store
from meterline.extensions.finops.billing.formats import FORMATS
from meterline.extensions.finops.billing.lines import BillingLine
from meterline.extensions.finops.billing.reconcile import reconcile
from meterline.httpserver import BodyRefused, read_body
from meterline.params import whole_number

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
_DIMENSIONS = ("by", "group_by")  # parameters naming a dimension (`query.dimension`)
# What a report gets from the extension, never from the query: the configured guardrails.
_LINKED = ("rules", "gateway")


def routes(extension: FinOps) -> dict[str, AdminHandler]:
    out: dict[str, AdminHandler] = {path: _report(extension, fn) for path, fn in REPORTS.items()}

    async def budgets(_: web.Request) -> web.StreamResponse:
        return await _answer(extension.budget_status)

    out["budgets"] = budgets
    out["POST billing/import"] = lambda request: billing_import(extension, request)
    return out


# --- billing import ---------------------------------------------------------------------
MAX_IMPORT_LINES = 10_000  # lines a request (`meterline billing import` sends batches)
MAX_IMPORT_BYTES = 16 << 20  # body bytes a request (as sent, and once decoded)
_BODY_TIMEOUT = 60.0  # seconds for the body to arrive
_CURRENCY = re.compile(r"[A-Z]{3}")


class _Line(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    line_id: str
    day: date
    provider: str
    model: str = ""
    amount: float
    currency: str
    amount_usd: float | None = None
    format: str
    source: str = ""
    description: str = ""
    account: str = ""
    region: str = ""


class _Import(msgspec.Struct, forbid_unknown_fields=True):
    lines: list[_Line]


def parse_import(body: bytes) -> list[BillingLine]:
    """The billing lines of an import request's body; `ValueError` naming the line and
    field when it is not such lines."""
    try:
        lines = msgspec.json.decode(body, type=_Import).lines
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid billing lines: {e}") from None
    except msgspec.DecodeError as e:
        raise ValueError(f"the body is not JSON: {e}") from None
    if len(lines) > MAX_IMPORT_LINES:
        raise ValueError(f"{len(lines)} lines in one request: at most {MAX_IMPORT_LINES}")
    for i, line in enumerate(lines):
        for name in ("line_id", "provider"):
            if not getattr(line, name).strip():
                raise ValueError(f"lines[{i}].{name}: must not be empty")
        for name in ("amount", "amount_usd"):
            value = getattr(line, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"lines[{i}].{name}: expected a finite number, got {value}")
        if not _CURRENCY.fullmatch(line.currency):
            raise ValueError(f"lines[{i}].currency: expected an upper case ISO 4217 code "
                             f"such as USD, got {line.currency!r}")
        if line.format not in FORMATS:
            raise ValueError(f"lines[{i}].format: expected one of {', '.join(FORMATS)}, "
                             f"got {line.format!r}")
    return [BillingLine(**msgspec.structs.asdict(line)) for line in lines]


async def billing_import(extension: FinOps, request: web.Request) -> web.StreamResponse:
    try:  # (decoded per its Content-Encoding, within the bound: `read_body`)
        body = await read_body(request, MAX_IMPORT_BYTES, "the import's bound", _BODY_TIMEOUT,
                               "the import's time limit")
    except BodyRefused as e:
        hint = f": send at most {MAX_IMPORT_LINES:,} lines a request" if e.status == 413 else ""
        return web.json_response({"error": e.message + hint}, status=e.status)
    try:
        lines = parse_import(body)
    except ValueError as e:
        return web.json_response({"error": str(e)}, status=400)

    async def run() -> dict[str, Any]:
        reader = await extension.connect()

        def insert() -> int:
            store.insert(reader.client, reader.schema, lines)
            return store.count(reader.client, reader.schema)

        stored = await asyncio.to_thread(insert)
        extension.log.info("billing lines imported", lines=len(lines), stored=stored)
        return {"received": len(lines), "stored": stored}

    return await _answer(run)


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
    """A parameter's value for the report; ValueError naming it when it is not one (a
    dimension is checked here, not by the report, whose message names no parameter)."""
    if name in _INTEGERS:
        return whole_number(name, text, *_INTEGERS[name])
    if name in _DIMENSIONS:
        try:
            dimension(text)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return text


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
