"""What a receiver does when the pipeline pushes back, written once for every receiver.

`consume` (the `Consumer`'s) raises `Backpressure` when a queue is full and
`QueueWriteError` when a queue cannot be written; in both cases nothing was queued.
A receiver either

- answers its client, which retries (`webhook`, `otlp`): `refuse` turns the two into
  one `Refused`, with the HTTP status (429, or 503 for a failed write), the message and
  the `Retry-After` to send; gRPC answers `RESOURCE_EXHAUSTED` or `UNAVAILABLE` from the
  same; or
- keeps the events and offers them again (`file`, `gateway`, `kafka`): `offer` retries
  after a wait the receiver chooses, for as long as that wait says to go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from structlog.typing import FilteringBoundLogger

from meterline import logs
from meterline.component import Backpressure, Consumer, Decode, Received
from meterline.event import Event
from meterline.queue import QueueWriteError
from meterline.recent import RecentIds

T = TypeVar("T")
PUSHBACK: tuple[type[Exception], ...] = (Backpressure, QueueWriteError)
"""The errors of `consume` after which the events may be offered again."""
WRITE_RETRY_AFTER = 5.0  # seconds a client is told to wait after a failed queue write


class Refused(Exception):
    """Nothing was queued; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float, overloaded: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.overloaded = overloaded  # a full queue (429) rather than a failed write (503)

    @property
    def status(self) -> int:
        return 429 if self.overloaded else 503

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


async def refuse(consumer: Consumer, events: list[Event], log: FilteringBoundLogger) -> None:
    """`consumer.consume(events)`, with a push-back raised as `Refused`. A failed write is
    logged as an error; a full queue is the client's to wait out. (The consumer counts
    both.)"""
    try:
        await consumer.consume(events)
    except PUSHBACK as e:
        raise _refusal(e, log) from e


async def refuse_encoded(consumer: Consumer, decode: Decode, body: bytes,
                         log: FilteringBoundLogger, once: RecentIds | None = None) -> Received:
    """`consumer.consume_encoded(decode, body, once)`, with a push-back raised as `Refused`,
    as `refuse` does (the consumer counts what it refuses of a body)."""
    try:
        return await consumer.consume_encoded(decode, body, once)
    except PUSHBACK as e:
        raise _refusal(e, log) from e


def _refusal(error: Exception, log: FilteringBoundLogger) -> Refused:
    if isinstance(error, Backpressure):
        return Refused(f"back-pressure: {error}; retry later", error.retry_after, True)
    if (failures := _WRITE_FAILURES.due()) is not None:
        log.error("cannot queue events", error=str(error), refused_batches=failures)
    return Refused(f"cannot queue events: {error}", WRITE_RETRY_AFTER, False)


# A full disk fails every write: a line per batch would flood the log (and the disk) with
# the same error, thousands a minute; the `unavailable` count keeps every one.
_WRITE_FAILURES = logs.Sparse()


def retry_hint(error: Exception) -> float | None:
    """The pipeline's suggested wait (`Backpressure.retry_after`), if it gave one."""
    return error.retry_after if isinstance(error, Backpressure) else None


async def offer(consumer: Consumer, events: list[Event],
                wait: Callable[[Exception], Awaitable[bool]]) -> bool:
    """Hand `events` over, and while the pipeline pushes back, `await wait(error)` and try
    again. `wait` returns False to stop trying: then so does this (True once handed over).
    Any other error of `consume` is raised."""
    async def hand_over() -> bool:
        await consumer.consume(events)
        return True

    return await _offering(hand_over, wait) is not None


async def offer_encoded(consumer: Consumer, decode: Decode, body: bytes,
                        wait: Callable[[Exception], Awaitable[bool]]) -> Received | None:
    """`offer` of a body (`Consumer.consume_encoded`): what became of its items once
    handed over, None when `wait` stopped trying."""
    return await _offering(lambda: consumer.consume_encoded(decode, body), wait)


async def _offering(hand_over: Callable[[], Awaitable[T]],
                    wait: Callable[[Exception], Awaitable[bool]]) -> T | None:
    while True:
        try:
            return await hand_over()
        except PUSHBACK as e:
            if not await wait(e):
                return None
