"""The billing lines' table, beside the exporter's: `llm_billing_lines` (with `table:
my_events`, `my_events_billing_lines`), in the exporter's database.

A `ReplacingMergeTree` ordered by (day, provider, line id) with the import time as
version: a line imported again (the same file twice, a newer export of the same days, the
cost API pulled again) replaces the one stored, and queries read it `FINAL`. A file's
lines go in as one insert, after the whole file was read. Created by the first import or
pull (the `finops` extension reads the exporter's tables but creates only this one); on a
cluster it is a replicated table on every node (it is small), not sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, Schema
from meterline.extensions.finops.billing.lines import BillingLine

COLUMNS = (
    ("line_id", "String"),
    ("day", "Date"),
    ("provider", "LowCardinality(String)"),
    ("model", "LowCardinality(String)"),
    ("amount", "Float64"),
    ("currency", "LowCardinality(String)"),
    ("amount_usd", "Nullable(Float64)"),
    ("format", "LowCardinality(String)"),
    ("source", "String"),
    ("description", "String"),
    ("account", "String"),
    ("region", "LowCardinality(String)"),
    ("imported_at", "DateTime64(3, 'UTC')"),
)


def table_name(schema: Schema) -> str:
    base = "llm" if schema.events == "llm_events" else schema.events
    return f"{base}_billing_lines"


def qualified(schema: Schema) -> str:
    return schema.qualified(table_name(schema))


def create_table(schema: Schema) -> str:
    columns = ",\n  ".join(f"`{name}` {type_}" for name, type_ in COLUMNS)
    engine = ("ReplicatedReplacingMergeTree(imported_at)" if schema.cluster
              else "ReplacingMergeTree(imported_at)")
    return (f"CREATE TABLE IF NOT EXISTS {qualified(schema)}{schema.on_cluster} (\n"
            f"  {columns}\n)\nENGINE = {engine}\nPARTITION BY toYYYYMM(day)\n"
            "ORDER BY (day, provider, line_id)")


def ensure_table(client: Any, schema: Schema) -> None:
    client.command(schema.create_database())
    client.command(create_table(schema))


def exists(client: Any, schema: Schema) -> bool:
    rows = client.query("SELECT count() FROM system.tables WHERE database = {db:String} AND "
                        "name = {t:String}",
                        parameters={"db": schema.database, "t": table_name(schema)}).result_rows
    return bool(rows[0][0])


def insert(client: Any, schema: Schema, lines: Sequence[BillingLine],
           now: datetime | None = None) -> int:
    """Store the lines (one insert: all of them or, on an error, none of the insert's
    block); the table is created first when missing. Returns how many were given."""
    if not lines:
        return 0
    ensure_table(client, schema)
    at = now or datetime.now(UTC)
    rows = [[line.line_id, line.day, line.provider, line.model, line.amount, line.currency,
             line.amount_usd, line.format, line.source, line.description, line.account,
             line.region, at] for line in lines]
    client.insert(table_name(schema), rows, database=schema.database,
                  column_names=[name for name, _ in COLUMNS])
    return len(lines)


def cells(client: Any, schema: Schema, since: date, until: date) -> list[dict[str, Any]]:
    """The lines of the days [since, until) summed by provider, model and day: the USD
    amount, how many lines, and the amounts not in USD by currency."""
    if not exists(client, schema):
        return []
    settings = ", ".join(f"{k} = {v}" for k, v in FINAL_SETTINGS.items())
    sql = (f"SELECT provider, model, toString(day) AS d, sum(ifNull(amount_usd, 0)) AS usd, "
           f"count() AS lines, sumMapIf([currency], [amount], amount_usd IS NULL) AS other "
           f"FROM {qualified(schema)} FINAL WHERE day >= toDate('{since.isoformat()}') AND "
           f"day < toDate('{until.isoformat()}') GROUP BY provider, model, d "
           f"SETTINGS {settings}")
    return [{"provider": p, "model": m, "day": d, "billed_usd": usd, "lines": n,
             "other": {c: a for c, a in zip(*other, strict=True) if a}}
            for p, m, d, usd, n, other in client.query(sql).result_rows]


def count(client: Any, schema: Schema) -> int:
    """Lines stored (deduplicated)."""
    if not exists(client, schema):
        return 0
    return int(client.query(f"SELECT count() FROM {qualified(schema)} FINAL").result_rows[0][0])
