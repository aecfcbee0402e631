"""Exporter queues: the buffer between the pipeline and one exporter.

A queue holds *records* (what one receiver call handed over, after processors) in
arrival order, and hands *batches* to its single consumer. Positions are
`(record seq, event index)`, so a batch is a contiguous range of the event
stream; its id is derived from that range and the queue's incarnation, which is
what makes the id stable across retries and, for the persistent queue, across
restarts. There is one batch in flight at a time: until it is acked, `take`
hands out the same batch again.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
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
    size: int = 0  # bytes on disk, persistent queue only
    events: list[Event] | None = None  # in memory; None when it must be read from disk
    segment: int = 0
    offset: int = 0


class Queue(ABC):
    """What both queue types share: record bookkeeping, batch forming, waiting."""

    def __init__(self, incarnation: str) -> None:
        self.incarnation = incarnation
        self._records: deque[Record] = deque()
        self._acked: Position = (0, 0)
        self._available = 0  # events not yet taken
        self._queued = 0  # events not yet acked (taken ones included)
        self._replay: tuple[Position, Position] | None = None
        self._inflight: tuple[ExportBatch, Position] | None = None
        self._changed = asyncio.Event()
        self._interrupted = False

    # --- what a subclass provides --------------------------------------------------
    @abstractmethod
    def has_room(self, batch: Batch) -> bool: ...

    @abstractmethod
    def put(self, batch: Batch) -> Awaitable[None]:
        """Store the batch; the awaitable completes once it is as durable as this queue
        makes things. Room is taken at the call itself, before any await, so that a
        `has_room` check made after it (by a concurrent receiver call) counts this batch:
        checks followed by puts with no await between them cannot overshoot the bound."""

    @abstractmethod
    def _events_of(self, record: Record) -> list[Event]: ...

    async def _formed(self, start: Position, end: Position) -> None:  # noqa: B027
        """Hook: a batch [start, end) was formed (persisted by the persistent queue)."""

    async def _acknowledged(self, end: Position, released: list[Record]) -> None:  # noqa: B027
        """Hook: everything before `end` was delivered; `released` records are gone."""

    async def close(self) -> None:  # noqa: B027
        """Release files; whatever is not acked stays for the next start (if durable)."""

    @property
    def durable(self) -> bool:
        return False

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
        self._queued += record.count
        self._changed.set()

    async def wait_for(self, count: int, timeout: float | None) -> None:
        """Wait until `count` events are available, or `timeout` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._available < count and self._replay is None and not self._interrupted:
            self._changed.clear()
            if deadline is None:
                await self._changed.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
            # cancellation that arrives as the wait completes, and the delivery loop then
            # outlives `stop_loop` (a reload hand-over would hang on it)
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return

    def interrupt(self) -> None:
        """Make every `wait_for`, now and later, return at once (shutdown)."""
        self._interrupted = True
        self._changed.set()

    async def take(self, max_events: int) -> ExportBatch | None:
        """Form the next batch (at most `max_events`, unless replaying one formed before
        a restart, which keeps its exact extent and id). None when nothing is available.
        A batch taken but never acked is handed out again."""
        if self._inflight is not None:
            return self._inflight[0]
        start = self._acked
        limit = max_events
        stop: Position | None = None
        if self._replay is not None:
            start, stop = self._replay
            limit = 1 << 62
        events: list[Event] = []
        end = start
        for record in self._records:
            if record.seq < start[0]:
                continue
            first = start[1] if record.seq == start[0] else 0
            last = record.count
            if stop is not None and record.seq == stop[0]:
                last = stop[1]
            last = min(last, first + limit - len(events))
            if last > first:
                chunk = self._events_of(record)
                events.extend(chunk if first == 0 and last == len(chunk) else chunk[first:last])
            end = (record.seq, last)
            if len(events) >= limit or (stop is not None and record.seq >= stop[0]):
                break
        self._replay = None
        if not events:
            return None
        self._available -= len(events)
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
