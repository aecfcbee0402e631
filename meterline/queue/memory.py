"""The in-memory queue: fast, bounded by event count, lost on a crash."""

from __future__ import annotations

import uuid

from meterline.event import Event
from meterline.queue import Batch, Queue, Record


class MemoryQueue(Queue):
    def __init__(self, max_events: int) -> None:
        super().__init__(uuid.uuid4().hex[:12])
        self.max_events = max_events

    def has_room(self, batch: Batch) -> bool:
        held = self._queued + self._staged_events
        return held == 0 or held + len(batch) <= self.max_events

    def _store(self, seq: int, batch: Batch) -> Record:
        # its packed size, which batches are bounded by (packed once for every queue; the
        # workers hand their results over packed already)
        return Record(seq, len(batch), len(batch.packed), events=batch.events)

    def put_now(self, events: list[Event]) -> None:
        self.stage(Batch(events)).commit()

    def _events_of(self, record: Record) -> list[Event]:
        assert record.events is not None
        return record.events

    def capacity(self) -> dict[str, float]:
        return {"capacity_events": self.max_events}
