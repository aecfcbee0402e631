"""A batch routed to several queues goes into all of them or into none: when one queue
cannot store it (a full disk), the others take their copy back, so that a batch the
client was told to resend (503) is delivered nowhere, and its retry duplicates nothing."""

import asyncio
import errno
import os

import pytest

from meterline.config import convert
from meterline.delivery import ExporterConfig, ExporterRunner, open_queue
from meterline.pipeline import Entry, Flow, Pipeline, Taps
from meterline.queue import Batch, QueueWriteError, put_all
from meterline.queue.memory import MemoryQueue
from meterline.queue.persistent import PersistentQueue
from tests.helpers import (
    event_dicts,
    free_port,
    make_context,
    make_event,
    metric_value,
    post_json,
    read_jsonl,
    running,
    webhook_to_file,
)
from tests.test_delivery import Recording


def events(start, count):
    return [make_event(i) for i in range(start, start + count)]


def ids(batch):
    return [e.event_id for e in batch.events]


@pytest.fixture
def full_disk_under(monkeypatch):
    """`full_disk_under(dir)`: writes to files under `dir` fail with ENOSPC until
    `full_disk_under(None)`; other files are written as usual."""
    real_write = os.write
    failing: list[str] = []

    def write(fd, data):
        if failing and os.readlink(f"/proc/self/fd/{fd}").startswith(failing[0]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)

    def set_failing(directory):
        failing[:] = [] if directory is None else [str(directory)]
    return set_failing


def runner(tmp_path, cid, queue):
    cfg = convert({"queue": queue, "batch": {"timeout": "10ms"},
                   "retry": {"initial_interval": "10ms"}}, ExporterConfig)
    ctx = make_context(tmp_path, cid)
    exporter = Recording()
    return ExporterRunner(exporter, cfg, ctx, open_queue(cfg.queue, ctx), ctx.telemetry), exporter


async def entry_with(tmp_path, *queues, pipelines=1):
    runners = [runner(tmp_path, f"e{i}", q) for i, q in enumerate(queues)]
    for r, _ in runners:
        await r.start()
    ctx = make_context(tmp_path)
    entry = Entry("webhook", Flow(), ctx.telemetry)
    if pipelines == 1:
        entry.pipelines = [Pipeline("p", [], [r for r, _ in runners], ctx.telemetry, Taps())]
    else:
        entry.pipelines = [Pipeline(f"p{i}", [], [r], ctx.telemetry, Taps())
                           for i, (r, _) in enumerate(runners)]
    return entry, runners


async def test_a_memory_queue_exports_nothing_of_a_batch_another_queue_could_not_write(
        tmp_path, full_disk_under):
    entry, [(first, exported), (second, _)] = await entry_with(
        tmp_path, {"type": "memory"}, {"type": "persistent"})
    full_disk_under(second.queue.dir)
    with pytest.raises(QueueWriteError, match="No space left"):
        await entry.consume(events(0, 5))
    await asyncio.sleep(0.1)  # several batch timeouts of the first exporter
    assert exported.delivered == [] and len(first.queue) == 0
    for r in (first, second):
        await r.shutdown(1)


async def test_a_persistent_queue_keeps_nothing_of_a_batch_another_queue_could_not_write(
        tmp_path, full_disk_under):
    entry, [(first, _), (second, _)] = await entry_with(
        tmp_path, {"type": "persistent"}, {"type": "persistent"})
    await first.stop_loop()  # nothing delivered: what the queue holds is what a restart sees
    full_disk_under(second.queue.dir)
    with pytest.raises(QueueWriteError):
        await entry.consume(events(0, 5))
    assert len(first.queue) == 0
    directory = first.queue.dir
    await first.queue.close()
    reopened = PersistentQueue(directory, 1 << 30)
    assert len(reopened) == 0 and await reopened.take(100) is None
    await reopened.close()
    await second.shutdown(1)


async def test_events_handed_over_that_cannot_be_queued_are_counted_unavailable(
        tmp_path, full_disk_under):
    # (`consume`, as the gateway, file and Kafka receivers hand events over and retry)
    entry, [(only, _)] = await entry_with(tmp_path, {"type": "persistent"})
    full_disk_under(only.queue.dir)
    for _ in range(2):
        with pytest.raises(QueueWriteError):
            await entry.consume(events(0, 5))
    assert metric_value(entry.telemetry.registry, "meterline_receiver_refused_events_total",
                        receiver="webhook", reason="unavailable") == 10
    await only.shutdown(1)


async def test_the_retry_of_a_refused_batch_is_delivered_once_everywhere(
        tmp_path, full_disk_under):
    entry, runners = await entry_with(tmp_path, {"type": "persistent"}, {"type": "memory"},
                                      {"type": "persistent"})
    full_disk_under(runners[2][0].queue.dir)
    with pytest.raises(QueueWriteError):
        await entry.consume(events(0, 5))
    full_disk_under(None)
    await entry.consume(events(0, 5))  # the client's retry
    for r, exported in runners:
        await r.shutdown(5)
        assert exported.delivered == [f"evt-{i:08d}" for i in range(5)]


async def test_a_batch_is_taken_back_across_pipelines_too(tmp_path, full_disk_under):
    entry, [(first, exported), (second, _)] = await entry_with(
        tmp_path, {"type": "memory"}, {"type": "persistent"}, pipelines=2)
    full_disk_under(second.queue.dir)
    with pytest.raises(QueueWriteError):
        await entry.consume(events(0, 5))
    await asyncio.sleep(0.1)
    assert exported.delivered == [] and len(first.queue) == 0
    for r in (first, second):
        await r.shutdown(1)


async def test_a_batch_staged_later_waits_for_the_ones_staged_before_it(tmp_path):
    q = MemoryQueue(100)
    a, b = q.stage(Batch(events(0, 2))), q.stage(Batch(events(2, 2)))
    b.commit()
    assert await q.take(10) is None  # b is not handed out before a is settled
    a.commit()
    assert ids(await q.take(10)) == [f"evt-{i:08d}" for i in range(4)]


async def test_a_staged_batch_counts_against_the_bound(tmp_path):
    q = MemoryQueue(10)
    staged = q.stage(Batch(events(0, 8)))
    assert not q.has_room(Batch(events(8, 5)))
    await staged.abort()
    assert q.has_room(Batch(events(8, 5))) and len(q) == 0


async def test_the_other_queues_take_the_batch_back_even_if_the_caller_is_cancelled(
        tmp_path, full_disk_under):
    good = PersistentQueue(tmp_path / "good", 1 << 30)
    bad = PersistentQueue(tmp_path / "bad", 1 << 30)
    full_disk_under(tmp_path / "bad")
    caller = asyncio.ensure_future(put_all([good.stage(Batch(events(0, 3))),
                                            bad.stage(Batch(events(0, 3)))]))
    await asyncio.sleep(0)
    caller.cancel()
    await good.close()  # waits for the batch to be settled
    await bad.close()
    reopened = PersistentQueue(tmp_path / "good", 1 << 30)
    assert len(reopened) == 0
    await reopened.close()


async def test_the_webhook_answers_503_and_the_other_exporter_writes_nothing(
        tmp_path, full_disk_under):
    port = free_port()
    body = f"""
    receivers:
      webhook: {{listen: 127.0.0.1:{port}}}
    exporters:
      file/a: {{path: "{{data}}/a.jsonl", batch: {{timeout: 10ms}}}}
      file/b: {{path: "{{data}}/b.jsonl", batch: {{timeout: 10ms}}}}
    service:
      data_dir: {{data}}
      admin: null
      workers: 1
      pipelines:
        p: {{receivers: [webhook], exporters: [file/a, file/b]}}
    """
    async with running(body, tmp_path):
        url = f"http://127.0.0.1:{port}/v1/events"
        full_disk_under(tmp_path / "data" / "queue" / "file_b")
        status, _, _ = await post_json(url, event_dicts(0, 10))
        assert status == 503
        full_disk_under(None)
        status, _, _ = await post_json(url, event_dicts(0, 10))  # the client's retry
        assert status == 200
    for name in ("a", "b"):
        rows = read_jsonl(tmp_path / "data" / f"{name}.jsonl")
        assert [r["event_id"] for r in rows] == [f"evt-{i:08d}" for i in range(10)]


@pytest.mark.parametrize("workers", [1, 2], ids=["inline", "in-a-worker"])
async def test_a_body_that_cannot_be_queued_is_answered_503_and_counted_unavailable(
        tmp_path, full_disk_under, workers):
    port = free_port()
    body = webhook_to_file(port, service={"workers": workers})
    async with running(body, tmp_path) as service:
        full_disk_under(tmp_path / "data" / "queue" / "file")
        status, _, headers = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                             event_dicts(0, 10))
        assert (status, headers["Retry-After"]) == (503, "5")
        assert metric_value(service.telemetry.registry, "meterline_receiver_refused_events_total",
                            receiver="webhook", reason="unavailable") == 10
    assert read_jsonl(tmp_path / "data" / "out.jsonl") == []
