"""The write-ahead log: what is put survives a reopen; a formed batch keeps its id."""

import errno
import os
import threading

import pytest

from meterline.queue import Batch, QueueWriteError, persistent
from meterline.queue.persistent import PersistentQueue
from tests.helpers import make_event


def events(start, count):
    return [make_event(i) for i in range(start, start + count)]


def open_queue(tmp_path, **kw):
    return PersistentQueue(tmp_path / "q", kw.pop("max_bytes", 1 << 30), **kw)


async def test_put_then_take_returns_the_events_in_order(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 3)))
    await q.put(Batch(events(3, 2)))
    batch = await q.take(10)
    assert [e.event_id for e in batch.events] == [f"evt-{i:08d}" for i in range(5)]
    await q.ack(batch)
    assert len(q) == 0
    await q.close()


async def test_take_respects_the_batch_size_across_records(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 3)))
    await q.put(Batch(events(3, 3)))
    first = await q.take(4)
    assert len(first.events) == 4
    await q.ack(first)
    second = await q.take(4)
    assert [e.event_id for e in second.events] == ["evt-00000004", "evt-00000005"]
    await q.close()


async def test_unacked_events_survive_a_reopen(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 5)))
    await q.put(Batch(events(5, 5)))
    batch = await q.take(3)
    await q.ack(batch)
    await q.close()
    q2 = open_queue(tmp_path)
    assert len(q2) == 7
    rest = await q2.take(100)
    assert [e.event_id for e in rest.events] == [f"evt-{i:08d}" for i in range(3, 10)]
    await q2.close()


async def test_events_are_read_back_from_disk_when_not_cached(tmp_path):
    q = open_queue(tmp_path, cache_bytes=0)
    await q.put(Batch(events(0, 4)))
    batch = await q.take(10)
    assert batch.events == events(0, 4)
    await q.close()


async def test_events_not_cached_are_read_back_off_the_event_loop(tmp_path, monkeypatch):
    """A read may wait for the disk, and unpacking a batch of 10,000 events takes ~20 ms:
    neither is the event loop's to wait for."""
    readers, real = [], persistent.unpack

    def unpack(payload):
        readers.append(threading.current_thread())
        return real(payload)

    q = open_queue(tmp_path, cache_bytes=0)
    await q.put(Batch(events(0, 4)))
    await q.put(Batch(events(4, 2)))
    monkeypatch.setattr(persistent, "unpack", unpack)
    batch = await q.take(5)
    assert batch.events == events(0, 5)
    assert len(readers) == 2 and threading.main_thread() not in readers
    await q.close()


async def test_a_batch_takes_cached_events_and_reads_back_the_rest(tmp_path):
    q = open_queue(tmp_path, cache_bytes=1)  # too small for any record: none cached
    await q.put(Batch(events(0, 3)))
    q.cache_bytes = 1 << 20
    await q.put(Batch(events(3, 3)))  # cached
    first = await q.take(4)
    assert first.events == events(0, 4)
    await q.ack(first)
    second = await q.take(10)
    assert second.events == events(4, 2)
    await q.close()


async def test_a_formed_unacked_batch_is_formed_again_with_the_same_id(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 5)))
    batch = await q.take(3)
    await q.close()  # crash before the ack
    q2 = open_queue(tmp_path)
    await q2.put(Batch(events(5, 5)))
    again = await q2.take(100)
    assert again.id == batch.id
    assert again.events == batch.events
    await q2.ack(again)
    after = await q2.take(100)
    assert after.events[0].event_id == "evt-00000003"
    await q2.close()


async def test_batch_ids_differ_between_queue_directories(tmp_path):
    a = PersistentQueue(tmp_path / "a", 1 << 20)
    b = PersistentQueue(tmp_path / "b", 1 << 20)
    await a.put(Batch(events(0, 1)))
    await b.put(Batch(events(0, 1)))
    assert (await a.take(1)).id != (await b.take(1)).id
    await a.close()
    await b.close()


async def test_a_torn_tail_is_cut_off_and_the_rest_kept(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 2)))
    await q.put(Batch(events(2, 2)))
    await q.close()
    [segment] = sorted((tmp_path / "q").glob("*.seg"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash in the middle of the last write
    q2 = open_queue(tmp_path)
    assert q2.discarded_bytes > 0
    batch = await q2.take(100)
    assert [e.event_id for e in batch.events] == ["evt-00000000", "evt-00000001"]
    await q2.close()


async def test_delivered_segments_are_deleted(tmp_path):
    q = open_queue(tmp_path, segment_bytes=500)
    for i in range(10):
        await q.put(Batch(events(i * 3, 3)))
    assert len(list((tmp_path / "q").glob("*.seg"))) > 2
    while len(q):
        batch = await q.take(4)
        await q.ack(batch)
    [current] = list((tmp_path / "q").glob("*.seg"))  # the one being written, emptied
    assert current.stat().st_size == 0
    await q.close()


async def test_has_room_is_bounded_by_bytes_on_disk(tmp_path):
    q = open_queue(tmp_path, max_bytes=4000)
    batch = Batch(events(0, 5))
    assert q.has_room(batch)
    while q.has_room(batch):
        await q.put(Batch(events(0, 5)))
    assert q.capacity()["bytes"] <= 4000
    taken = await q.take(1000)
    await q.ack(taken)
    assert q.has_room(batch)
    await q.close()


async def test_an_empty_queue_takes_one_batch_larger_than_its_capacity(tmp_path):
    q = open_queue(tmp_path, max_bytes=10)
    assert q.has_room(Batch(events(0, 50)))
    await q.close()


async def test_a_failed_write_keeps_nothing_and_says_why(tmp_path, monkeypatch):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 2)))
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(QueueWriteError, match="No space left"):
        await q.put(Batch(events(2, 2)))
    monkeypatch.setattr(os, "write", real_write)
    await q.put(Batch(events(4, 1)))
    await q.close()
    q2 = open_queue(tmp_path)
    batch = await q2.take(100)
    assert [e.event_id for e in batch.events] == ["evt-00000000", "evt-00000001",
                                                   "evt-00000004"]
    await q2.close()


async def test_concurrent_puts_share_one_write(tmp_path):
    import asyncio

    q = open_queue(tmp_path)
    await asyncio.gather(*(q.put(Batch(events(i, 1))) for i in range(50)))
    assert len(q) == 50
    batch = await q.take(100)
    assert sorted(e.event_id for e in batch.events) == [f"evt-{i:08d}" for i in range(50)]
    await q.close()


async def test_a_batch_not_acked_is_handed_out_again(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 3)))
    first = await q.take(10)
    assert await q.take(10) is first
    await q.ack(first)
    assert await q.take(10) is None
    await q.close()


async def test_a_corrupt_record_in_an_older_segment_cuts_that_segment_there(tmp_path):
    q = open_queue(tmp_path, segment_bytes=300)
    for i in range(4):
        await q.put(Batch(events(i * 2, 2)))
    await q.close()
    first = sorted((tmp_path / "q").glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[30] ^= 0xFF  # flip a byte inside the first record's payload
    first.write_bytes(bytes(data))
    q2 = open_queue(tmp_path)
    assert q2.discarded_bytes > 0
    batch = await q2.take(100)
    assert "evt-00000000" not in [e.event_id for e in batch.events]
    assert batch.events[-1].event_id == "evt-00000007"
    await q2.close()


def segment_files(tmp_path):
    return sorted((tmp_path / "q").glob("*.seg"))


async def test_a_drained_queue_gives_its_segment_space_back(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 3)))
    await q.ack(await q.take(10))
    assert [p.stat().st_size for p in segment_files(tmp_path)] == [0]
    assert q.capacity()["bytes"] == 0
    await q.put(Batch(events(3, 2)))  # written from the start of the emptied segment
    await q.close()
    q2 = open_queue(tmp_path)
    assert [e.event_id for e in (await q2.take(10)).events] == ["evt-00000003", "evt-00000004"]
    await q2.close()


async def test_events_put_after_a_drained_queue_was_reopened_twice_are_delivered(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 3)))
    await q.ack(await q.take(10))
    await q.close()
    await open_queue(tmp_path).close()  # a restart (or reload) with nothing to do
    q = open_queue(tmp_path)
    await q.put(Batch(events(3, 2)))
    assert [e.event_id for e in (await q.take(10)).events] == ["evt-00000003", "evt-00000004"]
    await q.close()
    q = open_queue(tmp_path)
    assert len(q) == 2
    await q.close()


async def test_an_aborted_record_is_not_delivered_after_a_restart(tmp_path):
    q = open_queue(tmp_path)
    aborted, kept = q.stage(Batch(events(0, 2))), q.stage(Batch(events(2, 2)))
    await aborted.wait()
    await kept.wait()
    await aborted.abort()  # not the last record of its segment: named in the journal
    kept.commit()
    assert [e.event_id for e in (await q.take(10)).events] == ["evt-00000002", "evt-00000003"]
    await q.close()
    q2 = open_queue(tmp_path)
    assert [e.event_id for e in (await q2.take(10)).events] == ["evt-00000002", "evt-00000003"]
    await q2.close()
    q3 = open_queue(tmp_path)  # the journal, rewritten at the last start, still says so
    assert len(q3) == 2
    await q3.close()


async def test_an_aborted_record_at_the_end_of_the_segment_gives_its_space_back(tmp_path):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 2)))
    before = q.capacity()["bytes"]
    staged = q.stage(Batch(events(2, 50)))
    await staged.wait()
    await staged.abort()
    assert q.capacity()["bytes"] == before
    assert sum(p.stat().st_size for p in segment_files(tmp_path)) == before
    await q.close()


async def test_a_failed_fsync_keeps_nothing_of_the_write(tmp_path, monkeypatch):
    q = open_queue(tmp_path)
    await q.put(Batch(events(0, 2)))
    real_fsync = os.fsync
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def fsync(fd):
        if failures and os.readlink(f"/proc/self/fd/{fd}").endswith(".seg"):
            raise failures.pop()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(QueueWriteError, match="No space left"):
        await q.put(Batch(events(2, 2)))
    await q.close()
    q2 = open_queue(tmp_path)
    assert [e.event_id for e in (await q2.take(10)).events] == ["evt-00000000", "evt-00000001"]
    await q2.close()
