"""ClickHouse exporter: insert rate, and the latency of the main FinOps queries.

Inserts `--events` events (default 10 million) spread over the last 90 days
through the `clickhouse` exporter's own path (events -> "already stored?" check
-> column batch -> deduplicated insert, with the rollup view), in time order as
a live stream would arrive, then times the FinOps reports and analytics answers
over them (each run `--repeat` times; median and best), and one rollup repair
pass (and a rebuild of every hour it looks back over, its worst case). Runs on
embedded chDB unless `--endpoint` names a server.

    python bench/clickhouse_bench.py --events 10000000
    python bench/clickhouse_bench.py --events 200000 --repeat 3       # a quick check
    python bench/clickhouse_bench.py --endpoint chdb:///tmp/ch --events 10000000
    python bench/clickhouse_bench.py --endpoint chdb:///tmp/ch --no-insert  # queries again
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterline import logs
from meterline.component import Context, ExportBatch
from meterline.config import MetricsConfig, convert
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
from meterline.exporters.clickhouse.query import Reader, Window
from meterline.extensions.finops import analytics, budgets, finops
from meterline.telemetry import Telemetry

MODELS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4"),
          ("anthropic", "claude-haiku-3"), ("gcp.gemini", "gemini-2.0-flash"),
          ("openai", "o3-mini"), ("mistral_ai", "mistral-large"), ("aws.bedrock", "llama-3-70b")]
KEYS = 40  # API keys, each belonging to one of 12 teams
SPAN = timedelta(days=90)


def make_batches(total: int, size: int, users: int, end: datetime) -> Any:
    """Batches of events in time order over the 90 days before `end`, shaped like real
    traffic: a few models and keys carry most calls, each key belongs to a team."""
    rng = random.Random(1)
    start_ns = int((end - SPAN).timestamp() * 1e9)
    step = int(SPAN.total_seconds() * 1e9) // total
    model_weights = [1 / (rank + 1) for rank in range(len(MODELS))]
    key_weights = [1 / (rank + 1) for rank in range(KEYS)]
    for first in range(0, total, size):
        count = min(first + size, total) - first
        models = rng.choices(MODELS, model_weights, k=count)
        keys = rng.choices(range(KEYS), key_weights, k=count)
        batch = []
        for i, (provider, model), key in zip(range(first, first + count), models, keys,
                                             strict=True):
            status = 200 if rng.random() < 0.97 else rng.choice([429, 500])
            batch.append(Event(
                event_id=f"bench-{i:010d}", timestamp=start_ns + i * step, source="gateway",
                provider=provider, operation="chat", request_model=model,
                response_model=model, endpoint="/v1/chat/completions", status_code=status,
                error_type=None if status == 200 else "server_error",
                input_tokens=rng.randint(50, 3000), output_tokens=rng.randint(10, 900),
                duration_ms=rng.uniform(150, 4000), ttft_ms=rng.uniform(80, 600),
                user_id=f"user-{rng.randrange(users)}", team=f"team-{key % 12}",
                api_key_id=f"key-{key}", api_key_name=f"key {key}",
                metadata={"customer": f"customer-{rng.randrange(200)}", "env": "prod"},
                cost_usd=rng.randint(1, 4000) / 100_000,
                actual_cost_usd=(rng.randint(1, 4000) / 100_000 if i % 5 == 0 else None)))
        yield batch


async def insert(exporter: ClickHouseExporter, args: argparse.Namespace) -> None:
    generating = exporting = 0.0
    sent = 0
    clock = time.perf_counter()
    end = datetime.now(UTC) - timedelta(minutes=5)
    for n, events in enumerate(make_batches(args.events, args.batch, args.users, end)):
        now = time.perf_counter()
        generating += now - clock
        await exporter.export(ExportBatch(f"bench:{n}", events))
        clock = time.perf_counter()
        exporting += clock - now
        sent += len(events)
        if n % 100 == 99:
            print(f"  {sent:>11,} events, {sent / exporting:,.0f} events/s", flush=True)
    print(f"inserted {sent:,} events in {exporting:.1f} s: {sent / exporting:,.0f} events/s "
          f"through the exporter ({args.batch:,} per batch; generating them took "
          f"{generating:.1f} s more)")
    # The first batch sent again: every event is already stored, so nothing is inserted.
    resend = next(make_batches(args.events, args.batch, args.users, end))
    took = time.perf_counter()
    await exporter.export(ExportBatch("bench:resend", resend))
    took = 1000 * (time.perf_counter() - took)
    print(f"re-sent batch of {len(resend):,} stored events: {took:.0f} ms (none inserted again)")


def time_queries(reader: Reader, repeat: int) -> None:
    now = datetime.now(UTC)
    w30, w90, w24 = (Window.parse(r, now=now) for r in ("30d", "90d", "24h"))
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("spend by provider, 30d", lambda: finops.spend(reader, w30, "provider")),
        ("spend by model, 90d", lambda: finops.spend(reader, w90, "model")),
        ("spend by user (top 20), 90d", lambda: finops.spend(reader, w90, "user")),
        ("spend by day, 90d", lambda: finops.spend(reader, w90, "day")),
        ("spend by metadata.customer, 30d (raw)",
         lambda: finops.spend(reader, w30, "metadata.customer")),
        ("growth by model, 30d vs previous", lambda: finops.growth(reader, w30, "model")),
        ("variance by provider, 90d", lambda: finops.variance(reader, w90, "provider")),
        ("analytics/models, 90d", lambda: analytics.models(reader, w90)),
        ("analytics/timeseries, 24h hourly", lambda: analytics.timeseries(reader, w24)),
        ("analytics/timeseries, 90d daily", lambda: analytics.timeseries(reader, w90)),
        ("analytics/users, 90d", lambda: analytics.users(reader, w90)),
        ("budgets (team + customer scopes)", lambda: budgets.status(reader, {
            "team": budgets.Budget(limit_usd=1000, scope=budgets.BudgetScope(team="team-3")),
            "customer": budgets.Budget(limit_usd=50, scope=budgets.BudgetScope(
                metadata={"customer": "customer-7"}))})),
    ]
    print(f"\n{'query':<42} {'median ms':>10} {'best ms':>9}")
    for name, run in plan:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - start))
        print(f"{name:<42} {statistics.median(times):>10.1f} {min(times):>9.1f}")


async def time_repair(exporter: ClickHouseExporter) -> None:
    """One rollup repair pass over `repair_lookback` (48h by default): the check, and the
    rebuild of any hour whose rollups count an event twice."""
    start = time.perf_counter()
    hours = await exporter.repair_rollups()
    took = 1000 * (time.perf_counter() - start)
    lookback = float(exporter.config.repair_lookback) / 3600
    print(f"\nrollup repair pass over the last {lookback:g} h: {took:.1f} ms "
          f"({len(hours)} hours rebuilt)")
    # The worst case: every hour of the look-back over-counted, all rebuilt (rebuilding an
    # hour that counts right writes the same figures again).
    reader = await exporter.connect()
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    every = [int((now - timedelta(hours=h)).timestamp()) for h in range(int(lookback) + 1)]
    start = time.perf_counter()
    await asyncio.to_thread(repair.rebuild, reader.client, reader.schema, every)
    took = 1000 * (time.perf_counter() - start)
    print(f"rebuilding all {len(every)} hours of the look-back: {took:.1f} ms")


def sizes(reader: Reader) -> None:
    schema = reader.schema
    for table in (schema.events, *(r.table for r in schema.rollups)):
        [(rows, on_disk)] = reader.client.query(
            "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND "
            f"database = '{schema.database}' AND table = '{table}'").result_rows
        print(f"{table}: {rows:,} rows, {on_disk / 2**20:,.0f} MiB on disk")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per insert")
    parser.add_argument("--users", type=int, default=2_000, help="distinct user ids")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each query")
    parser.add_argument("--endpoint", help="chdb://PATH or http://HOST:8123 (default: a "
                                           "fresh chDB directory under /tmp)")
    parser.add_argument("--no-insert", action="store_true",
                        help="only time the queries, over what --endpoint holds already")
    args = parser.parse_args()
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="meterline-ch-bench-") as tmp:
        endpoint = args.endpoint or f"chdb://{tmp}/clickhouse"
        config = convert({"endpoint": endpoint}, ClickHouseConfig)
        context = Context("clickhouse", Path(tmp), Telemetry(MetricsConfig()),
                          logs.get(component="clickhouse"))
        exporter = ClickHouseExporter(config, context)
        await exporter.start()
        try:
            if not args.no_insert:
                print(f"{args.events:,} events into {endpoint}")
                await insert(exporter, args)
            reader = await exporter.connect()
            sizes(reader)
            time_queries(reader, args.repeat)
            await time_repair(exporter)
        finally:
            await exporter.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
