"""A full exporter queue: `block` pushes back, `drop_newest` drops and counts, and the bound
holds however many receiver calls arrive at once."""

import asyncio

from meterline.component import Backpressure, Exporter, RetryableError
from meterline.config import convert
from meterline.delivery import ExporterConfig, ExporterRunner, open_queue
from meterline.pipeline import Entry, Flow, Pipeline, Taps
from meterline.queue import Batch
from meterline.queue.persistent import PersistentQueue
from tests.helpers import make_context, make_event, metric_value


class Down(Exporter):
    """An exporter that never succeeds: what is queued stays queued."""

    async def export(self, batch):
        raise RetryableError("connection refused")


async def entry_with_full_queue(tmp_path, when_full, max_events=10):
    cfg = convert({"queue": {"type": "memory", "max_events": max_events, "when_full": when_full},
                   "retry": {"initial_interval": "10s"}}, ExporterConfig)
    ctx = make_context(tmp_path)
    runner = ExporterRunner(Down(), cfg, ctx, open_queue(cfg.queue, ctx), ctx.telemetry)
    await runner.start()
    entry = Entry("webhook", Flow(), ctx.telemetry)
    entry.pipelines = [Pipeline("p", [], [runner], ctx.telemetry, Taps())]
    return entry, runner, ctx.telemetry.registry


def batch_of(start, count):
    return [make_event(i) for i in range(start, start + count)]


async def test_drop_newest_accepts_holds_the_maximum_and_counts_the_rest(tmp_path):
    entry, runner, registry = await entry_with_full_queue(tmp_path, "drop_newest")
    for i in range(4):
        await entry.consume(batch_of(i * 5, 5))  # never raises Backpressure
    assert len(runner.queue) == 10
    assert metric_value(registry, "meterline_exporter_dropped_events_total",
                        exporter="test") == 10
    assert metric_value(registry, "meterline_receiver_accepted_events_total") == 20
    await runner.stop_loop()


async def test_block_pushes_back_and_drops_nothing(tmp_path):
    entry, runner, registry = await entry_with_full_queue(tmp_path, "block")
    outcomes = []
    for i in range(4):
        try:
            await entry.consume(batch_of(i * 5, 5))
            outcomes.append("queued")
        except Backpressure:
            outcomes.append("pushed back")
    assert outcomes == ["queued", "queued", "pushed back", "pushed back"]
    assert len(runner.queue) == 10
    assert metric_value(registry, "meterline_exporter_dropped_events_total") == 0
    await runner.stop_loop()


async def test_concurrent_calls_on_a_nearly_full_queue_cannot_exceed_its_bound(tmp_path):
    entry, runner, _ = await entry_with_full_queue(tmp_path, "block")
    await entry.consume(batch_of(0, 8))
    results = await asyncio.gather(*(entry.consume(batch_of(100 + i * 2, 2)) for i in range(5)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert sum(isinstance(r, Backpressure) for r in results) == 4
    assert len(runner.queue) == 10
    await runner.stop_loop()


async def test_a_persistent_put_takes_its_room_before_it_is_written(tmp_path):
    first = Batch(batch_of(0, 5))
    size = len(first.packed)
    q = PersistentQueue(tmp_path / "q", max_bytes=int(size * 2.5))
    batches = [Batch(batch_of(10 * i, 5)) for i in range(4)]
    puts = [q.put(b) for b in batches if q.has_room(b)]  # no await between check and put
    await asyncio.gather(*puts)
    assert len(puts) == 2 and len(q) == 10
    await q.close()

