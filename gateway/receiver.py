"""Receiver `gateway`: the thin forwarding proxy, run inside the daemon (its settings:
`config.py`).

Applications point their SDK's base URL at it; it forwards to the configured
upstreams and turns every call into one event (see `gateway/`). Recording never
delays a response: the proxy appends the event to a bounded in-memory buffer and
a background task hands the buffer to the pipeline in batches. When the pipeline
pushes back, events stay buffered and are offered again; when the buffer is full,
new events are dropped, counted (`llm_gateway_dropped_events_total` and the
receiver's refused count, reason `buffer_full`) and logged, and the traffic
itself is never held up.

Self-telemetry: `llm_gateway_requests_inflight` (no attributes),
`llm_gateway_active_requests{provider}` and `llm_gateway_endpoint_healthy{endpoint}`
(1, or 0 after consecutive connection failures or timeouts), read at collection
time from the proxies' own counters, so a request costs no metric call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections import deque
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from structlog.typing import FilteringBoundLogger

from meterline import bounds
from meterline.backpressure import offer
from meterline.component import Consumer, Context, Factory, Receiver
from meterline.event import Event
from meterline.gateway.budgets import blocks_of
from meterline.gateway.config import GatewayConfig
from meterline.gateway.proxy import Proxy
from meterline.telemetry import Telemetry

_REPORT_EVERY = 10.0  # seconds between two log lines about dropped events
_RETRY_CAP = 1.0  # seconds at most between two offers of a refused batch


class EventBuffer:
    """Events between the request path and the pipeline: bounded, never blocking."""

    def __init__(self, config: GatewayConfig, consumer: Consumer, log: FilteringBoundLogger,
                 on_drop: Instruments) -> None:
        self.consumer = consumer
        self.log = log
        self.size = config.buffer_size
        self.batch_size = config.batch_size
        self.interval = float(config.flush_interval)
        self.instruments = on_drop
        self.events: deque[Event] = deque()
        self.unreported = 0  # dropped since the last log line
        self.last_report = 0.0
        self._task: asyncio.Task[None] | None = None
        self.sleeping = False
        self.closing = False

    def add(self, event: Event) -> None:
        """Called on the request path: O(1), never waits."""
        if len(self.events) < self.size:
            self.events.append(event)
            return
        self.unreported += 1
        self.instruments.dropped.add(1)
        self.consumer.refused(1, "buffer_full")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway event buffer")

    async def close(self, timeout: float) -> None:
        """Stop the loop, then hand over what is left, pushed back or not, until `timeout`.
        The loop is cancelled only while it sleeps: a batch being handed over is not cut
        off halfway (it would be lost, or queued twice)."""
        self.closing = True
        if self._task is not None:
            if self.sleeping:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = time.monotonic() + timeout
        while self.events and time.monotonic() < deadline:
            if not await self._flush():
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        self._report()
        if self.events:
            self.consumer.refused(len(self.events), "buffer_full")
            self.log.error("gateway events lost at shutdown: the pipeline did not take them",
                           events=len(self.events))
            self.events.clear()

    async def _run(self) -> None:
        pause = self.interval
        while not self.closing:
            self.sleeping = True
            await asyncio.sleep(pause)
            self.sleeping = False
            pause = self.interval if await self._flush() else _RETRY_CAP
            self._report()

    async def _flush(self) -> bool:
        """Hand everything buffered over, batch by batch; False if the pipeline refused."""
        events = self.events
        while events:
            batch = [events.popleft() for _ in range(min(self.batch_size, len(events)))]
            bounds.repair(batch)  # hostile upstream numbers are dropped, the call recorded
            if not await offer(self.consumer, batch, functools.partial(self._keep, batch)):
                return False
        return True

    async def _keep(self, batch: list[Event], pushback: Exception) -> bool:
        """Pushed back: the batch goes back in front, offered again by the next flush
        (the loop waits for it, never the request path)."""
        self.events.extendleft(reversed(batch))
        self.log.info("pipeline pushing back; gateway events stay buffered",
                      buffered=len(self.events), reason=str(pushback))
        return False

    def _report(self) -> None:
        now = time.monotonic()
        if self.unreported and now - self.last_report >= _REPORT_EVERY:
            self.log.warning("gateway buffer full: events dropped (see buffer_size)",
                             dropped=self.unreported, buffer_size=self.size)
            self.unreported = 0
            self.last_report = now


class Instruments:
    """The `llm_gateway_*` instruments, once per daemon, fed by every running proxy."""

    def __init__(self, meter: Meter) -> None:
        self.proxies: set[Proxy] = set()
        meter.create_observable_up_down_counter(
            "llm_gateway_requests_inflight", callbacks=[self._inflight],
            description="Requests the gateway is serving now")
        meter.create_observable_up_down_counter(
            "llm_gateway_active_requests", callbacks=[self._active],
            description="Requests being served now, by provider")
        meter.create_observable_gauge(
            "llm_gateway_endpoint_healthy", callbacks=[self._healthy],
            description="1 for an upstream that answers, 0 after consecutive connection "
                        "failures or timeouts")
        self.dropped = meter.create_counter(
            "llm_gateway_dropped_events",
            description="Gateway events dropped because the buffer to the pipeline was full")

    def _inflight(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(sum(p.inflight for p in self.proxies))

    def _active(self, _: CallbackOptions) -> Iterable[Observation]:
        by_provider: dict[str, int] = {}
        for proxy in self.proxies:
            for upstream in proxy.upstreams.values():
                by_provider[upstream.provider] = by_provider.get(upstream.provider, 0) + \
                    upstream.active
        for provider, active in by_provider.items():
            yield Observation(active, {"provider": provider})

    def _healthy(self, _: CallbackOptions) -> Iterable[Observation]:
        health: dict[str, int] = {}
        for proxy in self.proxies:
            for name, upstream in proxy.upstreams.items():
                health[name] = min(health.get(name, 1), int(upstream.healthy))
        for name, healthy in health.items():
            yield Observation(healthy, {"endpoint": name})


_instruments: weakref.WeakKeyDictionary[Telemetry, Instruments] = weakref.WeakKeyDictionary()


def instruments_for(telemetry: Telemetry) -> Instruments:
    """Instruments are registered once per meter: a reloaded gateway reuses them."""
    if telemetry not in _instruments:
        _instruments[telemetry] = Instruments(telemetry.meter)
    return _instruments[telemetry]


class GatewayReceiver(Receiver):
    def __init__(self, config: GatewayConfig, context: Context, consumer: Consumer) -> None:
        super().__init__(consumer)
        self.config = config
        self.log = context.log
        self.instruments = instruments_for(context.telemetry)
        self.buffer = EventBuffer(config, consumer, context.log, self.instruments)
        # spent hard budgets, published here by whatever enforces budgets (the finops
        # extension): the receiver knows it by its id only
        self.proxy = Proxy(config, self.buffer.add, context.log,
                           blocks_of(context.telemetry, context.id))

    async def start(self) -> None:
        await self.proxy.start()
        self.buffer.start()
        self.instruments.proxies.add(self.proxy)
        self.log.info("gateway listening", listen=self.config.listen,
                      upstreams={n: u.base_url for n, u in self.config.upstreams.items()},
                      default=self.config.default_upstream)

    async def shutdown(self) -> None:
        await self.proxy.shutdown()
        self.instruments.proxies.discard(self.proxy)
        await self.buffer.close(float(self.config.drain_timeout))


factory = Factory(kind="receiver", type="gateway", config=GatewayConfig, create=GatewayReceiver)
