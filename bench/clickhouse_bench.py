"""ClickHouse exporter: the latency of every FinOps report and analytics answer.

Fills the tables with `--events` events (default 10 million) generated inside
ClickHouse (`INSERT INTO llm_events ... SELECT ... FROM numbers()`, in chunks, in
time order), the rollups filled from each chunk with the materialized views' own
query (the views dropped meanwhile, then created again): 365 days, with a
Zipf-like spread of 20,000 users, 500 API keys (each of one of 40 teams), 200
customers (`metadata.customer`, a `rollup_metadata` key), 8 models, sessions of
25 calls and agent runs of 5 events (30% of them). It then seals the run answers
of the last `--seal-days` closed days (as the finops extension does: the answers by
agent, session and trace read them), prints each table's rows and on-disk size,
times every report and answer (each run `--repeat` times:
median and best; those read from raw events by design, guardrails, are marked),
and one rollup repair pass. With `--exporter`, the events go through
the exporter's own path instead (the "already stored?" check, column batches,
deduplicated inserts, hours held open): the insert rate. Runs on embedded chDB
unless `--endpoint` names a server.

    python bench/clickhouse_bench.py --events 100000000
    python bench/clickhouse_bench.py --events 200000 --repeat 3       # a quick check
    python bench/clickhouse_bench.py --endpoint chdb:///tmp/ch --events 10000000
    python bench/clickhouse_bench.py --endpoint chdb:///tmp/ch --no-insert  # queries again
    python bench/clickhouse_bench.py --endpoint chdb:///tmp/ch --no-insert --now 2026-12-06T17:30
    python bench/clickhouse_bench.py --exporter --events 1000000 --users 2000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's meterline

from meterline import logs
from meterline.component import Context, ExportBatch, PermanentError, RetryableError
from meterline.config import MetricsConfig, convert
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
from meterline.exporters.clickhouse.query import Reader, Window
from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, ensure_schema
from meterline.extensions.finops import analytics, budgets, finops
from meterline.telemetry import Telemetry

MODELS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4"),
          ("anthropic", "claude-haiku-3"), ("gcp.gemini", "gemini-2.0-flash"),
          ("openai", "o3-mini"), ("mistral_ai", "mistral-large"), ("aws.bedrock", "llama-3-70b")]
KEYS = 40  # API keys, each belonging to one of 12 teams (--exporter)
SPAN = timedelta(days=90)  # (--exporter)
GENERATED_SPAN = timedelta(days=365)
GENERATED = {"users": 20_000, "keys": 500, "teams": 40, "customers": 200}
CHUNK = 2_000_000  # events per generating INSERT
# A generating insert's blocks: ~130,000 events (larger ones, of 80 columns, exceed the
# 2 GiB query memory). The views are dropped while the tables fill:
# each rollup is filled from each chunk of events with the views' own query
# (`Schema.fill_rollup`), which gives the rollups the views would, at a fraction of the
# cost of running every view on every block.
_FILL = {"insert_deduplicate": 0, "max_insert_threads": 2, "max_block_size": 131072,
         "min_insert_block_size_rows": 131072, "min_insert_block_size_bytes": 64 << 20}


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
    reader = await exporter.connect()
    rows = f"SELECT count() FROM {reader.schema.qualified(reader.schema.events)}"
    [(before,)] = reader.client.query(rows).result_rows
    took = time.perf_counter()
    await exporter.export(ExportBatch("bench:resend", resend))
    took = 1000 * (time.perf_counter() - took)
    [(after,)] = reader.client.query(rows).result_rows
    print(f"re-sent batch of {len(resend):,} stored events: {took:.0f} ms "
          f"({after - before:,} rows inserted again)")


def _uniform(salt: int) -> str:
    """SQL: a number in [0, 1) fixed by the event's number and `salt`."""
    return f"(cityHash64(number, {salt}) % 1000000) / 1e6"


def _zipf(n: int, salt: int, skew: float = 3.0) -> str:
    """SQL: 0..n-1, the low ones far more often (a power of a uniform number: about
    Zipf-like, the head carrying most calls)."""
    return f"toUInt32(floor({n} * pow({_uniform(salt)}, {skew})))"


# 30% of the events are agent runs of 5 (a trace: the run's invoke_agent event, model
# calls and a tool call), the others calls of no trace
_AGENT_RUN = "intDiv(number, 5) % 10 < 3"


def generate(reader: Reader, total: int) -> None:
    """`total` events over the 365 days before now, in time order, generated in
    ClickHouse and inserted into `llm_events`, the rollups filled from each chunk."""
    schema = reader.schema
    end = datetime.now(UTC) - timedelta(minutes=5)
    start_ns = int((end - GENERATED_SPAN).timestamp() * 1e9)
    step = int(GENERATED_SPAN.total_seconds() * 1e9) // total
    providers = "[" + ", ".join(repr(p) for p, _ in MODELS) + "]"
    models = "[" + ", ".join(repr(m) for _, m in MODELS) + "]"
    model = f"(1 + toUInt32(floor({len(MODELS)} * pow({_uniform(1)}, 2))))"
    key = _zipf(GENERATED["keys"], 2)
    status = f"multiIf({_uniform(5)} < 0.97, 200, {_uniform(5)} < 0.985, 429, 500)"
    columns = {
        "event_id": "concat('bench-', leftPad(toString(number), 10, '0'))",
        "timestamp": f"fromUnixTimestamp64Nano(toInt64({start_ns} + number * {step}), 'UTC')",
        "session_id": "concat('session-', toString(intDiv(number, 25)))",
        "trace_id": f"if({_AGENT_RUN}, concat('trace-', toString(intDiv(number, 5))), '')",
        "agent_name": f"if({_AGENT_RUN} AND number % 5 = 0, concat('agent-', "
                      "toString(cityHash64(intDiv(number, 5), 12) % 20)), '')",
        "operation": f"multiIf({_AGENT_RUN} AND number % 5 = 0, 'invoke_agent', "
                     f"{_AGENT_RUN} AND number % 5 = 3, 'execute_tool', 'chat')",
        "tool_name": f"if({_AGENT_RUN} AND number % 5 = 3, concat('tool-', "
                     "toString(cityHash64(number, 13) % 50)), '')",
        "source": "'gateway'",
        "provider": f"{providers}[{model}]", "request_model": f"{models}[{model}]",
        "response_model": f"{models}[{model}]", "endpoint": "'/v1/chat/completions'",
        "status_code": status,
        "error_type": f"if({status} = 200, '', 'server_error')",
        "input_tokens": "toUInt32(50 + cityHash64(number, 6) % 2950)",
        "output_tokens": "toUInt32(10 + cityHash64(number, 7) % 890)",
        "duration_ms": "150 + cityHash64(number, 8) % 385000 / 100",
        "ttft_ms": "80 + cityHash64(number, 9) % 52000 / 100",
        "user_id": f"concat('user-', toString({_zipf(GENERATED['users'], 3)}))",
        "api_key_id": f"concat('key-', toString({key}))",
        "api_key_name": f"concat('key ', toString({key}))",
        "team": f"concat('team-', toString({key} % {GENERATED['teams']}))",
        "metadata": f"map('customer', concat('customer-', toString("
                    f"{_zipf(GENERATED['customers'], 4, 2.0)})), 'env', 'prod')",
        "cost_usd": "(1 + cityHash64(number, 10) % 4000) / 100000",
        "actual_cost_usd": "if(number % 5 = 0, (1 + cityHash64(number, 11) % 4000) / 100000, "
                           "NULL)",
    }
    names = ", ".join(columns)
    select = ", ".join(f"{sql} AS `{name}`" for name, sql in columns.items())
    client = reader.client
    for rollup in schema.rollups:  # the views again at the end (`ensure_schema`)
        client.command(f"DROP VIEW IF EXISTS {schema.qualified(rollup.view)}")
    clock = time.perf_counter()
    spent = {"llm_events": 0.0} | {r.table: 0.0 for r in schema.rollups}
    for first in range(0, total, CHUNK):
        count = min(CHUNK, total - first)
        took = time.perf_counter()
        client.command(f"INSERT INTO {schema.qualified(schema.events)} ({names}) "
                       f"SELECT {select} FROM numbers({first}, {count})", settings=_FILL)
        spent["llm_events"] += time.perf_counter() - took
        since, until = start_ns + first * step, start_ns + (first + count) * step
        chunk = (f"timestamp >= fromUnixTimestamp64Nano(toInt64({since}), 'UTC') "
                 f"AND timestamp < fromUnixTimestamp64Nano(toInt64({until}), 'UTC')")
        for rollup in schema.rollups:
            took = time.perf_counter()
            client.command(schema.fill_rollup(rollup, chunk), settings={**_FILL, **FINAL_SETTINGS})
            spent[rollup.table] += time.perf_counter() - took
        done = first + count
        print(f"  {done:>11,} events, {done / (time.perf_counter() - clock):,.0f} events/s",
              flush=True)
    ensure_schema(client, schema)
    took = time.perf_counter() - clock
    print(f"generated {total:,} events in {took:.1f} s ({total / took:,.0f} events/s, "
          "rollups included): " + ", ".join(f"{t} {s:.1f} s" for t, s in spent.items()))


def time_queries(reader: Reader, repeat: int, now: datetime) -> None:
    w30, w90, w24, w7 = (Window.parse(r, now=now) for r in ("30d", "90d", "24h", "7d"))
    customer = budgets.BudgetScope(metadata={"customer": "customer-7"})
    plan: list[tuple[str, Callable[[], Any]]] = [
        *((f"spend by {by}, 30d", lambda by=by: finops.spend(reader, w30, by))
          for by in ("provider", "model", "team", "api_key", "status", "user",
                     "metadata.customer")),
        *((f"spend by {by}, 90d", lambda by=by: finops.spend(reader, w90, by))
          for by in ("provider", "model", "api_key", "user", "day", "metadata.customer")),
        ("growth by model, 30d vs previous", lambda: finops.growth(reader, w30, "model")),
        ("growth by user, 30d vs previous", lambda: finops.growth(reader, w30, "user")),
        ("growth by metadata.customer, 30d", lambda: finops.growth(reader, w30,
                                                                   "metadata.customer")),
        ("variance by provider, 90d", lambda: finops.variance(reader, w90, "provider")),
        ("variance by user, 90d", lambda: finops.variance(reader, w90, "user")),
        ("analytics/models, 90d", lambda: analytics.models(reader, w90)),
        ("analytics/timeseries, 24h hourly", lambda: analytics.timeseries(reader, w24)),
        ("analytics/timeseries, 90d daily", lambda: analytics.timeseries(reader, w90)),
        ("analytics/providers, 30d", lambda: analytics.providers(reader, w30)),
        ("analytics/costs by api_key, 30d", lambda: analytics.costs(reader, w30, "api_key")),
        ("analytics/costs by user, 30d", lambda: analytics.costs(reader, w30, "user")),
        ("analytics/costs by team, 90d", lambda: analytics.costs(reader, w90, "team")),
        ("analytics/usage, 30d", lambda: analytics.usage_report(reader, w30)),
        ("analytics/usage of user-3, 30d", lambda: analytics.usage_report(
            reader, w30, user_id="user-3")),
        ("analytics/performance, 7d", lambda: analytics.performance(reader, w7)),
        ("analytics/users, 90d", lambda: analytics.users(reader, w90)),
        ("budgets (team + customer scopes)", lambda: budgets.status(reader, {
            "team": budgets.Budget(limit_usd=1000, scope=budgets.BudgetScope(team="team-3")),
            "customer": budgets.Budget(limit_usd=50, scope=customer)})),
        *((f"spend by {by}, 30d", lambda by=by: finops.spend(reader, w30, by))
          for by in ("agent", "session", "trace", "tool")),
        ("analytics/agents, 24h", lambda: analytics.agents(reader, w24)),
        ("analytics/agents, 30d", lambda: analytics.agents(reader, w30)),
        ("analytics/guardrails, 24h (raw)", lambda: analytics.guardrails(reader, w24)),
    ]
    print(f"\n{'query':<42} {'median ms':>10} {'best ms':>9}")
    plan[0][1]()  # the first query of a process loads marks and indexes
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


def seal(reader: Reader, now: datetime, days: int) -> Reader:
    """The run answers of the last `days` closed days sealed (`seals.py`), as the `finops`
    extension seals them; a reader that reads them."""
    sealed = dataclasses.replace(reader, seals=finops.sealed_runs(reader.schema))
    assert sealed.seals is not None
    took = time.perf_counter()
    done = sealed.seals.seal(sealed, now=now, most=days)
    print(f"sealed the run answers of {len(done)} closed days (the last {days}) in "
          f"{time.perf_counter() - took:.1f} s")
    return sealed


def sizes(reader: Reader) -> None:
    schema = reader.schema
    reader.client.command(f"OPTIMIZE TABLE {schema.qualified(schema.open_hours_table)} FINAL")
    sealed = [name for (name,) in reader.client.query(
        f"SELECT name FROM system.tables WHERE database = '{schema.database}' AND "
        f"name LIKE '{schema.usage_table('run')}%' ORDER BY name").result_rows]
    for table in (schema.events, *(r.table for r in schema.rollups), schema.open_hours_table,
                  *sealed):
        [(rows, on_disk)] = reader.client.query(
            "SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND "
            f"database = '{schema.database}' AND table = '{table}'").result_rows
        print(f"{table:<24} {rows or 0:>13,} rows {(on_disk or 0) / 2**20:>10,.1f} MiB on disk")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per insert")
    parser.add_argument("--users", type=int, default=2_000,
                        help="distinct user ids (--exporter)")
    parser.add_argument("--exporter", action="store_true",
                        help="insert through the exporter (its insert rate) rather than "
                             "generating the events in ClickHouse")
    parser.add_argument("--no-repair", action="store_true",
                        help="skip timing the repair pass and the 49-hour rebuild")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each query")
    parser.add_argument("--seal-days", type=int, default=95,
                        help="seal the run answers of the last N closed days first (as the "
                             "finops extension does; 0: answer them from every row)")
    parser.add_argument("--endpoint", help="chdb://PATH or http://HOST:8123 (default: a "
                                           "fresh chDB directory under /tmp)")
    parser.add_argument("--no-insert", action="store_true",
                        help="only time the queries, over what --endpoint holds already")
    parser.add_argument("--now", type=datetime.fromisoformat, default=None,
                        help="where the queries' ranges end (ISO 8601, UTC; default: now): "
                             "for a database filled earlier, whose last hours would else be "
                             "empty (a 24-hour range of a database filled yesterday)")
    args = parser.parse_args()
    if args.no_insert and not args.endpoint:
        parser.error("--no-insert times the queries over what --endpoint holds: name it "
                     "(without it the database is a new, empty one)")
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory(prefix="meterline-ch-bench-") as tmp:
        endpoint = args.endpoint or f"chdb://{tmp}/clickhouse"
        options: dict[str, Any] = {"endpoint": endpoint, "rollup_metadata": ["customer"],
                                   "repair_interval": 0}
        if endpoint.startswith("chdb://"):  # a server's memory limits are the server's
            options["max_query_memory_mib"] = 2048
        config = convert(options, ClickHouseConfig)
        context = Context("clickhouse", Path(tmp), Telemetry(MetricsConfig()),
                          logs.get(component="clickhouse"))
        exporter = ClickHouseExporter(config, context)
        await exporter.start()
        try:
            try:
                reader = await exporter.connect()
            except (RetryableError, PermanentError) as e:
                raise SystemExit(f"{endpoint}: {e}") from None
            if not args.no_insert:
                print(f"{args.events:,} events into {endpoint}")
                if args.exporter:
                    await insert(exporter, args)
                else:
                    generate(reader, args.events)
            now = args.now.replace(tzinfo=UTC) if args.now else datetime.now(UTC)
            if args.seal_days:
                reader = seal(reader, now, args.seal_days)
            sizes(reader)
            time_queries(reader, args.repeat, now)
            if not args.no_repair:
                await time_repair(exporter)
        finally:
            await exporter.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
