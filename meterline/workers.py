"""Processors in worker processes, so that the loop serving clients never runs them.

Processors are CPU work on whole batches (redaction scans every prompt); run on the
event loop, each batch stalls every open connection, and a single process uses one
core. With `service.workers` above 1, `Entry.consume` hands each batch, packed once
(msgpack), to a pool of worker processes that run the processors of every pipeline
the batch belongs to and send back the packed results. The loop only awaits them.

What stays the same: the receiver still acknowledges only once the processed batch is
durably queued (the queues live in the main process, which alone holds the
exporters, the embedded ClickHouse directory and the Prometheus series). A worker
holds nothing that was acknowledged: when one dies (kill -9, a crash), the batches it
had are answered with `Backpressure`, which every receiver already retries without
loss, and the pool is started again.

Each worker builds its own processors from the same validated configuration (the
component's raw config is sent, since compiled configs hold closures) and keeps
them across batches; a reload sends a new plan and a worker rebuilds only the
processors whose config changed, as the main process does. Processor self-telemetry
(counters made through `Context.meter`) is summed in the worker and sent back with
each result, to be added to the daemon's own counters: `/metrics` sees the whole
daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from meterline import logs
from meterline.component import Backpressure, Context, Processor, convert, run_processors
from meterline.event import Event, pack, unpack


def default_workers() -> int:
    """One worker per core this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class ProcessorSpec:
    """What a worker needs to build one processor: plain data, so that it pickles."""

    id: str
    type: str
    raw: Any  # the component's block of pipeline.yaml, already validated in the main process


@dataclass(frozen=True)
class Plan:
    """The processors of every pipeline, in order, and what their contexts hold."""

    pipelines: dict[str, list[ProcessorSpec]]
    data_dir: str
    replicas: int = 1  # how many workers run the plan


@dataclass
class Processed:
    """One pipeline's output for a batch: its events, packed, and per-processor counts."""

    packed: bytes
    counts: list[tuple[str, int, int]]  # (processor id, events in, events out)


# --- the main-process side ----------------------------------------------------------
class ProcessorPool:
    """A pool of worker processes running the processors of every pipeline."""

    def __init__(self, workers: int, nice: int, log_level: str, log_encoding: str,
                 telemetry: Any) -> None:
        self.workers = workers
        self.telemetry = telemetry
        self.log = logs.get(component="workers")
        self._worker_settings = (nice, log_level, log_encoding)
        self._plan = b""
        self._generation = 0
        self._executor: ProcessPoolExecutor | None = None
        self.restarts = 0  # times the pool was started again after a worker died

    def configure(self, plan: Plan) -> None:
        """Use `plan` for the batches submitted from now on."""
        self._plan = pickle.dumps(plan)
        self._generation += 1

    @property
    def started(self) -> bool:
        return self._executor is not None

    async def start(self) -> None:
        """Start every worker and have it build the plan, so that a processor that cannot
        be built fails the start rather than the first batch."""
        self._executor = self._new_executor()
        try:
            await asyncio.gather(*(self.process([], []) for _ in range(self.workers)))
        except Backpressure:
            raise RuntimeError(
                "a processing worker exited while starting (its error is logged above; a "
                "program that runs a Service itself must guard its entry point with "
                "`if __name__ == '__main__':`)") from None

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                   initializer=_init_worker, initargs=self._worker_settings)

    async def process(self, pipelines: list[str], events: list[Event]) -> list[Processed]:
        """Run `events` through the processors of each named pipeline, in a worker.
        Raises `Backpressure` when the worker died on the way (nothing was queued)."""
        executor = self._executor
        assert executor is not None, "the pool is not started"
        loop = asyncio.get_running_loop()
        try:
            results, deltas = await loop.run_in_executor(
                executor, _process, self._generation, self._plan, pipelines, pack(events))
        except BrokenProcessPool:
            self._restart(executor)
            raise Backpressure("a processing worker stopped; retry", retry_after=0.5) from None
        self._add_telemetry(deltas)
        return results

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:
            self.log.error("a processing worker died; starting the pool again")
            # the dead worker may have held a lock of the pool's task queue: the others can
            # block on it for good, and the pool's own clean-up would wait for them
            for process in list(getattr(broken, "_processes", {}).values()):
                process.kill()
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            self.restarts += 1

    def _add_telemetry(self, deltas: dict[tuple[str, str, tuple[Any, ...]], float]) -> None:
        meter = self.telemetry.meter  # (the same counter for the same name)
        for (name, description, attributes), amount in deltas.items():
            meter.create_counter(name, description=description).add(amount, dict(attributes))

    def pids(self) -> list[int]:
        """The worker processes now running (for tests and status)."""
        executor = self._executor
        processes = getattr(executor, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.is_alive()]

    async def shutdown(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


# --- the worker side -----------------------------------------------------------------
class _RelayCounter:
    """A counter whose increments are summed here and added in the main process."""

    def __init__(self, name: str, description: str, sums: dict[Any, float]) -> None:
        self._key = (name, description)
        self._sums = sums

    def add(self, amount: float, attributes: dict[str, Any] | None = None) -> None:
        key = (*self._key, tuple(sorted((attributes or {}).items())))
        self._sums[key] = self._sums.get(key, 0) + amount


class _RelayMeter:
    """The `Context.meter` of a processor in a worker: counters only, relayed."""

    def __init__(self) -> None:
        self.sums: dict[Any, float] = {}

    def create_counter(self, name: str, unit: str = "", description: str = "") -> _RelayCounter:
        return _RelayCounter(name, description, self.sums)

    def drain(self) -> dict[Any, float]:
        """The sums since the last drain (the counters keep adding to the same dict)."""
        sums = dict(self.sums)
        self.sums.clear()
        return sums


@dataclass
class _RelayTelemetry:
    meter: _RelayMeter = field(default_factory=_RelayMeter)


@dataclass
class _Built:
    spec: ProcessorSpec
    processor: Processor


class _Worker:
    """The processors of one worker, rebuilt where a new plan changed them."""

    def __init__(self) -> None:
        self.generation = -1
        self.telemetry = _RelayTelemetry()
        self.built: dict[tuple[str, str], _Built] = {}
        self.pipelines: dict[str, list[tuple[str, Processor]]] = {}

    def adopt(self, generation: int, plan_bytes: bytes) -> None:
        if generation == self.generation:
            return
        from meterline import registry

        plan: Plan = pickle.loads(plan_bytes)
        wanted = {(name, s.id): s for name, specs in plan.pipelines.items() for s in specs}
        for key, built in list(self.built.items()):
            if wanted.get(key) != built.spec:
                asyncio.run(built.processor.shutdown())
                del self.built[key]
        for key, spec in wanted.items():
            if key in self.built:
                continue
            factory = registry.factory("processor", spec.type)
            context = Context(spec.id, Path(plan.data_dir), self.telemetry,  # type: ignore[arg-type]
                              logs.get(component=spec.id), plan.replicas)
            processor = factory.create(convert(spec.raw, factory.config), context)
            asyncio.run(processor.start())
            self.built[key] = _Built(spec, processor)
        self.pipelines = {name: [(s.id, self.built[(name, s.id)].processor) for s in specs]
                          for name, specs in plan.pipelines.items()}
        self.generation = generation

    def run(self, names: list[str], packed: bytes) -> list[Processed]:
        results = []
        for name in names:  # each pipeline its own copy, as clone() makes in one process
            events, counts = run_processors(self.pipelines[name], unpack(packed))
            results.append(Processed(pack(events), counts))
        return results


_worker: _Worker | None = None


def _init_worker(nice: int, log_level: str, log_encoding: str) -> None:
    global _worker
    # Ctrl-C and the service manager's SIGTERM are the main process's to handle: it
    # shuts the pool down in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    # Below the daemon's priority: when the cores are busy, the loop that serves clients
    # is scheduled first (it waited for a core as long as it ran, docs/architecture.md).
    # Not its threads: one that held the GIL while waiting for a core would hold it up.
    if nice:
        os.nice(nice)
    logs.configure(log_level, log_encoding)
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    _worker = _Worker()


def _die_with_parent() -> None:
    """A worker outliving a killed daemon would hold memory for nothing (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _process(generation: int, plan: bytes, names: list[str],
             packed: bytes) -> tuple[list[Processed], dict[Any, float]]:
    assert _worker is not None
    _worker.adopt(generation, plan)
    results = _worker.run(names, packed)
    sums = _worker.telemetry.meter.drain()
    return results, sums
