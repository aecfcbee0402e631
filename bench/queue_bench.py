"""An exporter catching up on a backlog: how long its delivery holds the event loop.

A dead exporter's persistent queue fills past what it keeps in memory (`cache_bytes`,
32 MB packed); once the exporter is back, each batch it takes is read from disk and
unpacked, sent, acked and let go. This puts `--events` events of the default-pipeline
bench (~1.4 KB each) into a queue in batches of 1,000, then lets an exporter that sends
nothing (the floor of every exporter) deliver them in batches of `--batch` (the
ClickHouse exporter's 10,000) through the daemon's own delivery loop, while a ticker on
the same loop asks for a 1 ms sleep over and over: how late each wake-up comes is how
long something else held the loop.

    python bench/queue_bench.py --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's meterline, and its benches

from default_pipeline_bench import ingest_events  # noqa: E402

from meterline import logs  # noqa: E402
from meterline.cli import _tune_gc  # noqa: E402
from meterline.component import Context, Exporter  # noqa: E402
from meterline.config import MetricsConfig  # noqa: E402
from meterline.delivery import BatchConfig, ExporterConfig, ExporterRunner  # noqa: E402
from meterline.event import Event  # noqa: E402
from meterline.queue import Batch, ExportBatch  # noqa: E402
from meterline.queue.persistent import PersistentQueue  # noqa: E402
from meterline.telemetry import Telemetry  # noqa: E402


class Sent(Exporter):
    """Sends nothing: what is measured is the delivery around an exporter."""

    def __init__(self) -> None:
        self.events = 0

    async def start(self) -> None:
        pass

    async def export(self, batch: ExportBatch) -> None:
        self.events += len(batch.events)

    async def shutdown(self) -> None:
        pass


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        asked = loop.time()
        await asyncio.sleep(0.001)
        lags.append(loop.time() - asked - 0.001)


async def run(args: argparse.Namespace, directory: Path) -> None:
    events = [msgspec.convert(e, Event) for e in ingest_events(args.events)]
    queue = PersistentQueue(directory / "queue", 1 << 34, fsync=False)
    for i in range(0, len(events), 1000):
        await queue.put(Batch(events[i:i + 1000]))
    del events  # the queue's cache holds the last 32 MB of them, as in the daemon
    telemetry = Telemetry(MetricsConfig())
    config: Any = ExporterConfig(batch=BatchConfig(max_size=args.batch))
    exporter = Sent()
    runner = ExporterRunner(exporter, config, Context("sent", directory, telemetry,
                                                      logs.get(component="sent")),
                            queue, telemetry)
    lags: list[float] = []
    stop = asyncio.Event()
    ticking = asyncio.create_task(ticker(lags, stop))
    await asyncio.sleep(0.05)
    lags.clear()
    started = time.perf_counter()
    await runner.start()
    runner.finish()  # deliver what there is, without waiting for batches to fill
    await runner.shutdown(grace=600)
    seconds = time.perf_counter() - started
    stop.set()
    await ticking
    lags.sort()
    print(f"{exporter.events:,} events delivered in batches of {args.batch:,}: "
          f"{exporter.events / seconds:,.0f} events/s")
    print(f"event loop held (a 1 ms sleep's lateness), ms: p50 {statistics.median(lags) * 1e3:.1f}"
          f"  p99 {lags[int(len(lags) * 0.99)] * 1e3:.1f}  max {lags[-1] * 1e3:.1f}"
          f"  ({len(lags)} wake-ups)")
    print(f"the loop was held {sum(lags) / seconds:.0%} of the time it took")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per batch sent")
    args = parser.parse_args()
    logs.configure("warning")
    _tune_gc()  # the collector and the GIL's switch interval as `meterline run` sets them
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
