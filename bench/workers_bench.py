"""The processing workers' round trip: what handing a batch to a worker and getting it back
costs the main process, apart from the processors' own work.

Starts a `ProcessorPool` of 2 workers running the shipped pipeline's processors and sends
it (1) single-event batches one at a time, a few milliseconds apart (a gateway call, a
LiteLLM POST): the main process's CPU per batch (the sleeps' own cost taken off) and the
round trip's p50 and p99; (2) batches of 1,000 events from 4 concurrent senders: the main
process's and the workers' CPU per event, and events/s.

    python bench/workers_bench.py
    python bench/workers_bench.py --singles 3000 --batches 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_pipeline_bench import ROOT, ingest_events

from meterline import logs
from meterline.config import MetricsConfig
from meterline.event import Event
from meterline.telemetry import Telemetry
from meterline.workers import Plan, ProcessorPool, ProcessorSpec


def main_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def workers_cpu(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def started_pool(data_dir: str) -> ProcessorPool:
    shipped = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    names = shipped["service"]["pipelines"]["usage"]["processors"]
    specs = [ProcessorSpec(name, name.split("/")[0], shipped["processors"][name] or {})
             for name in names]
    pool = ProcessorPool(2, 10, "warning", "console", Telemetry(MetricsConfig()))
    pool.configure(Plan({"usage": specs}, data_dir, 2))
    await pool.start()
    return pool


async def singles(pool: ProcessorPool, count: int, pause: float) -> None:
    events = msgspec.convert(ingest_events(count + 50, seed=3), list[Event])
    for event in events[:50]:  # warm
        await pool.process(["usage"], [event])
    spent, started = [], main_cpu()
    for event in events[50:]:
        began = time.perf_counter()
        await pool.process(["usage"], [event])
        spent.append(time.perf_counter() - began)
        await asyncio.sleep(pause)
    cpu = main_cpu() - started
    idle = main_cpu()
    for _ in range(count):
        await asyncio.sleep(pause)
    cpu -= main_cpu() - idle  # (the sleeps' own cost)
    spent.sort()
    print(f"single-event batches: main process {cpu / count * 1e6:,.0f} us of CPU each; "
          f"round trip p50 {spent[count // 2] * 1e3:.2f} ms, "
          f"p99 {spent[int(count * 0.99)] * 1e3:.2f} ms ({count} batches)")


async def batches(pool: ProcessorPool, size: int, rounds: int, senders: int) -> None:
    events = msgspec.convert(ingest_events(size, seed=3), list[Event])
    await pool.process(["usage"], events)
    pids = pool.pids()
    main0, workers0, began = main_cpu(), workers_cpu(pids), time.perf_counter()

    async def sender() -> None:
        for _ in range(rounds):
            await pool.process(["usage"], events)

    await asyncio.gather(*(sender() for _ in range(senders)))
    total = size * rounds * senders
    print(f"batches of {size:,} from {senders} senders: main process "
          f"{(main_cpu() - main0) / total * 1e6:.1f} us/event, workers "
          f"{(workers_cpu(pids) - workers0) / total * 1e6:.1f} us/event, "
          f"{total / (time.perf_counter() - began):,.0f} events/s")


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as data_dir:
        pool = await started_pool(data_dir)
        try:
            await singles(pool, args.singles, args.pause)
            await batches(pool, args.size, args.batches, args.senders)
        finally:
            await pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=1500, help="single-event batches")
    parser.add_argument("--pause", type=float, default=0.004, help="seconds between them")
    parser.add_argument("--size", type=int, default=1000, help="events per large batch")
    parser.add_argument("--batches", type=int, default=15, help="large batches per sender")
    parser.add_argument("--senders", type=int, default=4)
    args = parser.parse_args()
    logs.configure("warning")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
