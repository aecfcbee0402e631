"""`meterline billing import FILE`: a provider's export into the billing lines' table.

The file is read whole (its format detected, or `--format`), and refused with the line or
row and what was expected when malformed; only then are its lines stored, in one insert,
in the ClickHouse of the `finops` extension in pipeline.yaml. Importing a file again
stores each line once. chDB allows one process per data directory: stop the daemon to
import into an embedded ClickHouse (a ClickHouse server takes imports at any time).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from meterline.cli import add_config_argument, config_path, load_config
from meterline.exporters.clickhouse.connection import chdb_path, endpoint_of, open_client
from meterline.exporters.clickhouse.schema import Schema
from meterline.extensions.finops.billing import store
from meterline.extensions.finops.billing.formats import FORMATS, read_file
from meterline.extensions.finops.billing.lines import BillingError, BillingLine
from meterline.extensions.finops.cli import FinOpsError, _data_dir, _extension


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
        endpoint = endpoint_of(config.exporter, _data_dir(loaded))
        try:
            client = open_client(config.exporter, _data_dir(loaded))
        except Exception as e:
            busy = " (is the daemon running? stop it to import)" if chdb_path(endpoint) else ""
            raise FinOpsError(f"cannot open ClickHouse at {endpoint}{busy}: {e}") from None
        try:
            schema = Schema.of(config.exporter)
            store.insert(client, schema, lines)
            stored = store.count(client, schema)
        except Exception as e:
            raise FinOpsError(f"storing the lines failed at {endpoint}: "
                              f"{str(e).splitlines()[0]}") from None
        finally:
            client.close()
    except FinOpsError as e:
        print(f"meterline billing import: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(summary(args.file, fmt, lines, stored))
    return 0


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
