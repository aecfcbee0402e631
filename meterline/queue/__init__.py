"""Exporter queues: the buffer between the pipeline and one exporter.

A queue holds *records* (what one receiver call handed over, after processors) in
arrival order, and hands *batches* to its single consumer. Positions are
`(record seq, event index)`, so a batch is a contiguous range of the event
stream; its id is derived from that range and the queue's incarnation, which is
what makes the id stable across retries and, for the persistent queue, across
restarts. There is one batch in flight at a time: until it is acked, `take`
hands out the same batch again.

A batch bound for several queues goes into all of them or into none (`put_all`):
each queue first *stages* it (takes its room and stores it, durably for the
persistent queue, but does not hand it to its consumer), and only once every
queue has stored it are all the stages committed; if one queue fails, the others
take their copy back (the persistent queue durably, before the caller hears of
the failure). Staged batches reach the consumer in the order they were staged.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.component import ExportBatch
from meterline.event import Event, pack

Position = tuple[int, int]  # (record seq, index of the next event in it)


class QueueFull(Exception):
    """The queue has no room for this batch; nothing was written."""


class QueueWriteError(Exception):
    """The queue could not store the batch (e.g. the disk is full); nothing was kept."""


class Batch:
    """Events on their way into one or more queues; packs them once for all of them."""

    __slots__ = ("_packed", "events")

    def __init__(self, events: list[Event], packed: bytes | None = None) -> None:
        self.events = events
        self._packed = packed  # when given, must be `pack(events)`

    def __len__(self) -> int:
        return len(self.events)

    @property
    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = pack(self.events)
        return self._packed


@dataclass(slots=True)
class Record:
    seq: int
    count: int
    size: int = 0  # bytes of its events packed (persistent queue: the record on disk)
    events: list[Event] | None = None  # in memory; None when it must be read from disk
    segment: int = 0
    offset: int = 0

    def share(self, first: int, last: int) -> int:
        """The bytes of events [first, last): the size spread over the events, a whole
        number each, adding up to the size (so what is taken and left stays exact)."""
        if not self.count:
            return 0
        return self.size * last // self.count - self.size * first // self.count

    def fitting(self, first: int, budget: int) -> int:
        """The end of the longest run of events from `first` whose share is at most
        `budget` bytes (`first` itself when not even one event fits)."""
        if self.size == 0 or self.count == 0:
            return self.count
        below = self.size * first // self.count + budget + 1  # shares end below this
        return min(self.count, (below * self.count - 1) // self.size)


_PENDING, _COMMITTED, _ABORTED = 0, 1, 2


class Staged:
    """A batch stored in one queue but not yet handed to its consumer. Every staged
    batch must end committed or aborted (`put_all` sees to it): until then, the batches
    staged after it in the same queue wait too."""

    __slots__ = ("_write", "count", "queue", "record", "seq", "state")

    def __init__(self, queue: Queue, seq: int, count: int,
                 write: Record | Awaitable[Record]) -> None:
        self.queue = queue
        self.seq = seq
        self.count = count
        self.state = _PENDING
        self.record: Record | None = write if isinstance(write, Record) else None
        self._write = None if isinstance(write, Record) else write

    @property
    def written(self) -> bool:
        return self.record is not None

    async def wait(self) -> None:
        """Until the batch is stored; QueueWriteError when it could not be."""
        if self.record is None:
            assert self._write is not None
            self.record = await self._write

    def commit(self) -> None:
        assert self.record is not None and self.state == _PENDING
        self.state = _COMMITTED
        self.queue._settle_staged()

    async def abort(self) -> None:
        """Take the batch back: it is never delivered (for the persistent queue, not
        after a restart either, once this returns)."""
        if self.state != _PENDING:
            return
        try:
            if self.record is None:
                with contextlib.suppress(Exception):
                    await self.wait()  # a write still in progress must not outlive this
            if self.record is not None:
                await self.queue._cancel(self.record)
        finally:
            self.state = _ABORTED
            self.queue._settle_staged()


class Queue(ABC):
    """What both queue types share: record bookkeeping, batch forming, waiting."""

    def __init__(self, incarnation: str) -> None:
        self.incarnation = incarnation
        self._records: deque[Record] = deque()
        self._acked: Position = (0, 0)
        self._seq = 0  # of the last record staged
        self._available = 0  # events not yet taken
        self._available_bytes = 0  # their share of their records' sizes
        self._queued = 0  # events not yet acked (taken ones included)
        self._staging: deque[Staged] = deque()  # in seq order
        self._staged_events = 0  # events staged, not yet appended (or dropped)
        self._unstaged = asyncio.Event()  # set while nothing is staged
        self._unstaged.set()
        self._replay: tuple[Position, Position] | None = None
        self._inflight: tuple[ExportBatch, Position] | None = None
        self._changed = asyncio.Event()
        # what the consumer's `wait_for` waits for (events, bytes): appends short of it
        # do not wake it (with single-event batches, each did, in every exporter)
        self._wanted: tuple[int, int | None] = (0, None)
        self._interrupted = False
        self.discarded_bytes = 0  # torn or corrupt tails cut off when opening (durable queues)

    # --- what a subclass provides --------------------------------------------------
    @abstractmethod
    def has_room(self, batch: Batch) -> bool:
        """Whether the batch fits, counting what is staged (see `stage`)."""

    @abstractmethod
    def _store(self, seq: int, batch: Batch) -> Record | Awaitable[Record]:
        """Start storing the batch as record `seq`: its room is taken now, before any
        await. The record, or an awaitable of it that completes once the record is as
        durable as this queue makes things (QueueWriteError if it cannot be)."""

    async def _cancel(self, record: Record) -> None:  # noqa: B027
        """Hook: a stored record was aborted; it must never be delivered."""

    @abstractmethod
    def _events_of(self, record: Record) -> list[Event]: ...

    async def _read_back(self, records: list[Record]) -> dict[int, list[Event]]:
        """The events of `records`, which are not kept in memory, by record seq: what the
        consumer takes next (the persistent queue reads them off the event loop)."""
        return self._events_by_seq(records)

    def _events_by_seq(self, records: list[Record]) -> dict[int, list[Event]]:
        return {record.seq: self._events_of(record) for record in records}

    async def _formed(self, start: Position, end: Position) -> None:  # noqa: B027
        """Hook: a batch [start, end) was formed (persisted by the persistent queue)."""

    async def _acknowledged(self, end: Position, released: list[Record]) -> None:  # noqa: B027
        """Hook: everything before `end` was delivered; `released` records are gone."""

    async def close(self) -> None:  # noqa: B027
        """Release files; whatever is not acked stays for the next start (if durable)."""

    @property
    def durable(self) -> bool:
        """Whether what it holds outlives the process (else it is handed over on reload,
        see `untaken`, and lost on a crash)."""
        return False

    @property
    def dead_letter_dir(self) -> Path | None:
        """Where batches given up on are written (None: nowhere, they are only logged)."""
        return None

    def capacity(self) -> dict[str, float]:
        """Figures for self-telemetry: size and capacity in the queue's own units."""
        return {}

    # --- shared --------------------------------------------------------------------
    def __len__(self) -> int:
        """Events waiting to be delivered (the batch in flight included)."""
        return self._queued

    @property
    def available(self) -> int:
        """Events not yet handed to the consumer."""
        return self._available

    def _appended(self, record: Record) -> None:
        self._records.append(record)
        self._available += record.count
        self._available_bytes += record.share(0, record.count)
        self._queued += record.count
        count, max_bytes = self._wanted
        if self._available >= count or (
                max_bytes is not None and self._available_bytes >= max_bytes):
            self._changed.set()

    def stage(self, batch: Batch) -> Staged:
        """Take room for the batch now (a `has_room` check made after this counts it)
        and start storing it; the consumer sees it once it is committed. See `put_all`."""
        self._seq += 1
        staged = Staged(self, self._seq, len(batch), self._store(self._seq, batch))
        self._staging.append(staged)
        self._staged_events += staged.count
        self._unstaged.clear()
        return staged

    def put(self, batch: Batch) -> Awaitable[None]:
        """Store the batch in this queue alone: `put_all` of one stage. Room is taken at
        the call itself, before any await, so that checks followed by puts with no await
        between them cannot overshoot the bound."""
        return put_all([self.stage(batch)])

    def _settle_staged(self) -> None:
        """Hand committed stages to the consumer, in seq order; forget aborted ones."""
        staging = self._staging
        while staging and staging[0].state != _PENDING:
            staged = staging.popleft()
            self._staged_events -= staged.count
            if staged.state == _COMMITTED:
                assert staged.record is not None
                self._appended(staged.record)
        if not staging:
            self._unstaged.set()

    async def _until_unstaged(self, timeout: float = 10.0) -> None:
        """Wait (a bounded time) for stages in progress to be committed or aborted."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._unstaged.wait()

    async def wait_for(self, count: int, timeout: float | None,
                       max_bytes: int | None = None) -> None:
        """Wait until `count` events, or `max_bytes` of them, are available, or `timeout`
        seconds pass. (One consumer waits at a time: the exporter's delivery loop.)"""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._wanted = (count, max_bytes)
        try:
            while self._available < count and self._replay is None and not self._interrupted \
                    and (max_bytes is None or self._available_bytes < max_bytes):
                self._changed.clear()
                if deadline is None:
                    await self._changed.wait()
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the wait completes, and the delivery loop
                # then outlives `stop_loop` (a reload hand-over would hang on it)
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    return
        finally:
            self._wanted = (0, None)

    def interrupt(self) -> None:
        """Make every `wait_for`, now and later, return at once (shutdown)."""
        self._interrupted = True
        self._changed.set()

    async def take(self, max_events: int, max_bytes: int | None = None) -> ExportBatch | None:
        """Form the next batch: at most `max_events`, and at most `max_bytes` of them by
        their packed size but never less than one event, unless replaying one formed
        before a restart, which keeps its exact extent and id. None when nothing is
        available. A batch taken but never acked is handed out again."""
        if self._inflight is not None:
            return self._inflight[0]
        start = self._acked
        limit = max_events
        budget = max_bytes
        stop: Position | None = None
        if self._replay is not None:
            start, stop = self._replay
            limit, budget = 1 << 62, None
        parts: list[tuple[Record, int, int]] = []  # the events [first, last) of records
        count = 0
        taken = 0  # bytes
        end = start
        for record in self._records:
            if record.seq < start[0]:
                continue
            first = start[1] if record.seq == start[0] else 0
            last = record.count
            if stop is not None and record.seq == stop[0]:
                last = stop[1]
            last = min(last, first + limit - count)
            fits = last if budget is None else record.fitting(first, budget - taken)
            full = fits < last  # the bytes end the batch inside this record
            if full:
                last = max(fits, first + (not count))  # the first event goes, whatever its size
                if last == first:
                    break
            if last > first:
                parts.append((record, first, last))
                count += last - first
                taken += record.share(first, last)
            end = (record.seq, last)
            if full or count >= limit or (stop is not None and record.seq >= stop[0]):
                break
        self._replay = None
        if not parts:
            return None
        # (the records stay while awaited: only `ack`, this consumer's, removes them)
        read = await self._read_back([r for r, _, _ in parts if r.events is None])
        events: list[Event] = []
        for record, first, last in parts:
            chunk = record.events if record.events is not None else read[record.seq]
            events.extend(chunk if first == 0 and last == len(chunk) else chunk[first:last])
        self._available -= len(events)
        self._available_bytes -= taken
        batch = ExportBatch(f"{self.incarnation}:{start[0]}.{start[1]}-{end[0]}.{end[1]}", events)
        self._inflight = (batch, end)
        await self._formed(start, end)
        return batch

    async def ack(self, batch: ExportBatch) -> None:
        """The batch was delivered (or given up on): release its events."""
        assert self._inflight is not None and self._inflight[0] is batch
        end = self._inflight[1]
        self._inflight = None
        self._acked = end
        self._queued -= len(batch.events)
        released: list[Record] = []
        while self._records and (
            self._records[0].seq < end[0]
            or (self._records[0].seq == end[0] and end[1] >= self._records[0].count)
        ):
            released.append(self._records.popleft())
        await self._acknowledged(end, released)

    def untaken(self) -> list[list[Event]]:
        """Events not yet delivered, in order, the batch in flight included (for handing
        a memory queue's contents over to its replacement on reload)."""
        out: list[list[Event]] = []
        for record in self._records:
            events = self._events_of(record)
            if record.seq == self._acked[0]:
                events = events[self._acked[1]:]
            if events:
                out.append(events)
        return out

    def describe(self) -> dict[str, Any]:
        return {"events": len(self), **self.capacity()}


def put_all(staged: list[Staged]) -> Awaitable[None]:
    """Store a batch in every queue it was staged in, or in none.

    Completes once every stage is stored, and then commits them all; if one could
    not be stored, the others are aborted (durably) before the QueueWriteError is
    raised, so nothing of the batch is delivered anywhere. The outcome is settled
    even if the caller is cancelled meanwhile. Stages already stored (memory
    queues) are committed at once, without a task."""
    if all(s.written for s in staged):
        for s in staged:
            s.commit()
        return _done()
    task = asyncio.ensure_future(_settle(staged))
    task.add_done_callback(_retrieve)
    return asyncio.shield(task)


async def abort_all(staged: list[Staged]) -> None:
    """Take back stages that will not be committed (once each is stored or failed)."""
    await asyncio.gather(*(s.wait() for s in staged), return_exceptions=True)
    await asyncio.gather(*(s.abort() for s in staged), return_exceptions=True)


async def _settle(staged: list[Staged]) -> None:
    results = await asyncio.gather(*(s.wait() for s in staged), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed:
        for s in staged:
            s.commit()
        return
    rollback = await asyncio.gather(*(s.abort() for s in staged), return_exceptions=True)
    error = failed[0]
    undone = [r for r in rollback if isinstance(r, BaseException)]
    if undone:
        raise QueueWriteError(f"{error}; taking the batch back from the other queues "
                              f"failed too (it may be delivered after a restart): "
                              f"{undone[0]}") from error
    if isinstance(error, QueueWriteError):
        raise error
    raise QueueWriteError(f"cannot queue the batch: {error!r}") from error


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark the outcome as seen, for a caller that was cancelled meanwhile."""
    if not task.cancelled():
        task.exception()


async def _done() -> None:
    return None
