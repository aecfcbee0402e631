"""The data path: receiver -> processors -> fan-out into every exporter's queue.

`Entry` is what a receiver holds as its consumer. It stays the same object across
a reload while the pipelines behind it are swapped, so a listener that did not
change keeps running. A batch is checked against every queue it is bound for
before any of them takes it: either all take it (and `consume` returns once it
is durable) or none does and the receiver is told to push back. The same holds
when a queue cannot store it (a full disk): the queues that stored it take it
back (`meterline.queue.put_all`) before the receiver hears of the failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from dataclasses import dataclass, field

from meterline.component import (
    Backpressure,
    Decode,
    Decoded,
    Processor,
    Received,
    decode_packed,
    run_processors,
)
from meterline.delivery import ExporterRunner
from meterline.event import Event, clone, pack, unpack
from meterline.filtering import Filter
from meterline.memory import MemoryLimiter
from meterline.queue import Batch, QueueWriteError, Staged, abort_all, put_all
from meterline.recent import RecentIds
from meterline.telemetry import Telemetry
from meterline.workers import Processed, ProcessorPool


class Tap:
    """A live view of the events leaving the processors (`meterline tap`). What its reader
    has not taken yet is bounded in bytes (the events' packed size), not in batches: the
    events it holds stay in memory after the queues let them go, and a batch may be one
    event or 10,000 of 1 MB. Past the bound, batches are missed (`dropped` counts their
    events); one is always taken when nothing is pending, however large."""

    def __init__(self, filter_: Filter, max_pending_bytes: int = 32 << 20) -> None:
        self.filter = filter_
        self.max_pending_bytes = max_pending_bytes
        self.pending_bytes = 0
        self._pending: asyncio.Queue[tuple[list[Event], int]] = asyncio.Queue()
        self.dropped = 0  # events a slow reader missed

    def offer(self, events: list[Event], size: int) -> None:
        """`events` (`size` bytes packed), those of them the filter keeps, if there is room."""
        kept = self.filter.apply(events)
        if not kept:
            return
        share = size * len(kept) // len(events)
        if self.pending_bytes + share > self.max_pending_bytes and not self._pending.empty():
            self.dropped += len(kept)
            return
        self.pending_bytes += share
        self._pending.put_nowait((kept, share))

    async def take(self) -> list[Event]:
        """The oldest batch not taken yet (waiting for one)."""
        kept, share = await self._pending.get()
        self.pending_bytes -= share
        return kept


@dataclass
class Taps:
    active: set[Tap] = field(default_factory=set)

    def publish(self, events: list[Event], packed: bytes | None) -> None:
        """`events` to every tap; `packed`, their msgpack form, gives their size (packed
        here when the processors ran inline, only while a tap is open)."""
        size = len(packed if packed is not None else pack(events))
        for tap in self.active:
            tap.offer(events, size)


class Pipeline:
    def __init__(self, name: str, processors: list[tuple[str, Processor]],
                 exporters: list[ExporterRunner], telemetry: Telemetry, taps: Taps) -> None:
        self.name = name
        self.processors = processors
        self.exporters = exporters
        self.telemetry = telemetry
        self.taps = taps

    def process(self, events: list[Event]) -> list[Event]:
        """Run the processors here, on the calling thread (`service.workers: 1`)."""
        events, counts = run_processors(self.processors, events)
        for pid, before, after in counts:
            self.count(pid, before, after)
        return events

    def count(self, pid: str, before: int, after: int) -> None:
        """Self-telemetry of one processor's pass over a batch, wherever it ran."""
        attrs = {"processor": pid, "pipeline": self.name}
        self.telemetry.processor_incoming.add(before, attrs)
        if after != before:
            self.telemetry.processor_dropped.add(before - after, attrs)

    def route(self, events: list[Event],
              packed: bytes | None = None) -> list[tuple[ExporterRunner, Batch]]:
        """Pick what each exporter takes of the processed `events` (`packed`, when given,
        is their msgpack form, reused by the queues that take them all)."""
        if not events:
            return []
        if self.taps.active:
            self.taps.publish(events, packed)
        shared = Batch(events, packed)
        routes = []
        for runner in self.exporters:
            selected = runner.select(events)
            if selected:
                routes.append((runner, shared if selected is events else Batch(selected)))
        return routes


class Flow:
    """Counts batches in flight so a reload can pause intake and wait for quiet."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def enter(self) -> None:
        while not self.open.is_set():
            await self.open.wait()
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def pause(self) -> None:
        self.open.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self.open.set()


class Entry:
    """The consumer a receiver hands batches to (see `meterline.component.Consumer`)."""

    def __init__(self, receiver_id: str, flow: Flow, telemetry: Telemetry,
                 pool: ProcessorPool | None = None,
                 limiter: MemoryLimiter | None = None) -> None:
        self.receiver_id = receiver_id
        self.flow = flow
        self.telemetry = telemetry
        self.pool = pool  # worker processes for the processors; None runs them inline
        self.limiter = limiter  # refuses batches while the daemon's memory is high
        self.pipelines: list[Pipeline] = []
        self._attrs = {"receiver": receiver_id}

    async def consume(self, events: list[Event]) -> None:
        if not events:
            return
        self._admit(len(events))
        await self.flow.enter()
        try:
            await self._queue(len(events), await self._processed(events))
        finally:
            self.flow.leave()
        self.telemetry.receiver_accepted.add(len(events), self._attrs)

    async def consume_encoded(self, decode: Decode, body: bytes,
                              once: RecentIds | None = None) -> Received:
        claimed: list[str] = []  # (ids `once` now holds, released if nothing is queued)
        await self.flow.enter()
        try:
            # The memory limiter is consulted once the number of events is known: after
            # the processors, but between a body's two trips when it is taken once.
            names = [p.name for p in self.pipelines]
            if self.pool is None:
                decoded = decode(body)
                received = decoded.received()
                if once is not None:
                    decoded, received, claimed = _taken_once(decoded, once)
                processed = self._processed_here(decoded.events) if decoded.events else []
                self._admit(received.accepted)
            elif once is None:
                results, received = await self.pool.process_encoded(names, decode, body)
                processed = self._unpacked(results) if received.accepted else []
                self._admit(received.accepted)
            else:  # (two round trips: decoded, then what is new of it processed)
                rest, packed, received, claimed = await self._decoded_once(decode, body, once)
                self._admit(received.accepted)
                processed = []
                if received.accepted and not self._runs_processors:
                    processed = self._processed_here(rest(packed).events)  # (nothing to run)
                elif received.accepted:
                    results, _ = await self.pool.process_encoded(names, rest, packed)
                    processed = self._unpacked(results)
            if received.accepted:
                await self._queue(received.accepted, processed)
        except BaseException:
            if once is not None:
                once.release(claimed)  # not taken: the client sends them again
            raise
        finally:
            self.flow.leave()
        if received.accepted:
            self.telemetry.receiver_accepted.add(received.accepted, self._attrs)
        return received

    async def _decoded_once(self, decode: Decode, body: bytes, once: RecentIds
                            ) -> tuple[Decode, bytes, Received, list[str]]:
        """A body whose events are taken once, decoded in a worker and not processed: the
        ids come back here to be claimed before any processor sees an event. Returns the
        decoder and body of the events left (packed: a worker processes them next), what
        became of the body's items, and the ids claimed."""
        assert self.pool is not None
        unprocessed = await self.pool.decode(decode, body)
        keep, received, claimed = _claimed(once, unprocessed.ids, unprocessed.received)
        everything = len(keep) == len(unprocessed.ids)
        return (functools.partial(decode_packed, None if everything else keep),
                unprocessed.packed, received, claimed)

    @property
    def _runs_processors(self) -> bool:
        """Whether any pipeline of the receiver has a processor (else a batch stays here:
        a worker's round trip would only pack and unpack it)."""
        return any(p.processors for p in self.pipelines)

    def _admit(self, count: int) -> None:
        """Refuse `count` events (`Backpressure`) while the daemon's memory is high (none
        to refuse: nothing to do)."""
        if count and self.limiter is not None and self.limiter.should_refuse():
            self.refused(count, "memory_limit")
            raise self.limiter.refusal(count, self.receiver_id)

    async def _queue(self, count: int,
                     processed: list[tuple[Pipeline, list[Event], bytes | None]]) -> None:
        """Each pipeline's processed events into its exporters' queues: in every queue or
        in none (`count`: the events received, for the refusal's count: `backpressure`, or
        `unavailable` when a queue cannot be written, whichever receiver hands them)."""
        routes: list[tuple[ExporterRunner, Batch]] = []
        for pipeline, events, packed in processed:
            routes.extend(pipeline.route(events, packed))
        for runner, batch in routes:
            if not runner.drops_when_full and not runner.queue.has_room(batch):
                self.refused(count, "backpressure")
                raise Backpressure(f"the queue of exporter {runner.id} is full")
        # no await between the checks above and the stages below, and each stage
        # takes its room at once: a concurrent call checks against these batches too
        staged: list[Staged] = []
        try:
            for runner, batch in routes:
                if runner.queue.has_room(batch):
                    staged.append(runner.stage(batch))
                else:
                    runner.count_dropped(len(batch))
        except BaseException:
            await abort_all(staged)
            raise
        # every queue stores the batch, or none keeps it (QueueWriteError)
        try:
            await put_all(staged)
        except QueueWriteError:
            self.refused(count, "unavailable")
            raise

    async def _processed(
            self, events: list[Event]) -> list[tuple[Pipeline, list[Event], bytes | None]]:
        """Each pipeline's processed copy of `events`, in a worker process when there is
        a pool (the loop only awaits it), else here; here too when no pipeline has a
        processor."""
        if self.pool is None or not self._runs_processors:
            return self._processed_here(events)
        try:
            results = await self.pool.process([p.name for p in self.pipelines], events)
        except Backpressure:
            self.refused(len(events), "worker_restart")
            raise
        return self._unpacked(results)

    def _processed_here(
            self, events: list[Event]) -> list[tuple[Pipeline, list[Event], bytes | None]]:
        last = len(self.pipelines) - 1
        return [(p, p.process(events if i == last else clone(events)), None)
                for i, p in enumerate(self.pipelines)]

    def _unpacked(self, results: list[Processed]
                  ) -> list[tuple[Pipeline, list[Event], bytes | None]]:
        """A worker's results, by pipeline: the processed events, and as packed."""
        out: list[tuple[Pipeline, list[Event], bytes | None]] = []
        for pipeline, result in zip(self.pipelines, results, strict=True):
            for pid, before, after in result.counts:
                pipeline.count(pid, before, after)
            out.append((pipeline, unpack(result.packed), result.packed))
        return out

    def refused(self, count: int, reason: str) -> None:
        """Count events the receiver could not take (undecodable, pushed back...)."""
        self.telemetry.receiver_refused.add(count, {**self._attrs, "reason": reason})


def _taken_once(decoded: Decoded, once: RecentIds) -> tuple[Decoded, Received, list[str]]:
    """`decoded` without the events whose ids `once` holds, what became of its items, and
    the ids claimed (those of the events kept)."""
    keep, received, claimed = _claimed(once, [e.event_id for e in decoded.events],
                                       decoded.received())
    kept = Decoded([decoded.events[i] for i in keep], decoded.rejected, decoded.skipped)
    return kept, received, claimed


def _claimed(once: RecentIds, ids: list[str], received: Received
             ) -> tuple[list[int], Received, list[str]]:
    """Claim the events' `ids` in `once`: the positions of the new ones, what became of the
    body's items (`received`, its duplicates left out), and the ids claimed."""
    keep = once.claim_ids(ids)
    received = dataclasses.replace(received, accepted=len(keep),
                                   duplicates=len(ids) - len(keep))
    return keep, received, [ids[i] for i in keep]
