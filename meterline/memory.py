"""The memory limiter: receivers push back while the daemon's memory is high.

After the OpenTelemetry Collector's `memory_limiter`. Every `check_interval` the
limiter measures the resident memory (VmRSS) of the daemon's process and of all
its descendants (the processor workers), summed. From the soft limit
(`limit_mib - spike_limit_mib`) on, `should_refuse()` is true and the core raises
`refusal()`, a `Backpressure`, which the receivers turn into HTTP 429 with
Retry-After, gRPC RESOURCE_EXHAUSTED or a paused Kafka consumer: nothing is
queued, the client sends again later, so nothing is lost, and the queues drain
meanwhile. From the hard limit on, each check also forces a garbage collection
(and hands the freed heap back to the system) before measuring again. Below the
soft limit, batches are accepted again.

RSS counts the pages of mapped files too: in a daemon with the embedded
ClickHouse, 60-70 MB of it are pages of chDB's library, which the kernel can drop and
read again (180 MB after chDB's start, until `page_out` hands back what only the start
used: see `exporters/clickhouse/connection.py`).

A check reads `/proc` (about half a millisecond for a daemon with chDB and two
workers), once per interval on a timer, never per batch: `should_refuse()` only
reads the last decision. The clock, the measure, the collection and the sleep
are injectable, so tests decide without waiting.

Self-telemetry: `meterline_process_memory_rss_bytes` (the last measure),
`meterline_memory_limiter_limit_bytes{limit="soft"|"hard"}` and
`meterline_memory_limiter_refused_events_total{receiver}`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from meterline import logs
from meterline.component import Backpressure, cancel_and_wait
from meterline.config import MemoryLimiterConfig
from meterline.resources import memory_available

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

MIB = 1 << 20
DEFAULT_LIMIT_MIB = 2048
"""The hard limit when none is configured (soft limit 1638 MiB). The daemon's processes
peaked at 530-554 MB together taking 60,000 events at full speed on 2 cores (730-840 MB
before chDB's start-up pages were handed back; with one worker per core, a bigger host
adds some 45 MB per core), so the default leaves more than twice that before pushing
back: a safety net for abnormal growth (exporters stuck behind full memory queues, a
leak, a runaway query), which must not refuse normal bursts, while a daemon that runs
beside a gateway never takes more than 2 GiB of its host. In a smaller cgroup or
machine, 80% of it."""
AVAILABLE_SHARE = 0.8  # of a smaller cgroup or machine: push back before the OOM killer acts
SPIKE_SHARE = 0.2  # the default spike limit, as a share of the hard limit (the Collector's)

Measure = Callable[[], int]
"""Bytes of resident memory of the whole daemon."""


# --- measuring -----------------------------------------------------------------------
def rss_of(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The VmRSS of one process in bytes (None when it is gone, or a kernel thread)."""
    try:
        with open(proc / str(pid) / "status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def children_of(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The child processes of `pid`: from `/proc/PID/task/TID/children` (one read per
    thread), or, where the kernel lacks those files, from the parent of every process."""
    tasks = proc / str(pid) / "task"
    found: list[int] = []
    try:
        tids = os.listdir(tasks)
    except OSError:
        return []
    for tid in tids:
        try:
            found += [int(c) for c in (tasks / tid / "children").read_bytes().split()]
        except FileNotFoundError:
            if not (tasks / tid).exists():
                continue  # the thread ended meanwhile
            return _children_by_scan(pid, proc)
        except (OSError, ValueError):
            continue
    return found


def _children_by_scan(pid: int, proc: Path) -> list[int]:
    found = []
    for name in os.listdir(proc):
        if name.isdigit():
            try:
                stat = (proc / name / "stat").read_bytes()
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                if int(stat[stat.rfind(b")") + 2:].split()[1]) == pid:
                    found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def descendants_of(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process below `pid` (children, their children...)."""
    out: list[int] = []
    pending = children_of(pid, proc)
    seen = {pid}
    while pending:
        child = pending.pop()
        if child in seen:
            continue
        seen.add(child)
        out.append(child)
        pending += children_of(child, proc)
    return out


def tree_rss(pid: int | None = None, proc: Path = Path("/proc")) -> int:
    """The summed VmRSS of `pid` (default: this process) and all its descendants, in
    bytes. Pages two processes share (libraries) count in each, as `ps` counts them."""
    root = os.getpid() if pid is None else pid
    return sum(rss or 0 for rss in (rss_of(p, proc) for p in (root, *descendants_of(root, proc))))


def collect_garbage() -> None:
    """Python's garbage collection, then glibc's `malloc_trim`, which hands the heap freed
    meanwhile back to the system (freed memory otherwise stays in the process's RSS)."""
    gc.collect()
    if trim := _malloc_trim():
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


MADV_PAGEOUT = 21  # Linux 5.4 and later


def page_out(library: str, maps: Path = Path("/proc/self/maps")) -> int:
    """Ask the kernel to reclaim the resident pages of `library`'s read-only mappings in
    this process (its code and constant data: clean pages of the file, read again from it
    when touched); the bytes of the mappings advised, 0 where the kernel refuses.

    Why: a large library's start-up touches far more of it than its work does later. chDB
    registers every function, format and engine ClickHouse has as it loads, which leaves
    about 180 MB of its 555 MB library resident; inserting and querying afterwards touch
    about a third of that. The kernel would drop the rest only under memory pressure, and
    until then it counts in the process's RSS, in the memory limiter's measure and in a
    container's working set. Writable mappings are left alone: their pages are the
    process's own (relocations, globals), which only swap could take."""
    target = os.path.realpath(library)
    ranges = []
    with open(maps) as lines:
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target and "w" not in fields[1]:
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                ranges.append((start, end - start))
    if not ranges or (madvise := _madvise()) is None:
        return 0
    return sum(length for start, length in ranges if madvise(start, length, MADV_PAGEOUT) == 0)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


# --- limits --------------------------------------------------------------------------
class LimitsError(RuntimeError):
    """The configured spike limit leaves no soft limit under the hard limit derived from
    this machine (a RuntimeError, as the daemon reports what stops it from running)."""


@dataclass(frozen=True)
class Limits:
    hard: int  # bytes
    soft: int  # bytes
    why: str  # how the hard limit was chosen, for the log


def resolve(config: MemoryLimiterConfig, available: int | None) -> Limits:
    """The limits in bytes. Raises `LimitsError` when a configured spike limit leaves no
    soft limit under a derived hard limit."""
    if config.limit_mib is not None:
        hard, why = config.limit_mib * MIB, "limit_mib"
    else:
        hard, why = DEFAULT_LIMIT_MIB * MIB, f"default {DEFAULT_LIMIT_MIB} MiB"
        if available is not None and available * AVAILABLE_SHARE < hard:
            hard = int(available * AVAILABLE_SHARE)
            why = f"80% of the {available // MIB} MiB available (cgroup or machine)"
    spike = (config.spike_limit_mib * MIB if config.spike_limit_mib is not None
             else int(hard * SPIKE_SHARE))
    if spike >= hard:
        raise LimitsError(f"service.memory_limiter.spike_limit_mib ({spike // MIB}) must be "
                         f"less than the hard limit, {hard // MIB} MiB ({why}): set limit_mib")
    return Limits(hard, hard - spike, why)


# --- the limiter ---------------------------------------------------------------------
class MemoryLimiter:
    """Built once per daemon from `service.memory_limiter` (`start_limiter`): `start()`
    runs its timer, `should_refuse()` is asked before a batch enters the pipelines (and
    `refusal()` raised when it is true; `admit()` does both), `shutdown()` stops it."""

    def __init__(self, config: MemoryLimiterConfig, meter: Meter | None = None, *,
                 measure: Measure = tree_rss,
                 clock: Callable[[], float] = time.monotonic,
                 collect: Callable[[], None] = collect_garbage,
                 available: Callable[[], int | None] = memory_available,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 log: FilteringBoundLogger | None = None) -> None:
        self._measure = measure
        self._clock = clock
        self._collect = collect
        self._available = available
        self._sleep = sleep
        self.log = log or logs.get(component="memory_limiter")
        self.configure(config)
        self.rss: int | None = None  # the last measure, bytes (None: not measured yet)
        self.refusing = False
        self.collections = 0  # forced garbage collections
        self._last_collection: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="memory-limiter")
        self._refused = None
        if meter is not None:
            self._refused = meter.create_counter(
                "meterline_memory_limiter_refused_events",
                description="Events receivers were told to send again later because the "
                            "daemon's memory was above the memory limiter's soft limit")
            meter.create_observable_gauge(
                "meterline_process_memory_rss_bytes", callbacks=[self._observe_rss],
                description="Resident memory of the daemon, its worker processes included, "
                            "as the memory limiter last measured it")
            meter.create_observable_gauge(
                "meterline_memory_limiter_limit_bytes", callbacks=[self._observe_limits],
                description="The memory limiter's limits: soft (receivers pushed back) "
                            "and hard (garbage collection forced)")

    def configure(self, config: MemoryLimiterConfig) -> None:
        """Apply (new) settings; for a reload that keeps the limiter on. Raises
        `LimitsError` as `resolve` does (the settings in force then stay)."""
        self.limits = resolve(config, self._available())
        self.interval = float(config.check_interval)
        self.retry_after = max(1.0, self.interval)

    # --- deciding ------------------------------------------------------------------
    def check(self) -> int:
        """Measure, force a collection past the hard limit (at most once per interval), and
        decide whether to refuse until the next check. Returns the measure in bytes."""
        rss = self._measure()
        now = self._clock()
        # once per interval; a timer may wake a hair early, hence the slack
        if rss >= self.limits.hard and (
                self._last_collection is None
                or now - self._last_collection >= self.interval * 0.9):
            self._collect()
            self.collections += 1
            self._last_collection = now
            before, rss = rss, self._measure()
            self.log.warning("memory above the hard limit: garbage collected",
                             rss_mib=round(before / MIB), after_mib=round(rss / MIB),
                             hard_limit_mib=round(self.limits.hard / MIB))
        self.rss = rss
        refusing = rss >= self.limits.soft
        if refusing != self.refusing:
            self.refusing = refusing
            if refusing:
                self.log.warning("memory above the soft limit: receivers push back",
                                 rss_mib=round(rss / MIB),
                                 soft_limit_mib=round(self.limits.soft / MIB),
                                 hard_limit_mib=round(self.limits.hard / MIB))
            else:
                self.log.info("memory below the soft limit again: receivers accept",
                              rss_mib=round(rss / MIB),
                              soft_limit_mib=round(self.limits.soft / MIB))
        return rss

    def should_refuse(self) -> bool:
        """Whether the last check found the memory at or above the soft limit."""
        return self.refusing

    def refusal(self, count: int, receiver: str | None = None) -> Backpressure:
        """The `Backpressure` to raise for a batch of `count` events refused (counted, by
        receiver), with the check interval as Retry-After."""
        if self._refused is not None:
            self._refused.add(count, {"receiver": receiver} if receiver else None)
        used = round((self.rss or 0) / MIB)
        return Backpressure(f"memory use ({used} MiB) is above the memory limiter's soft "
                            f"limit ({round(self.limits.soft / MIB)} MiB)", self.retry_after)

    def admit(self, count: int, receiver: str | None = None) -> None:
        """Raise `refusal(count, receiver)` while refusing; return at once otherwise."""
        if self.refusing:
            raise self.refusal(count, receiver)

    # --- the timer -----------------------------------------------------------------
    async def start(self) -> None:
        """Measure once now (so that the first batches are judged), then every interval."""
        self.check()
        self.log.info("memory limiter on", rss_mib=round((self.rss or 0) / MIB),
                      soft_limit_mib=round(self.limits.soft / MIB),
                      hard_limit_mib=round(self.limits.hard / MIB), hard_limit=self.limits.why,
                      check_interval_s=self.interval)
        self._task = asyncio.create_task(self.run(), name="memory limiter")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._sleep(self.interval)
            try:
                # in a thread of its own: the measure reads /proc for each of the daemon's
                # threads and processes (0.5 ms idle, several under load: on the loop,
                # every client would wait that long each second)
                await loop.run_in_executor(self._thread, self.check)
            except Exception as e:  # never let a failed measure stop the checks
                self.log.warning("cannot measure the memory", error=str(e))

    async def shutdown(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # --- self-telemetry ------------------------------------------------------------
    def _observe_rss(self, _: CallbackOptions) -> Iterable[Observation]:
        if self.rss is not None:
            yield Observation(self.rss)

    def _observe_limits(self, _: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.limits.soft, {"limit": "soft"})
        yield Observation(self.limits.hard, {"limit": "hard"})


async def start_limiter(config: MemoryLimiterConfig | None,
                        meter: Meter | None) -> MemoryLimiter | None:
    """Build and start the limiter `service.memory_limiter` describes (None when it is
    null). Raises `LimitsError` (a RuntimeError) when the limits do not fit this machine."""
    if config is None:
        return None
    limiter = MemoryLimiter(config, meter)
    await limiter.start()
    return limiter
