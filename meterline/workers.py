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
loss, and another worker is started in its place.

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
import atexit
import contextlib
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from meterline import logs, pipes, resources
from meterline.component import (
    Backpressure,
    Context,
    Decode,
    Processor,
    Received,
    convert,
    run_processors,
)
from meterline.event import Event, clone, pack, unpack

MEMORY_PER_WORKER_MIB: Final = 256
"""At most one worker by default per this much of the memory the daemon may have. A
worker takes some 45 MB idle (the interpreter, the processors, redaction's compiled
patterns) and more while it holds batches, beside the daemon's own process; so a pod
limited to 512 MiB runs two workers, however many cores its node has."""


def default_workers() -> tuple[int, str]:
    """How many workers to run when `service.workers` is absent, and why (for the start's
    log): one per core the daemon may keep busy (`resources.cores_available`: its CPU
    affinity, within its cgroup's CPU quota), and at most one per
    `MEMORY_PER_WORKER_MIB` of the memory it may have (its cgroup's, or the machine's)."""
    return workers_for(*resources.cores_available(), resources.memory_available())


def workers_for(cores: int, why: str, memory: int | None) -> tuple[int, str]:
    """`cores` workers (`why` says what set that), or fewer when `memory` (bytes; None:
    unknown) does not hold `MEMORY_PER_WORKER_MIB` for each."""
    if memory is None or (fit := memory // (MEMORY_PER_WORKER_MIB << 20)) >= cores:
        return cores, why
    return max(1, fit), f"{memory >> 20} MiB of memory, a worker per {MEMORY_PER_WORKER_MIB} MiB"


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


@dataclass
class Unprocessed:
    """A body a worker decoded and did not process (`ProcessorPool.decode`): its events
    packed, their ids, and what became of its items."""

    packed: bytes
    ids: list[str]
    received: Received


# What a worker answers a request: each pipeline's result and, for a body, what became of
# its items; or, for a body to decode only, `Unprocessed`.
Answer = tuple[list[Processed], Received | None] | Unprocessed


# --- the main-process side ----------------------------------------------------------
class _WorkerDied(Exception):
    pass


_unreaped: set[subprocess.Popen[bytes]] = set()  # workers started and not yet waited for


@atexit.register
def _kill_unreaped() -> None:
    """Kill the workers of a pool that was not shut down (a start that failed half way, a
    program that exits without `shutdown`): they would wait for requests on an open pipe
    until the process that holds it exits."""
    for process in list(_unreaped):
        with contextlib.suppress(Exception):
            process.kill()


# A worker is `python -c` this, with the daemon's `sys.path` (as multiprocessing's `spawn`
# passes it) and its ends of the two pipes. Not `multiprocessing`: its `spawn` imports the
# daemon's main module again in each worker (for `meterline run`, the CLI, with aiohttp,
# gRPC's and the OpenTelemetry SDK's modules: 13 MB of each worker's memory) and starts a
# resource tracker process (12 MB), which tracks shared memory and semaphores we do not use.
_ENTRY = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
          "from meterline.workers import serve; serve(sys.argv[2:])")


def _wait(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for `process` to exit, at most `timeout` seconds: whether it did."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class _Handle:
    """One worker process, and the requests it has not answered yet (it answers in order)."""

    def __init__(self, pool: ProcessorPool, process: subprocess.Popen[bytes],
                 requests: asyncio.WriteTransport) -> None:
        self.pool = pool
        self.process = process
        self.requests = requests
        self.pending: deque[asyncio.Future[bytes]] = deque()
        self.generation = -1  # of the plan it was last sent

    def send(self, generation: int, plan: bytes, names: list[str] | None,
             decode: Decode | None, data: bytes) -> asyncio.Future[bytes]:
        """A request is two frames: what to do (pickled), then the batch as it is packed,
        or the body `decode` makes it of (not copied into the pickle)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        if self.generation == generation:
            plan = b""  # it has it
        self.generation = generation
        what = pickle.dumps((generation, plan, names, decode), protocol=pickle.HIGHEST_PROTOCOL)
        for part in (pipes.header(len(what)), what, pipes.header(len(data)), data):
            self.requests.write(part)  # (a pipe transport's `writelines` joins: a copy)
        return future

    def answered(self, frame: bytes) -> None:
        """A result came: it answers the oldest request pending."""
        future = self.pending.popleft()
        if not future.done():  # (its caller may have been cancelled)
            future.set_result(frame)

    def died(self) -> None:
        """Its results pipe closed: it exited (or was killed) with these requests unanswered."""
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(_WorkerDied())
        self.requests.close()
        self.pool.lost(self)


class ProcessorPool:
    """Worker processes running the processors of every pipeline."""

    def __init__(self, workers: int, nice: int, log_level: str, log_encoding: str,
                 telemetry: Any) -> None:
        self.workers = workers
        self.telemetry = telemetry
        self.log = logs.get(component="workers")
        self._worker_settings = (nice, log_level, log_encoding)
        self._plan = b""
        self._generation = 0
        self._handles: list[_Handle] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._closing = False
        self.restarts = 0  # workers started again after one died

    def configure(self, plan: Plan) -> None:
        """Use `plan` for the batches submitted from now on."""
        self._plan = pickle.dumps(plan)
        self._generation += 1

    @property
    def started(self) -> bool:
        return bool(self._handles)

    async def start(self) -> None:
        """Start every worker and have it build the plan, so that a processor that cannot
        be built fails the start rather than the first batch."""
        for _ in range(self.workers):
            await self._spawn()
        try:
            await asyncio.gather(*(self._run(handle, [], None, pack([]))
                                   for handle in self._handles))
        except Backpressure:
            await self.shutdown()
            raise RuntimeError("a processing worker exited while starting (its error is "
                               "logged above)") from None

    async def _spawn(self) -> None:
        requests_in, requests_out = os.pipe()
        results_in, results_out = os.pipe()
        for end in (requests_in, results_in):
            pipes.widen(end)
        nice, log_level, log_encoding = self._worker_settings
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, json.dumps(sys.path), str(requests_in),
                 str(results_out), str(nice), log_level, log_encoding],
                stdin=subprocess.DEVNULL, pass_fds=(requests_in, results_out))
        except BaseException:
            os.close(requests_out)
            os.close(results_in)
            raise
        finally:  # the worker's ends: its exit closes the results pipe
            os.close(requests_in)
            os.close(results_out)
        _unreaped.add(process)
        loop = asyncio.get_running_loop()
        requests, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                    pipes.as_file(requests_out, "wb"))
        handle = _Handle(self, process, requests)
        await loop.connect_read_pipe(lambda: pipes.FrameReader(handle.answered, handle.died),
                                     pipes.as_file(results_in, "rb"))
        self._handles.append(handle)

    def lost(self, handle: _Handle) -> None:
        """A worker died (or exited at shutdown): reap it, and start another unless the
        pool is shutting down."""
        if handle in self._handles:
            self._handles.remove(handle)
        if self._closing:
            return  # (`shutdown` reaps it)
        task = asyncio.get_running_loop().create_task(self._replace(handle))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, handle: _Handle) -> None:
        if await asyncio.to_thread(_wait, handle.process, 10):
            _unreaped.discard(handle.process)
        if self._closing:
            return
        self.log.error("a processing worker died; starting another",
                       exitcode=handle.process.returncode)
        self.restarts += 1
        try:
            await self._spawn()
        except Exception as e:  # (batches are pushed back while no worker runs)
            self.log.error("a processing worker could not be started", error=str(e))

    async def _run(self, handle: _Handle, pipelines: list[str] | None, decode: Decode | None,
                   data: bytes) -> Answer:
        """The worker's answer (`_process`), once its counters are added to the daemon's."""
        future = handle.send(self._generation, self._plan, pipelines, decode, data)
        try:
            ok, value, built = pickle.loads(await future)
        except _WorkerDied:
            raise Backpressure("a processing worker stopped; retry", retry_after=0.5) from None
        if not ok:
            if not built:  # (a body it could not decode leaves the plan built)
                handle.generation = -1
            raise value
        answer: Answer
        answer, deltas = value
        self._add_telemetry(deltas)
        return answer

    async def process(self, pipelines: list[str], events: list[Event]) -> list[Processed]:
        """Run `events` through the processors of each named pipeline, in the worker with
        the fewest batches pending. Raises `Backpressure` when the worker died on the way
        (nothing was queued) or none is running (one is being started again)."""
        answer = await self._submit(pipelines, None, pack(events))
        assert not isinstance(answer, Unprocessed)
        return answer[0]

    async def process_encoded(self, pipelines: list[str], decode: Decode,
                              body: bytes) -> tuple[list[Processed], Received]:
        """`process(pipelines, decode(body).events)`, decoded in the worker too: the loop
        neither decodes the body nor packs its events. What the decoder refused or
        skipped comes back in the `Received`; what it raises for the whole body is raised
        here."""
        answer = await self._submit(pipelines, decode, body)
        assert not isinstance(answer, Unprocessed) and answer[1] is not None
        return answer[0], answer[1]

    async def decode(self, decode: Decode, body: bytes) -> Unprocessed:
        """`decode(body)` in a worker, its events sent back packed, not processed: for the
        events a receiver takes once, whose ids the main process must see first."""
        answer = await self._submit(None, decode, body)
        assert isinstance(answer, Unprocessed)
        return answer

    async def _submit(self, pipelines: list[str] | None, decode: Decode | None,
                      data: bytes) -> Answer:
        if not self._handles:  # (a dead worker's handle is gone at once)
            raise Backpressure("no processing worker is running; retry", retry_after=0.5)
        return await self._run(min(self._handles, key=lambda h: len(h.pending)),
                               pipelines, decode, data)

    def _add_telemetry(self, deltas: dict[tuple[str, str, tuple[Any, ...]], float]) -> None:
        meter = self.telemetry.meter  # (the same counter for the same name)
        for (name, description, attributes), amount in deltas.items():
            meter.create_counter(name, description=description).add(amount, dict(attributes))

    def pids(self) -> list[int]:
        """The worker processes now running (for tests and status)."""
        return [h.process.pid for h in self._handles if h.process.poll() is None]

    async def shutdown(self) -> None:
        """Close the workers' request pipes (each exits once it has answered what it has),
        wait for them, and kill any that does not exit."""
        self._closing = True
        await asyncio.gather(*self._replacing, return_exceptions=True)
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.requests.close()
        for handle in handles:
            if not await asyncio.to_thread(_wait, handle.process, 10):
                handle.process.kill()
                await asyncio.to_thread(_wait, handle.process, 5)
            _unreaped.discard(handle.process)


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

    def run(self, names: list[str], events: list[Event]) -> list[Processed]:
        results = []
        last = len(names) - 1
        for i, name in enumerate(names):  # each pipeline its own copy, as in one process
            out, counts = run_processors(self.pipelines[name],
                                         events if i == last else clone(events))
            results.append(Processed(pack(out), counts))
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


def _process(generation: int, plan: bytes, names: list[str] | None, decode: Decode | None,
             data: bytes) -> tuple[Answer, dict[Any, float]]:
    """One request: the processed batch of each pipeline and what became of a body's items
    (when `data` is a body to `decode`, not packed events), or with no `names` the body
    decoded only (`Unprocessed`); and the counters' sums since."""
    assert _worker is not None
    _worker.adopt(generation, plan)
    if decode is None:
        events, received = unpack(data), None
    else:
        decoded = decode(data)
        events, received = decoded.events, decoded.received()
    answer: Answer
    if names is None:
        assert received is not None
        answer = Unprocessed(pack(events), [e.event_id for e in events], received)
    else:
        answer = (_worker.run(names, events), received)
    return answer, _worker.telemetry.meter.drain()


def serve(argv: list[str]) -> None:
    """A worker process (`_ENTRY`): its arguments are the file descriptors of its ends of
    the two pipes, and its CPU priority and logging."""
    requests, results, nice, log_level, log_encoding = argv
    _serve(Connection(int(requests), writable=False), Connection(int(results), readable=False),
           int(nice), log_level, log_encoding)


def _serve(requests: Connection, results: Connection, nice: int, log_level: str,
           log_encoding: str) -> None:
    """A worker: answer each request, in order, until the daemon closes the pipe."""
    _init_worker(nice, log_level, log_encoding)
    while True:
        try:
            generation, plan, names, decode = pickle.loads(requests.recv_bytes())
            data = requests.recv_bytes()
        except EOFError:
            return
        try:
            reply: tuple[bool, Any] = (True, _process(generation, plan, names, decode, data))
        except Exception as e:  # a processor's error is the batch's, raised in the daemon
            reply = (False, e)
        built = _worker is not None and _worker.generation == generation  # (the plan)
        try:
            answer = pickle.dumps((*reply, built), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an exception that does not pickle
            answer = pickle.dumps((False, RuntimeError(repr(reply[1])), built))
        results.send_bytes(answer)
