"""The component model, after the OpenTelemetry Collector's.

A component is three things: a config class (a msgspec `Struct` with defaults and
validation), a factory that builds it, and an object with `start`/`shutdown`.
Each component module exposes one `Factory` and registers it through the
`meterline.receivers` / `meterline.processors` / `meterline.exporters` /
`meterline.extensions` entry points; the core never imports a component by name.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from meterline.event import Event, unpack

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.metrics import Meter
    from structlog.typing import FilteringBoundLogger

    from meterline.audit import AuditLog
    from meterline.config import PipelineFile
    from meterline.recent import RecentIds
    from meterline.telemetry import Telemetry

Kind = Literal["receiver", "processor", "exporter", "extension"]


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every component's config class: unknown keys are errors."""


def convert(data: Any, cls: type[Config]) -> Config:
    """Validate `data` against a config class (raises msgspec.ValidationError). Here
    rather than in `meterline.config`, so that a worker process building its processors
    does not import the listeners' HTTP stack (aiohttp: 14 MB a worker)."""
    return msgspec.convert({} if data is None else data, cls, dec_hook=decode_hook)


def decode_hook(tp: type, value: Any) -> Any:
    """Types of config values that read themselves (`from_config`: durations, sizes...)."""
    if from_config := getattr(tp, "from_config", None):
        return from_config(value)
    raise NotImplementedError(f"cannot read a {tp.__name__} from config")


@dataclass(frozen=True)
class Context:
    """What the runtime gives a component when it builds it."""

    id: str  # "type" or "type/name", as written in pipeline.yaml
    data_dir: Path  # where the component keeps state (checkpoints, queues)
    telemetry: Telemetry  # the daemon's own metrics (see `meter`)
    log: FilteringBoundLogger
    replicas: int = 1
    """How many processes run this component side by side (processors run in every worker
    process): a limit meant for the whole daemon, such as a rate, is divided by it."""
    audit: AuditLog | None = None
    """The daemon's audit log of configuration changes (`meterline/audit.py`): `entries()`
    and `subscribe(callback)`, for a component that keeps them elsewhere. None where no
    daemon runs (worker processes, tools)."""

    @property
    def meter(self) -> Meter:
        """For the component's own self-telemetry instruments. Live gauges that are not
        events (requests in flight, budget use) are instruments here, named `llm_gateway_*`,
        which the `prometheus` exporter republishes from `telemetry.registry`."""
        return self.telemetry.meter

    def state_path(self, *parts: str) -> Path:
        """A per-component path under the data directory (`file/a` becomes `file_a`)."""
        return self.data_dir.joinpath(*parts, self.id.replace("/", "_"))


AdminHandler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


class Component:
    """Lifecycle shared by all components; the defaults do nothing."""

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def admin_routes(self) -> dict[str, AdminHandler]:
        """Handlers this component serves on the admin server, by path under `/api/v1/`:
        a GET handler by its path (`{"analytics/models": handler}`), a POST handler by
        the method and path (`{"POST billing/import": handler}`)."""
        return {}


class Backpressure(Exception):
    """The pipeline cannot take this batch now; the receiver should push back.

    Nothing of the batch was queued. `retry_after` is a hint in seconds for the
    client (HTTP `Retry-After`).
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Received:
    """What became of a body handed to `Consumer.consume_encoded`: its events were
    accepted (durably queued), its `rejected` items refused with their reasons, and its
    `duplicates` left out, as events taken already (`once`)."""

    accepted: int
    rejected: list[tuple[int, str]]
    skipped: int
    duplicates: int = 0


@dataclass
class Decoded:
    """What a receiver's decoder makes of a body (a request's, or a batch of messages)."""

    events: list[Event] = field(default_factory=list)
    # (the place of each item, or message, that holds no event, and why)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    skipped: int = 0  # items that are not LLM calls

    def received(self) -> Received:
        """What became of the body once its events were accepted."""
        return Received(len(self.events), self.rejected, self.skipped)


Decode = Callable[[bytes], Decoded]
"""A body's decoder. It may run in a worker process, so it must pickle by name: a
module-level function, or a `functools.partial` of one."""


def decode_packed(keep: list[int] | None, body: bytes) -> Decoded:
    """The `Decode` of events a worker decoded and packed (`Entry` decodes a body apart from
    processing it when its events are taken once): those at the positions `keep`, or all."""
    events = unpack(body)
    return Decoded(events if keep is None else [events[i] for i in keep])


class Consumer(Protocol):
    """Where a receiver hands its batches. Returns once they are durably queued.

    Raises `Backpressure` when a queue is full (nothing was queued), and
    `QueueWriteError` when the write-ahead log cannot be written (disk full).
    """

    def consume(self, events: list[Event]) -> Awaitable[None]: ...

    def consume_encoded(self, decode: Decode, body: bytes,
                        once: RecentIds | None = None) -> Awaitable[Received]:
        """`consume(decode(body).events)`, with the decoding off the event loop: in the
        worker process that processes the events, where there is one. Raises what
        `decode` raises for the body as a whole, and what `consume` raises; the events it
        refuses are counted here (only here is their number known).

        With `once`, an event whose id `once` holds is left out before any processor sees
        it (`Received.duplicates`), and the ids of those taken are claimed in it (released
        again if they are not queued after all)."""

    def refused(self, count: int, reason: str) -> None:
        """Count events the receiver could not take, by reason (for self-telemetry)."""


class Receiver(Component):
    """Takes events from the outside and hands them to a `Consumer`."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer


class Processor(Component):
    """A synchronous function on batches: returns the events that go on."""

    def process(self, events: list[Event]) -> list[Event]:
        raise NotImplementedError


def run_processors(processors: list[tuple[str, Processor]], events: list[Event]
                   ) -> tuple[list[Event], list[tuple[str, int, int]]]:
    """A pipeline's processors in order, stopping when none is left; with each one's
    (id, events in, events out) for self-telemetry. The same in a worker process as here."""
    counts = []
    for pid, processor in processors:
        before = len(events)
        events = processor.process(events)
        counts.append((pid, before, len(events)))
        if not events:
            break
    return events, counts


@dataclass
class ExportBatch:
    """A batch handed to an exporter. `id` is stable across retries and restarts,
    so that an exporter can make a retried send idempotent downstream."""

    id: str
    events: list[Event]
    attempt: int = 0


class RetryableError(Exception):
    """A send that may succeed later (connection refused, overload, timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PartialError(RetryableError):
    """A send that delivered part of a batch (an Elasticsearch bulk answer with per-item
    errors): `retry` are sent again after the backoff, `failed` never will be and are
    dead-lettered at once; the batch's other events were delivered."""

    def __init__(self, message: str, retry: list[Event], failed: list[Event],
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.retry = retry
        self.failed = failed


class PermanentError(Exception):
    """A send that will never succeed as it is (bad row, schema mismatch). `events`, when
    given, are the only events of the batch not delivered (the others were)."""

    def __init__(self, message: str, events: list[Event] | None = None) -> None:
        super().__init__(message)
        self.events = events


class Exporter(Component):
    """Sends batches out. Raises `RetryableError` or `PermanentError` on failure;
    any other exception counts as retryable. Must not mutate the events."""

    async def export(self, batch: ExportBatch) -> None:
        raise NotImplementedError


class Extension(Component):
    """Runs beside the pipelines, in no pipeline: no events in or out. What it does is in
    its `start` (a background task), `shutdown` and `admin_routes` (an API)."""


@dataclass(frozen=True)
class Factory:
    """How the runtime finds, configures and builds one component type."""

    kind: Kind
    type: str
    config: builtins.type[Config]  # (`type` is the field above here)
    create: Callable[..., Any]
    """`create(config, context)` for processors, exporters and extensions,
    `create(config, context, consumer)` for receivers."""
    link: Callable[[Any, PipelineFile], Config] | None = None
    """For a component whose config names other components of the file (the `finops`
    extension names a `clickhouse` exporter): `link(config, file)` is run once the whole
    file is valid; it raises `ValueError` (the message says which key names what) or
    returns the config `create` gets, with what it names filled in. A reload compares that
    config, so a change of what it names rebuilds the component too."""


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it to end, swallowing the cancellation."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
