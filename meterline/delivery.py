"""Delivery, written once for every exporter: its queue, batching and retries.

Every exporter's config class derives from `ExporterConfig`, so `queue`, `batch`,
`retry` and `filtering` read the same everywhere. An `ExporterRunner` owns one
exporter: the pipeline puts events into its queue, and its loop forms batches,
sends them with exponential backoff and jitter, and acks them. A batch that fails
permanently (or exhausts `max_elapsed_time`) is written to the queue's
dead-letter directory as JSON lines when the queue is persistent, so nothing
acknowledged is silently lost; the file receiver can replay it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from meterline import logs
from meterline.backoff import exponential
from meterline.component import (
    Config,
    Context,
    ExportBatch,
    Exporter,
    PartialError,
    PermanentError,
    RetryableError,
    cancel_and_wait,
)
from meterline.content import Policy, enforcer
from meterline.event import Event, to_jsonl
from meterline.filtering import Filter
from meterline.projection import Projection
from meterline.queue import Batch, Queue, Staged
from meterline.queue.memory import MemoryQueue
from meterline.queue.persistent import PersistentQueue
from meterline.telemetry import Telemetry
from meterline.units import Duration

R = TypeVar("R")  # an exporter's request


class QueueConfig(Config):
    # persistent: a write-ahead log on disk; memory: held in memory, lost on a crash
    type: Literal["memory", "persistent"] = "persistent"
    dir: str | None = None  # persistent only; default <data_dir>/queue/<exporter>
    max_size_mb: float = 1024  # persistent: bytes on disk
    max_events: int = 100_000  # memory: events held
    # block: receivers are pushed back (HTTP 429); drop_newest: new events dropped, counted
    when_full: Literal["block", "drop_newest"] = "block"
    fsync: bool = True  # persistent: fsync before acknowledging (group commit)

    def __post_init__(self) -> None:
        if self.max_size_mb <= 0 or self.max_events <= 0:
            raise ValueError("max_size_mb and max_events must be positive")
        if self.dir is not None and self.type == "memory":
            raise ValueError("dir applies to a persistent queue only")


class BatchConfig(Config):
    max_size: int = 1000  # events per export batch
    timeout: Duration = Duration(0.2)  # how long a partial batch waits for more
    # and at most this many MB of events (packed, as queued), at least one event: a
    # backlog of long prompts must not become a batch the exporter cannot hold
    max_size_mb: float = 32

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be at least 1")
        if self.max_size_mb <= 0:
            raise ValueError("max_size_mb must be positive")

    @property
    def max_bytes(self) -> int:
        return int(self.max_size_mb * (1 << 20))


class RetryConfig(Config):
    enabled: bool = True  # false: a failed batch is given up on (dead-lettered) at once
    initial_interval: Duration = Duration(1)  # the wait after the first failure
    max_interval: Duration = Duration(30)  # the longest wait between two attempts
    max_elapsed_time: Duration = Duration(0)  # then give up; 0: retry until it succeeds
    multiplier: float = 2.0  # each wait is the previous one times this
    randomization_factor: float = 0.5  # jitter: each wait is spread by +- this fraction

    def __post_init__(self) -> None:
        if self.multiplier < 1 or not 0 <= self.randomization_factor <= 1:
            raise ValueError("multiplier must be >= 1 and randomization_factor in [0, 1]")


class ExporterConfig(Config):
    """The blocks every exporter takes; an exporter's config class derives from it."""

    # where events wait for this exporter (see "Queues" in docs/architecture.md)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)  # events sent at once
    # how a failed export is retried: exponential backoff with jitter
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    # which events this exporter takes: include/exclude patterns
    filtering: Filter = msgspec.field(default_factory=Filter)
    # the document sent for each event (Otoroshi's blueprint), after filtering; null: as is
    projection: Projection | None = None
    # prompts and answers: full (kept), metadata (their sizes and sha256 only), none (dropped)
    content: Policy = "full"


def refuse_projection(config: ExporterConfig, exporter: str, why: str) -> None:
    """For an exporter with a fixed schema (`__post_init__`): a projection, which reshapes
    JSON documents, has nothing to apply to, so it is refused rather than ignored."""
    if config.projection is not None:
        raise ValueError(f"projection: the {exporter} exporter {why}, so it takes no "
                         "projection; use content: to keep prompts out, or send documents "
                         "with a file, kafka or http exporter")


def requests_within(events: list[Event], encode: Callable[[list[Event]], R],
                    size: Callable[[R], int], limit: float
                    ) -> tuple[list[tuple[R, list[Event]]], list[Event]]:
    """The requests (`encode`d groups of `events`) that send them each within `limit`
    bytes by `size`: the whole, else its halves, recursively, in order; and the events too
    big even alone. For exporters whose servers refuse large requests (413, gRPC's 4 MiB):
    the parts are the same for the same events, so a retry can skip those sent."""
    parts: list[tuple[R, list[Event]]] = []
    alone: list[Event] = []
    pending = [events]
    while pending:
        group = pending.pop()
        request = encode(group)
        if size(request) <= limit:
            parts.append((request, group))
        elif len(group) == 1:
            alone += group
        else:
            pending += [group[len(group) // 2:], group[:len(group) // 2]]
    return parts, alone


def backoff_delays(config: RetryConfig) -> Iterator[float]:
    """Exponential backoff with jitter: initial * multiplier^n, capped, +-randomization."""
    return exponential(float(config.initial_interval), float(config.max_interval),
                       config.multiplier, config.randomization_factor)


def open_queue(config: QueueConfig, context: Context) -> Queue:
    if config.type == "memory":
        return MemoryQueue(config.max_events)
    directory = Path(config.dir) if config.dir else context.state_path("queue")
    return PersistentQueue(directory, int(config.max_size_mb * (1 << 20)), fsync=config.fsync)


_LET_GO_SLICE = 1000  # events freed at once: about 1.2 ms of the loop (events of 1.4 KB)


async def _let_go(events: list[Any]) -> None:
    """Empty a delivered batch a slice at a time, other tasks running between: freeing an
    event takes about 1.2 us, 12 ms for the ClickHouse exporter's batch of 10,000, and it
    happens where the last reference goes, most often here (the slowest exporter lets go
    last). A thread would not spare the loop: freeing holds the GIL throughout."""
    while events:
        del events[-_LET_GO_SLICE:]
        if events:
            await asyncio.sleep(0)


class ExporterRunner:
    """One exporter with its queue and its delivery loop."""

    def __init__(self, exporter: Exporter, config: ExporterConfig, context: Context,
                 queue: Queue, telemetry: Telemetry,
                 given_up: Callable[[list[Any]], None] | None = None) -> None:
        """`given_up`: called with the events of each batch given up on (after they are
        counted and dead-lettered), for an owner with figures of its own."""
        self.id = context.id
        self.given_up = given_up
        self.exporter = exporter
        self.config = config
        self.queue = queue
        self.log = context.log
        self.telemetry = telemetry
        self._attrs = {"exporter": self.id}
        self._content = enforcer(config.content)
        self._task: asyncio.Task[None] | None = None
        self._draining = False

    # --- the pipeline side ---------------------------------------------------------
    def select(self, events: list[Any]) -> list[Any]:
        """The events this exporter takes (its `filtering` block), under its `content`
        policy (applied here, so that its queue never holds what it must not send)."""
        kept = self.config.filtering.apply(events)
        if len(kept) != len(events):
            self.telemetry.exporter_filtered.add(len(events) - len(kept), self._attrs)
        if self._content is not None and kept:
            return self._content(kept)
        return kept

    @property
    def drops_when_full(self) -> bool:
        return self.config.queue.when_full == "drop_newest"

    def count_dropped(self, n: int) -> None:
        self.telemetry.exporter_dropped.add(n, self._attrs)

    def stage(self, batch: Batch) -> Staged:
        """Take room in the queue now and start storing the batch; it is delivered once
        committed (see `meterline.queue.put_all`)."""
        return self.queue.stage(batch)

    def put(self, batch: Batch) -> Awaitable[None]:
        """Take room in the queue now; await the result for the batch to be stored."""
        return self.queue.put(batch)

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        await self.exporter.start()
        self.telemetry.watch_queue(self.id, self.queue.describe)
        self._task = asyncio.create_task(self._loop(), name=f"exporter {self.id}")
        if self.queue.durable and len(self.queue):
            self.log.info("queue replay", events=len(self.queue))
        if discarded := self.queue.discarded_bytes:
            self.log.warning("queue recovery cut off a torn or corrupt tail", bytes=discarded)

    def finish(self) -> None:
        """No more events will come (shutdown, or a replay's source read to its end):
        stop waiting for batches to fill, send what there is, and end the delivery loop
        once the queue is empty."""
        self._draining = True
        self.queue.interrupt()

    async def shutdown(self, grace: float) -> None:
        """Deliver what can be within `grace` seconds; the rest stays in a persistent
        queue for the next start (a memory queue's rest is lost, and logged)."""
        self.finish()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                await cancel_and_wait(self._task)
        left = len(self.queue)
        if left:
            lost = "" if self.queue.durable else " (lost: the queue is in memory)"
            self.log.warning(f"shutdown left events undelivered{lost}", events=left)
        self.telemetry.watch_queue(self.id, None)
        await self.queue.close()
        await self.exporter.shutdown()

    async def stop_loop(self) -> None:
        """Stop delivering at once (the reload hand-over); the queue stays as it is."""
        await cancel_and_wait(self._task)

    # --- delivery ------------------------------------------------------------------
    async def _loop(self) -> None:
        while not (self._draining and self.queue.available == 0):
            try:
                await self._next()
            except asyncio.CancelledError:
                raise
            except Exception:  # a disk error reading or acking the queue: keep trying
                self.log.exception("delivery loop error; retrying in 1s")
                await asyncio.sleep(1)

    async def _next(self) -> None:
        """Wait for a batch (full, or partial after its timeout), deliver it, ack it."""
        batch_cfg = self.config.batch
        await self.queue.wait_for(1, None)
        await self.queue.wait_for(batch_cfg.max_size, batch_cfg.timeout, batch_cfg.max_bytes)
        batch = await self.queue.take(batch_cfg.max_size, batch_cfg.max_bytes)
        if batch is not None:
            await self._deliver(batch)
            await self.queue.ack(batch)
            await _let_go(batch.events)

    async def _deliver(self, batch: ExportBatch) -> None:
        retry = self.config.retry
        delays = backoff_delays(retry)
        started = time.monotonic()
        while True:
            try:
                await self.exporter.export(batch)
            except asyncio.CancelledError:
                raise
            except PermanentError as e:
                failed = batch.events if e.events is None else e.events
                if len(failed) < len(batch.events):
                    self.telemetry.exporter_sent.add(len(batch.events) - len(failed),
                                                     self._attrs)
                self._give_up(ExportBatch(batch.id, failed, batch.attempt),
                              f"permanent error: {self._error_text(e, batch)}")
                return
            except Exception as e:
                if isinstance(e, PartialError):
                    batch = self._settle(batch, e)
                    if not batch.events:
                        return
                hint = e.retry_after if isinstance(e, RetryableError) else None
                delay = max(next(delays), hint or 0.0)
                elapsed = time.monotonic() - started
                limit = float(retry.max_elapsed_time)
                if not retry.enabled or (limit and elapsed + delay > limit):
                    self._give_up(batch, f"retries exhausted after {elapsed:.1f}s: "
                                         f"{self._error_text(e, batch)}")
                    return
                batch.attempt += 1
                self.telemetry.exporter_retries.add(1, self._attrs)
                self.log.warning("send failed, will retry", batch=batch.id,
                                 attempt=batch.attempt, delay_s=round(delay, 2),
                                 error=self._error_text(e, batch))
                await asyncio.sleep(delay)
                continue
            self.telemetry.exporter_sent.add(len(batch.events), self._attrs)
            return

    def _settle(self, batch: ExportBatch, partial: PartialError) -> ExportBatch:
        """Count what a partial send delivered, dead-letter what will never be, and give
        the batch of what is to be sent again (same id: the dead letters of each attempt
        are kept apart)."""
        done = len(batch.events) - len(partial.retry) - len(partial.failed)
        if done:
            self.telemetry.exporter_sent.add(done, self._attrs)
        if partial.failed:
            self._give_up(ExportBatch(f"{batch.id}.{batch.attempt}", partial.failed,
                                      batch.attempt),
                          f"permanent error: {self._error_text(partial, batch)}")
        return ExportBatch(batch.id, partial.retry, batch.attempt)

    @staticmethod
    def _error_text(error: Exception, batch: ExportBatch) -> str:
        """An exporter's error as the logs show it: bounded, and with anything it quotes
        of the batch's content masked."""
        return logs.scrub(str(error) or type(error).__name__, logs.contents(batch.events))

    def _give_up(self, batch: ExportBatch, reason: str) -> None:
        self.telemetry.exporter_failed.add(len(batch.events), self._attrs)
        where = self._dead_letter(batch)
        self.log.error("batch not delivered", batch=batch.id, events=len(batch.events),
                       reason=reason, dead_letter=str(where) if where else None)
        if self.given_up is not None:
            self.given_up(batch.events)

    def _dead_letter(self, batch: ExportBatch) -> Path | None:
        directory = self.queue.dead_letter_dir
        if directory is None:
            return None
        directory.mkdir(exist_ok=True)
        path = directory / f"{batch.id.replace(':', '_')}.jsonl"
        path.write_bytes(to_jsonl(batch.events))
        return path
