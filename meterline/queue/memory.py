"""The in-memory queue: fast, bounded by event count, lost on a crash."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable

from meterline.event import Event
from meterline.queue import Batch, Queue, Record


class MemoryQueue(Queue):
    def __init__(self, max_events: int) -> None:
        super().__init__(uuid.uuid4().hex[:12])
        self.max_events = max_events
        self._seq = 0

    def has_room(self, batch: Batch) -> bool:
        return self._queued == 0 or self._queued + len(batch) <= self.max_events

    def put(self, batch: Batch) -> Awaitable[None]:
        self.put_now(batch.events)
        return _done()

    def put_now(self, events: list[Event]) -> None:
        self._seq += 1
        self._appended(Record(self._seq, len(events), events=events))

    def _events_of(self, record: Record) -> list[Event]:
        assert record.events is not None
        return record.events

    def capacity(self) -> dict[str, float]:
        return {"capacity_events": self.max_events}


async def _done() -> None:
    return None
