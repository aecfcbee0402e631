"""`meterline billing import FILE`: a provider's export into the billing lines' table.

The file is read whole (its format detected, or `--format`), and refused with the line or
row and what was expected when malformed; only then are its lines stored, in one insert,
in the ClickHouse of the `finops` extension in pipeline.yaml. Importing a file again
stores each line once. chDB allows one process per data directory and the running daemon
holds it, so when the daemon answers on its admin address the lines are sent to its
admin API (`POST /api/v1/billing/import`), which stores them through the daemon's own
engine; otherwise the command opens ClickHouse itself. A ClickHouse server is always
written directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from meterline.cli import add_config_argument, admin_address, config_path, load_config
from meterline.config import PipelineFile
from meterline.exporters.clickhouse.connection import chdb_path, endpoint_of, open_client
from meterline.exporters.clickhouse.schema import Schema, ensure_schema
from meterline.extensions.finops.billing import store
from meterline.extensions.finops.billing.formats import FORMATS, read_file
from meterline.extensions.finops.billing.lines import BillingError, BillingLine
from meterline.extensions.finops.cli import FinOpsError, _data_dir, _extension
from meterline.extensions.finops.config import LinkedConfig

# Lines a request to the daemon (its admin API takes at most 10,000 and 16 MB a request).
BATCH_LINES = 5_000


def add(subparsers: Any) -> None:
    p = subparsers.add_parser("billing", help="import the providers' bills (for "
                              "meterline finops reconcile)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="billing_command", required=True)
    imp = commands.add_parser("import", help="import a billing export or cost API page file")
    imp.add_argument("file", type=Path)
    imp.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                     help="the export's format (default: detected)")
    imp.add_argument("--dry-run", action="store_true",
                     help="read and check the file, print its lines as JSON, store nothing")
    add_config_argument(imp)
    imp.add_argument("--extension", help="which finops extension (when there are several)")
    imp.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    try:
        fmt, lines = read_file(args.file, args.format)
    except BillingError as e:
        print(f"meterline billing import: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        for line in lines:
            print(json.dumps(asdict(line), default=str))
        return 0
    loaded = load_config(config_path(args.config))
    if loaded is None:
        return 1
    try:
        config = _extension(loaded, args.extension)
        stored = _to_daemon(loaded, config, lines)
        if stored is None:
            stored = _to_clickhouse(loaded, config, lines)
    except FinOpsError as e:
        print(f"meterline billing import: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(summary(args.file, fmt, lines, stored))
    return 0


def _to_clickhouse(loaded: PipelineFile, config: LinkedConfig, lines: list[BillingLine]) -> int:
    """Store the lines in ClickHouse, opened by this process; the lines stored in all."""
    endpoint = endpoint_of(config.exporter, _data_dir(loaded))
    try:
        client = open_client(config.exporter, _data_dir(loaded))
    except Exception as e:
        busy = (" (a daemon is using it: is its admin server off? stop the daemon or turn "
                "its admin server on to import)" if chdb_path(endpoint) else "")
        raise FinOpsError(f"cannot open ClickHouse at {endpoint}{busy}: {e}") from None
    try:
        schema = Schema.of(config.exporter)
        if config.exporter.create_schema:  # as the exporter would: answers read them all
            ensure_schema(client, schema)
        store.insert(client, schema, lines)
        return store.count(client, schema)
    except Exception as e:
        raise FinOpsError(f"storing the lines failed at {endpoint}: "
                          f"{str(e).splitlines()[0]}") from None
    finally:
        client.close()


def _to_daemon(loaded: PipelineFile, config: LinkedConfig, lines: list[BillingLine]) -> int | None:
    """Send the lines to the running daemon's admin API, in batches of `BATCH_LINES`; the
    lines stored in all, or None when no daemon answers (or ClickHouse is a server)."""
    address = admin_address(loaded)
    if address is None or chdb_path(endpoint_of(config.exporter, _data_dir(loaded))) is None:
        return None
    base, token = address
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout = max(float(config.exporter.query_timeout), 60.0)
    stored = 0
    for start in range(0, max(len(lines), 1), BATCH_LINES):
        body = msgspec.json.encode({"lines": lines[start:start + BATCH_LINES]})
        request = urllib.request.Request(f"{base}/api/v1/billing/import", data=body,
                                         headers=headers, method="POST")
        sent = (f" ({start} of {len(lines)} lines were stored before: import the file "
                "again, a line stored twice is kept once)" if start else "")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                stored = int(json.load(response)["stored"])
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("error", detail)
            hint = (" (does the running daemon have the finops extension, and this version? "
                    "reload or restart it)" if e.code in (404, 405) else "")
            raise FinOpsError(f"the daemon at {base} answered {e.code}: {detail}{hint}"
                              f"{sent}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError) and not start:
                return None  # nobody listening: the daemon is not running
            raise FinOpsError(f"the daemon at {base} did not answer: {e.reason}{sent}") from None
    return stored


def summary(path: Path, fmt: str, lines: list[BillingLine], stored: int | None = None) -> str:
    out = f"{path}: {fmt}, {len(lines)} billing lines"
    if lines:
        out += f", {min(x.day for x in lines)} to {max(x.day for x in lines)}"
    out += f"{f' ({stored} stored in all)' if stored is not None else ''}\n"
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for line in lines:
        t = totals[(line.provider, line.model or "-", line.currency)]
        t[0] += 1
        t[1] += line.amount
    rows = [("provider", "model", "lines", "amount", "currency")]
    rows += [(p, m, str(int(n)), f"{a:.6g}", c) for (p, m, c), (n, a) in sorted(totals.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return out + "".join("  " + "  ".join(cell.rjust(w) if i in (2, 3) else cell.ljust(w)
                                          for i, (cell, w) in enumerate(zip(r, widths,
                                                                            strict=True)))
                         .rstrip() + "\n" for r in rows)
