"""The event ids seen lately, to count or take an event once when it comes again.

Used by the `otlp` receiver (a call sent both as a span and as a log record is one
event) and by the `prometheus` exporter (a batch a client re-sends after a timeout
counts once, as ClickHouse stores it once). The memory is bounded: the oldest ids
are forgotten first, so a duplicate is caught only while its first copy is among the
last `size` ids seen.
"""

from __future__ import annotations

from collections import OrderedDict

from meterline.event import Event


class RecentIds:
    """The event ids of the latest events taken, at most `size` of them (oldest
    forgotten first); `size` 0 remembers nothing and takes every event."""

    def __init__(self, size: int) -> None:
        self.size = size
        # an OrderedDict forgets its oldest entry in O(1); a plain dict's first key is
        # found by scanning past the deleted ones, which makes a full memory quadratic
        self.ids: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.ids)

    def claim(self, events: list[Event]) -> tuple[list[Event], list[str]]:
        """The events whose id is new (within `events` too), and their ids, now
        remembered; `release` them if the events were not taken after all."""
        if not self.size:
            return events, []
        ids = [event.event_id for event in events]
        fresh = self.claim_ids(ids)
        return [events[i] for i in fresh], [ids[i] for i in fresh]

    def claim_ids(self, ids: list[str]) -> list[int]:
        """The positions in `ids` of those that are new (within `ids` too), now
        remembered: for events known by their ids alone (decoded in a worker process)."""
        if not self.size:
            return list(range(len(ids)))
        seen = self.ids
        fresh = []
        for position, event_id in enumerate(ids):
            if event_id not in seen:
                seen[event_id] = None
                fresh.append(position)
        for _ in range(len(seen) - self.size):
            seen.popitem(last=False)
        return fresh

    def release(self, claimed: list[str]) -> None:
        """Forget ids claimed for events that were not taken after all."""
        pop = self.ids.pop
        for event_id in claimed:
            pop(event_id, None)
