"""`meterline finops`: spend, growth, estimated against actual cost, and budgets.

It reads the ClickHouse of the `finops` extension in pipeline.yaml (that of the
`clickhouse` exporter it names), with its budgets. chDB
allows one process per data directory and the daemon holds it, so when the
daemon answers on its admin address the command asks the daemon's admin API
(`/api/v1/finops/*`, `/api/v1/budgets`); otherwise it opens ClickHouse itself.
A ClickHouse server is always queried directly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterline.cli import add_config_argument, admin_address, config_path, load_config
from meterline.config import PipelineFile
from meterline.exporters.clickhouse.connection import chdb_path, endpoint_of, open_client
from meterline.exporters.clickhouse.query import DIMENSION_NAMES, RANGES, Reader, Window
from meterline.exporters.clickhouse.schema import Schema, missing_tables
from meterline.extensions.finops import budgets, finops
from meterline.extensions.finops.billing.reconcile import reconcile
from meterline.extensions.finops.config import LinkedConfig

REPORTS: dict[str, Callable[..., dict[str, Any]]] = {
    "spend": finops.spend, "growth": finops.growth, "variance": finops.variance,
    "reconcile": reconcile}  # billing/: estimated against the providers' bills

# What the table shows of each report (JSON and CSV have every figure); `_WHEN_ANY` too
# where some row has them.
_TABLE = {
    "spend": ["requests", "errors", "total_tokens", "cost_usd", "cost_per_request_usd",
              "cost_per_1k_tokens_usd", "share"],
    "growth": ["cost_usd", "previous_cost_usd", "change_usd", "growth", "requests"],
    "variance": ["requests_with_actual", "requests_without_estimate", "estimated_cost_usd",
                 "actual_cost_usd", "variance_usd", "variance_ratio"],
    "runs": ["runs", "cost_usd", "cost_per_run_usd", "llm_calls", "total_tokens", "tool_calls",
             "avg_tool_latency_ms", "avg_run_duration_ms", "errors", "share"],
    "tools": ["calls", "errors", "avg_latency_ms", "p95_latency_ms", "request_bytes",
              "response_bytes", "runs"],
    "reconcile": ["estimated_cost_usd", "billed_cost_usd", "variance_usd", "variance_ratio",
                  "unexplained_usd", "billing_lines"],
    "budgets": ["member", "period", "limit_usd", "spend_usd", "remaining_usd", "utilization",
                "threshold_reached", "status"],
}
# Calls without a price (their cost counts 0 in cost_usd: a model the price table lacks
# would read as free), and cache hits with what they saved.
_WHEN_ANY = (["unpriced_requests"], ["unpriced_llm_calls"], ["cache_hits", "saved_cost_usd"])
# The CSV columns after the keys of a report without rows and without a total (a header
# alone is still the header its rows would have): those of `finops.growth`'s rows and of
# `budgets.status`'s.
_NO_TOTAL = {
    "growth": ["cost_usd", "previous_cost_usd", "change_usd", "growth", "requests",
               "previous_requests"],
    "budgets": ["per", "member", "period", "rolling", "period_start", "period_end",
                "limit_usd", "spend_usd", "remaining_usd", "utilization", "notify_at",
                "threshold_reached", "action", "status"],
}


def add(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finops", help="spend, growth, estimated vs actual cost, estimated vs billed "
        "(reconcile) and budgets, from ClickHouse",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", default="spend", choices=[*REPORTS, "budgets"])
    add_config_argument(p)
    p.add_argument("--by", help=f"group by: {', '.join(DIMENSION_NAMES)} "
                                "(default: provider; model for growth; spend by agent, "
                                "session or trace is the cost of agent runs, by tool the "
                                "tool calls)")
    p.add_argument("--range", choices=RANGES, help="the last 24h, 7d, 30d or 90d (default 30d)")
    p.add_argument("--since", help="start, ISO 8601 (instead of --range)")
    p.add_argument("--until", help="end, ISO 8601 (default: now)")
    p.add_argument("--top", type=int, default=20, help="at most this many rows (default 20)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--extension", help="which finops extension (when there are several)")
    p.set_defaults(func=run)


class FinOpsError(Exception):
    """Something the user must fix; printed as is."""


def run(args: argparse.Namespace) -> int:
    loaded = load_config(config_path(args.config))
    if loaded is None:
        return 1
    try:
        if args.top < 1:
            raise FinOpsError("--top must be at least 1")
        config = _extension(loaded, args.extension)
        answer = _from_daemon(loaded, args, config)
        if answer is None:
            answer = _from_clickhouse(loaded, args, config)
    except (FinOpsError, ValueError) as e:
        print(f"meterline finops: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render(answer, args.report, args.format))
    return 0


def _extension(loaded: PipelineFile, wanted: str | None) -> LinkedConfig:
    found = {cid: spec.config for cid, spec in loaded.extensions.items()
             if isinstance(spec.config, LinkedConfig)}
    if wanted:
        if wanted not in found:
            raise FinOpsError(f"{loaded.file} has no finops extension {wanted!r} "
                              f"(it has: {', '.join(found) or 'none'})")
        return found[wanted]
    if not found:
        raise FinOpsError(f"{loaded.file} has no finops extension: add one that reads your "
                          "clickhouse exporter (extensions: {finops: {clickhouse: <its id>}})")
    if len(found) > 1:
        raise FinOpsError(f"{loaded.file} has {len(found)} finops extensions "
                          f"({', '.join(found)}): choose one with --extension")
    return next(iter(found.values()))


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params = {"range": args.range, "since": args.since, "until": args.until}
    if args.report != "budgets":
        params |= {"by": args.by, "top": args.top}
    return {k: v for k, v in params.items() if v is not None}


def _from_daemon(loaded: PipelineFile, args: argparse.Namespace,
                 config: LinkedConfig) -> dict[str, Any] | list[Any] | None:
    """The daemon's answer, or None when no daemon answers (or ClickHouse is a server)."""
    address = admin_address(loaded)
    if address is None or chdb_path(endpoint_of(config.exporter, _data_dir(loaded))) is None:
        return None
    base, token = address
    path = "budgets" if args.report == "budgets" else f"finops/{args.report}"
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(_params(args))}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        timeout = float(config.exporter.query_timeout)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError):
            detail = json.loads(detail).get("error", detail)
        hint = (" (does the running daemon have the finops extension? reload it)"
                if e.code == 404 else "")
        raise FinOpsError(f"the daemon at {base} answered {e.code}: {detail}{hint}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return None  # nobody listening: the daemon is not running
        raise FinOpsError(f"the daemon at {base} did not answer: {e.reason}") from None


def _from_clickhouse(loaded: PipelineFile, args: argparse.Namespace,
                     config: LinkedConfig) -> dict[str, Any] | list[Any]:
    endpoint = endpoint_of(config.exporter, _data_dir(loaded))
    path = chdb_path(endpoint)
    if path is not None and not path.exists():
        raise FinOpsError(f"no ClickHouse data at {path}: has the daemon stored anything yet?")
    try:
        client = open_client(config.exporter, _data_dir(loaded))
    except Exception as e:
        busy = " (a daemon is using it: is its admin server off?)" if path else ""
        raise FinOpsError(f"cannot open ClickHouse at {endpoint}{busy}: {e}") from None
    try:
        schema = Schema.of(config.exporter)
        if missing := missing_tables(client, schema):
            raise FinOpsError(f"ClickHouse at {endpoint} has no {missing[0]} table: has the "
                              "daemon stored anything yet?")
        reader = Reader(client, schema, seals=finops.sealed_runs(schema))
        window = Window.parse(args.range, args.since, args.until)
        if args.report == "budgets":
            return budgets.status(reader, config.budgets)
        kwargs: dict[str, Any] = {"top": args.top} | ({"by": args.by} if args.by else {})
        return REPORTS[args.report](reader, window, **kwargs)
    except (ValueError, FinOpsError):
        raise
    except Exception as e:
        raise FinOpsError(f"query failed at {endpoint}: {str(e).splitlines()[0]}") from None
    finally:
        client.close()


def _data_dir(loaded: PipelineFile) -> Path:
    return Path(loaded.service.data_dir)


# --- output ---------------------------------------------------------------------------
def render(answer: dict[str, Any] | list[Any], report: str, fmt: str) -> str:
    answer = _finite(answer)
    if isinstance(answer, dict):  # spend by agent, session, trace or tool: runs, tools
        report = answer.get("report", report)
    if fmt == "json":
        return json.dumps(answer, indent=2) + "\n"
    rows, total, keys = _rows(answer, report)
    if fmt == "csv":
        out = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row)) or _header(
            report, keys, total)
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
        return out.getvalue()
    figures = _TABLE[report]
    for shown in _WHEN_ANY:
        if any(r.get(c) for r in [*rows, total or {}] for c in shown):
            figures = [*figures, *shown]
    columns = keys + figures
    lines = [[*columns]]
    lines += [[_cell(row.get(c)) for c in columns] for row in rows]
    if total:
        lines.append(["TOTAL", *([""] * (len(keys) - 1)), *(_cell(total.get(c))
                                                               for c in figures)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    title = (f"{report} by {answer['by']}, {answer['since']} to {answer['until']}\n"
             if isinstance(answer, dict) else "")
    body = "\n".join("  ".join(cell.ljust(w) if i < len(keys) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                     for line in lines)
    return f"{title}{body}\n{_not_billed(answer)}"


def _header(report: str, keys: list[str], total: dict[str, Any] | None) -> list[str]:
    """The CSV columns of a report without rows: its rows' keys, their total's figures
    (with each group's `share` of the spend) or, without a total, `_NO_TOTAL`."""
    if total is None:
        return [*keys, *_NO_TOTAL[report]]
    return [*keys, *total, *(["share"] if report in ("spend", "runs") else [])]


def _not_billed(answer: dict[str, Any] | list[Any]) -> str:
    """Under a reconciliation's table: the estimate of the providers no bill covers (left
    out of its rows, which would read as estimated 0)."""
    estimates = answer.get("not_billed") if isinstance(answer, dict) else None
    if not estimates:
        return ""
    listed = ", ".join(f"{e['provider'] or '-'} {_cell(e['estimated_cost_usd'])}"
                       for e in estimates)
    return f"not billed (no bill in the window), estimated_cost_usd: {listed}\n"


def _rows(answer: dict[str, Any] | list[Any],
          report: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[str]]:
    if report == "budgets":
        assert isinstance(answer, list)
        rows = [{**s, "scope": ",".join(f"{k}={v}" for k, v in s["scope"].items()) or "all"}
                for s in answer]
        return rows, None, ["budget", "scope"]
    assert isinstance(answer, dict)
    keys = [answer["by"], *(["api_key_name"] if answer["by"] == "api_key" else [])]
    if report == "reconcile" and answer["by"] == "model":
        keys = ["provider", "model"]
    return answer["rows"], answer.get("total"), keys


def _cell(value: Any) -> str:
    """A value as the table and CSV write it: JSON's spelling (`true`, not Python's `True`)
    for what is not a number or text; `-` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool | list | dict):
        return json.dumps(value)
    return str(value)


def _csv_cell(value: Any) -> str:
    """`_cell`, but text a spreadsheet would run as a formula (it starts with = + - @, a
    tab or a return: labels come from traffic, `=HYPERLINK(...)` as a user id) is written
    as text, with a leading `'`, as the dashboard's CSV download does."""
    if isinstance(value, str) and value[:1] in _FORMULA_STARTS:
        return f"'{value}"
    return _cell(value)


_FORMULA_STARTS = frozenset("=+-@\t\r")


def _finite(value: Any) -> Any:
    """Non-finite numbers (sums over a table written before events were bounded) as
    None: shown `-`, or `null` in JSON, never `inf`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
