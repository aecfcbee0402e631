"""Queue, batching and retry around an exporter: nothing lost, retries counted."""

import asyncio

import msgspec
import pytest

from meterline import delivery
from meterline.component import (
    ExportBatch,
    Exporter,
    PartialError,
    PermanentError,
    RetryableError,
)
from meterline.config import convert
from meterline.delivery import ExporterConfig, ExporterRunner, backoff_delays, open_queue
from meterline.queue import Batch
from tests.helpers import eventually, make_context, make_event, metric_value, read_jsonl


class Recording(Exporter):
    """Fails the first `failures` sends (retryably, or permanently), then records."""

    def __init__(self, failures=0, permanent=False):
        self.failures = failures
        self.permanent = permanent
        self.batches: list[ExportBatch] = []
        self.attempt_ids: list[str] = []

    async def export(self, batch):
        self.attempt_ids.append(batch.id)
        if self.failures:
            self.failures -= 1
            raise (PermanentError("bad row") if self.permanent
                   else RetryableError("connection refused"))
        self.batches.append(ExportBatch(batch.id, list(batch.events)))

    @property
    def delivered(self):
        return [e.event_id for b in self.batches for e in b.events]


def runner_for(exporter, tmp_path, **config):
    cfg = convert({"batch": {"timeout": "10ms"},
                   "retry": {"initial_interval": "10ms", "max_interval": "20ms"}, **config},
                  ExporterConfig)
    ctx = make_context(tmp_path)
    return (ExporterRunner(exporter, cfg, ctx, open_queue(cfg.queue, ctx), ctx.telemetry),
            ctx.telemetry.registry)


async def put(runner, start, count):
    await runner.put(Batch([make_event(i) for i in range(start, start + count)]))


async def test_an_exporter_that_fails_then_recovers_loses_nothing(tmp_path):
    exporter = Recording(failures=3)
    runner, telemetry = runner_for(exporter, tmp_path)
    await runner.start()
    await put(runner, 0, 5)
    await put(runner, 5, 5)
    await eventually(lambda: len(exporter.delivered) == 10)
    assert exporter.delivered == [f"evt-{i:08d}" for i in range(10)]
    assert metric_value(telemetry, "meterline_exporter_retries_total", exporter="test") == 3
    assert metric_value(telemetry, "meterline_exporter_sent_events_total", exporter="test") == 10
    await runner.shutdown(1)


async def test_a_retried_batch_keeps_its_id(tmp_path):
    exporter = Recording(failures=2)
    runner, _ = runner_for(exporter, tmp_path)
    await runner.start()
    await put(runner, 0, 3)
    await eventually(lambda: exporter.batches)
    assert len(set(exporter.attempt_ids)) == 1 and len(exporter.attempt_ids) == 3
    await runner.shutdown(1)


async def test_a_permanent_error_goes_to_the_dead_letter_directory(tmp_path):
    exporter = Recording(failures=1, permanent=True)
    runner, telemetry = runner_for(exporter, tmp_path, batch={"max_size": 3, "timeout": "1s"})
    await runner.start()
    await put(runner, 0, 3)
    await put(runner, 3, 3)
    await eventually(lambda: len(exporter.delivered) == 3)
    [dead] = list((tmp_path / "queue" / "test" / "dead-letter").glob("*.jsonl"))
    assert [e["event_id"] for e in read_jsonl(dead)] == [f"evt-{i:08d}" for i in range(3)]
    assert metric_value(telemetry, "meterline_exporter_send_failed_events_total") == 3
    await runner.shutdown(1)


class RefusingSome(Exporter):
    """Delivers every event but those named, and says which it did not deliver."""

    def __init__(self, refused):
        self.refused = refused
        self.delivered = []

    async def export(self, batch):
        bad = [e for e in batch.events if e.event_id in self.refused]
        self.delivered += [e.event_id for e in batch.events if e not in bad]
        if bad:
            raise PermanentError("bad rows", events=bad)


async def test_only_the_events_a_permanent_error_names_go_to_the_dead_letter_directory(
        tmp_path):
    exporter = RefusingSome({"evt-00000001"})
    runner, telemetry = runner_for(exporter, tmp_path, batch={"max_size": 4, "timeout": "1s"})
    await runner.start()
    await put(runner, 0, 4)
    await eventually(lambda: metric_value(telemetry, "meterline_exporter_send_failed_events_total"))
    [dead] = list((tmp_path / "queue" / "test" / "dead-letter").glob("*.jsonl"))
    assert [e["event_id"] for e in read_jsonl(dead)] == ["evt-00000001"]
    assert metric_value(telemetry, "meterline_exporter_send_failed_events_total") == 1
    assert metric_value(telemetry, "meterline_exporter_sent_events_total", exporter="test") == 3
    await runner.shutdown(1)


async def test_retries_stop_after_max_elapsed_time(tmp_path):
    exporter = Recording(failures=1000)
    runner, telemetry = runner_for(exporter, tmp_path, retry={
        "initial_interval": "10ms", "max_interval": "10ms", "max_elapsed_time": "100ms"})
    await runner.start()
    await put(runner, 0, 2)
    await eventually(lambda: metric_value(telemetry, "meterline_exporter_send_failed_events_total"))
    assert list((tmp_path / "queue" / "test" / "dead-letter").glob("*.jsonl"))
    await runner.shutdown(1)


async def test_a_full_batch_goes_without_waiting_for_the_timeout(tmp_path):
    exporter = Recording()
    runner, _ = runner_for(exporter, tmp_path, batch={"max_size": 4, "timeout": "60s"})
    await runner.start()
    await put(runner, 0, 10)
    await eventually(lambda: len(exporter.delivered) == 8)
    assert [len(b.events) for b in exporter.batches] == [4, 4]
    await runner.shutdown(1)


async def test_a_delivered_batch_is_let_go_a_slice_at_a_time_other_tasks_running_between(
        tmp_path, monkeypatch):
    """Freeing 10,000 events takes about 12 ms: not in one go on the event loop."""
    monkeypatch.setattr(delivery, "_LET_GO_SLICE", 1000)
    sent: list[list] = []

    class Keeping(Exporter):
        async def export(self, batch):
            sent.append(batch.events)  # the batch's own list, as delivery lets it go

    runner, _ = runner_for(Keeping(), tmp_path, batch={"max_size": 3500, "timeout": "60s"})
    seen: list[int] = []

    async def watch():
        while not sent or sent[0]:
            seen.append(len(sent[0]) if sent else -1)
            await asyncio.sleep(0)

    watching = asyncio.create_task(watch())
    await runner.start()
    await put(runner, 0, 3500)
    await asyncio.wait_for(watching, 5)
    assert [n for n in dict.fromkeys(seen) if n >= 0] == [3500, 2500, 1500, 500]
    await runner.shutdown(1)


async def test_a_partial_batch_goes_after_the_timeout(tmp_path):
    exporter = Recording()
    runner, _ = runner_for(exporter, tmp_path, batch={"max_size": 100, "timeout": "50ms"})
    await runner.start()
    await put(runner, 0, 3)
    await eventually(lambda: len(exporter.delivered) == 3, timeout=2)
    await runner.shutdown(1)


async def test_shutdown_drains_what_it_can(tmp_path):
    exporter = Recording()
    runner, _ = runner_for(exporter, tmp_path, batch={"max_size": 100, "timeout": "60s"})
    await runner.start()
    await put(runner, 0, 7)
    await runner.shutdown(5)
    assert len(exporter.delivered) == 7


async def test_shutdown_leaves_undelivered_events_in_the_persistent_queue(tmp_path):
    exporter = Recording(failures=10**6)
    runner, _ = runner_for(exporter, tmp_path)
    await runner.start()
    await put(runner, 0, 4)
    await eventually(lambda: exporter.attempt_ids)
    await runner.shutdown(0.05)
    recovered = Recording()
    runner2, _ = runner_for(recovered, tmp_path)
    await runner2.start()
    await eventually(lambda: len(recovered.delivered) == 4)
    assert recovered.batches[0].id == exporter.attempt_ids[0]  # same batch, same id
    await runner2.shutdown(1)


async def test_memory_queue_is_bounded_by_events(tmp_path):
    exporter = Recording()
    runner, _ = runner_for(exporter, tmp_path, queue={"type": "memory", "max_events": 5})
    assert runner.queue.has_room(Batch([make_event(i) for i in range(50)]))  # when empty
    runner.queue.put_now([make_event(i) for i in range(5)])
    assert not runner.queue.has_room(Batch([make_event(9)]))


def test_backoff_grows_exponentially_within_jitter_and_caps():
    cfg = convert({"retry": {"initial_interval": "1s", "max_interval": "8s", "multiplier": 2,
                             "randomization_factor": 0.5}}, ExporterConfig).retry
    delays = backoff_delays(cfg)
    bounds = [(0.5, 1.5), (1, 3), (2, 6), (4, 12), (4, 12)]
    for lo, hi in bounds:
        assert lo <= next(delays) <= hi


@pytest.mark.parametrize("bad", [{"queue": {"type": "memory", "dir": "x"}},
                                 {"batch": {"max_size": 0}},
                                 {"retry": {"multiplier": 0.5}}])
def test_invalid_delivery_settings_are_refused(bad):
    with pytest.raises(msgspec.ValidationError):
        convert(bad, ExporterConfig)


async def test_one_batch_put_on_two_queues_reaches_both_exporters_unchanged(tmp_path):
    # Two queues taking the same Batch object share its events (one pack for both): both
    # exporters get the events as they were put, and the shared batch is left as it was.
    exporter_a, exporter_b = Recording(), Recording()
    a, _ = runner_for(exporter_a, tmp_path / "a")
    b, _ = runner_for(exporter_b, tmp_path / "b")
    await a.start()
    await b.start()
    shared = Batch([make_event(1)])
    await asyncio.gather(a.put(shared), b.put(shared))
    await eventually(lambda: exporter_a.delivered and exporter_b.delivered)
    assert exporter_a.delivered == exporter_b.delivered == ["evt-00000001"]
    assert exporter_a.batches[0].events == exporter_b.batches[0].events == [make_event(1)]
    assert shared.events == [make_event(1)]
    await a.shutdown(1)
    await b.shutdown(1)


class PartlyStoring(Exporter):
    """Stores a batch's events but those it refuses (never stored) and those busy the
    first time (stored when sent again), as an Elasticsearch bulk answer says per item."""

    def __init__(self, refused, busy):
        self.refused, self.busy = refused, set(busy)
        self.attempts: list[list[str]] = []
        self.stored: list[str] = []

    async def export(self, batch):
        self.attempts.append([e.event_id for e in batch.events])
        failed = [e for e in batch.events if e.event_id in self.refused]
        retry = [e for e in batch.events if e.event_id in self.busy]
        self.busy.clear()
        self.stored += [e.event_id for e in batch.events if e not in failed + retry]
        if failed or retry:
            raise PartialError("some items failed", retry, failed)


async def test_a_partial_error_dead_letters_its_failed_and_resends_only_the_others(tmp_path):
    exporter = PartlyStoring(refused={"evt-00000001"}, busy={"evt-00000002"})
    runner, telemetry = runner_for(exporter, tmp_path, batch={"max_size": 4, "timeout": "1s"})
    await runner.start()
    await put(runner, 0, 4)
    await eventually(lambda: len(exporter.stored) == 3)
    assert exporter.attempts == [[f"evt-0000000{i}" for i in range(4)], ["evt-00000002"]]
    [dead] = list((tmp_path / "queue" / "test" / "dead-letter").glob("*.jsonl"))
    assert [e["event_id"] for e in read_jsonl(dead)] == ["evt-00000001"]
    assert metric_value(telemetry, "meterline_exporter_sent_events_total", exporter="test") == 3
    assert metric_value(telemetry, "meterline_exporter_send_failed_events_total") == 1
    await runner.shutdown(1)
