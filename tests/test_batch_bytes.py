"""Batches are bounded by bytes as well as by events: a backlog of long prompts is sent in
batches an exporter can hold, every event once and in order, and a batch never waits for
more once its bytes are there."""

import asyncio

import msgspec
import pytest

from meterline.config import convert
from meterline.delivery import BatchConfig
from meterline.event import pack
from meterline.queue import Batch, Queue
from meterline.queue.memory import MemoryQueue
from meterline.queue.persistent import PersistentQueue
from tests.helpers import long_prompts, make_event
from tests.test_delivery import Recording, runner_for

PROMPT_BYTES = 20_000


def ids(events) -> list[str]:
    return [e.event_id for e in events]


@pytest.fixture(params=["memory", "persistent"])
def queue(request, tmp_path) -> Queue:
    if request.param == "memory":
        return MemoryQueue(1000)
    return PersistentQueue(tmp_path / "q", 1 << 30)


async def drain(queue: Queue, max_events: int, max_bytes: int) -> list[list]:
    batches = []
    while (batch := await queue.take(max_events, max_bytes)) is not None:
        batches.append(batch.events)
        await queue.ack(batch)
    return batches


async def test_a_backlog_is_cut_into_batches_of_at_most_max_bytes(queue):
    await queue.put(Batch(long_prompts(10, PROMPT_BYTES, 0)))
    await queue.put(Batch(long_prompts(10, PROMPT_BYTES, 10)))
    bound = 3 * PROMPT_BYTES + 1000  # three events of the backlog, not four
    batches = await drain(queue, 10_000, bound)
    assert ids(e for b in batches for e in b) == ids(long_prompts(20, PROMPT_BYTES, 0))
    assert all(len(pack(b)) <= bound for b in batches)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 3, 2]  # across records, cut inside


async def test_the_event_count_still_bounds_a_batch_of_small_events(queue):
    await queue.put(Batch([make_event(i) for i in range(10)]))
    batches = await drain(queue, 4, 1 << 20)
    assert [len(b) for b in batches] == [4, 4, 2]


async def test_an_event_larger_than_the_bound_is_sent_alone(queue):
    await queue.put(Batch(long_prompts(2, PROMPT_BYTES, 0)))
    batches = await drain(queue, 100, PROMPT_BYTES // 2)
    assert [ids(b) for b in batches] == [["evt-00000000"], ["evt-00000001"]]


async def test_a_batch_taken_again_before_its_ack_is_the_same_batch(queue):
    await queue.put(Batch(long_prompts(5, PROMPT_BYTES, 0)))
    first = await queue.take(100, 2 * PROMPT_BYTES + 1000)
    again = await queue.take(100, 10 * PROMPT_BYTES)
    assert again is first and len(first.events) == 2


async def test_a_reopened_queue_bounds_the_rest_of_a_partly_sent_record(tmp_path):
    q = PersistentQueue(tmp_path / "q", 1 << 30)
    await q.put(Batch(long_prompts(8, PROMPT_BYTES, 0)))
    await q.ack(await q.take(100, 3 * PROMPT_BYTES + 1000))
    await q.close()
    reopened = PersistentQueue(tmp_path / "q", 1 << 30)
    batches = await drain(reopened, 100, 3 * PROMPT_BYTES + 1000)
    assert [ids(b) for b in batches] == [ids(long_prompts(3, PROMPT_BYTES, 3)),
                                         ids(long_prompts(2, PROMPT_BYTES, 6))]
    await reopened.close()


async def test_a_batch_whose_bytes_are_there_is_sent_without_waiting_for_the_timeout(tmp_path):
    exporter = Recording()
    runner, _ = runner_for(exporter, tmp_path, batch={"max_size": 10_000, "timeout": "60s",
                                                      "max_size_mb": 0.05})
    await runner.start()
    await runner.put(Batch(long_prompts(4, PROMPT_BYTES, 0)))  # 80 KB: more than one batch's bytes
    async with asyncio.timeout(5):
        while len(exporter.delivered) < 2:
            await asyncio.sleep(0.01)
    assert exporter.delivered[:2] == ["evt-00000000", "evt-00000001"]
    assert len(exporter.batches[0].events) == 2
    await runner.shutdown(1)


def test_a_batch_bound_of_no_bytes_is_refused():
    with pytest.raises(msgspec.ValidationError, match="max_size_mb must be positive"):
        convert({"max_size_mb": 0}, BatchConfig)


async def test_an_empty_record_takes_no_bytes_and_is_passed_over(queue):
    await queue.put(Batch([]))
    await queue.put(Batch(long_prompts(2, PROMPT_BYTES, 0)))
    batches = await drain(queue, 100, PROMPT_BYTES + 1000)
    assert [ids(b) for b in batches] == [["evt-00000000"], ["evt-00000001"]]
    with pytest.raises(TimeoutError):  # no bytes are left counted: a wait for one waits
        await asyncio.wait_for(queue.wait_for(1, None, max_bytes=1), 0.1)


async def test_a_wait_for_a_batch_returns_once_its_events_are_there_and_not_before(queue):
    waiting = asyncio.create_task(queue.wait_for(3, None))
    for n in range(2):
        await queue.put(Batch([make_event(n)]))
        await asyncio.sleep(0.01)
        assert not waiting.done()
    await queue.put(Batch([make_event(2)]))
    await asyncio.wait_for(waiting, 1)


async def test_a_wait_for_a_batch_returns_once_its_bytes_are_there(queue):
    waiting = asyncio.create_task(queue.wait_for(1000, None, max_bytes=2 * PROMPT_BYTES))
    await queue.put(Batch(long_prompts(1, PROMPT_BYTES, 0)))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await queue.put(Batch(long_prompts(1, PROMPT_BYTES, 1)))
    await asyncio.wait_for(waiting, 1)


async def test_events_appended_after_a_wait_timed_out_are_seen_by_the_next_wait(queue):
    await queue.wait_for(5, 0.01)  # times out, nothing there
    await queue.put(Batch([make_event(0)]))
    await asyncio.wait_for(queue.wait_for(1, None), 1)
