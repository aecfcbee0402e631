"""The memory limiter: its decisions on a measure the test sets, its limits, its timer, its
measure of a process tree (on a /proc laid out by the test, and on the real one), and the
`service.memory_limiter` block of pipeline.yaml."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from meterline.component import Backpressure
from meterline.config import ConfigError, MemoryLimiterConfig, MetricsConfig, loads
from meterline.memory import (
    DEFAULT_LIMIT_MIB,
    MIB,
    LimitsError,
    MemoryLimiter,
    collect_garbage,
    descendants_of,
    resolve,
    rss_of,
    start_limiter,
    tree_rss,
)
from meterline.telemetry import Telemetry
from meterline.units import Duration
from tests.helpers import metric_value


class Fake:
    """The limiter's world: the memory it measures, the time, the collections it forces."""

    def __init__(self, rss_mib: float = 100, freed_by_gc_mib: float = 0) -> None:
        self.rss = int(rss_mib * MIB)
        self.freed_by_gc = int(freed_by_gc_mib * MIB)
        self.now = 1000.0
        self.collections = 0
        self.measures = 0

    def measure(self) -> int:
        self.measures += 1
        return self.rss

    def collect(self) -> None:
        self.collections += 1
        self.rss -= self.freed_by_gc

    def set(self, rss_mib: float) -> None:
        self.rss = int(rss_mib * MIB)


def limiter(fake: Fake, telemetry: Telemetry | None = None, available: int | None = None,
            **config: object) -> MemoryLimiter:
    settings = {"limit_mib": 1000, "spike_limit_mib": 200, **config}
    return MemoryLimiter(MemoryLimiterConfig(**settings),
                         telemetry.meter if telemetry else None, measure=fake.measure,
                         clock=lambda: fake.now, collect=fake.collect,
                         available=lambda: available)


def refuses(memory: MemoryLimiter, count: int = 1) -> bool:
    try:
        memory.admit(count, "webhook")
    except Backpressure:
        return True
    return False


# --- decisions -----------------------------------------------------------------------
def test_below_the_soft_limit_batches_are_accepted():
    fake = Fake(rss_mib=700)
    memory = limiter(fake)  # hard 1000 MiB, soft 800 MiB
    memory.check()
    assert not memory.should_refuse()
    assert not refuses(memory)
    assert fake.collections == 0


def test_above_the_soft_limit_receivers_are_pushed_back_and_accept_again_below_it():
    fake = Fake(rss_mib=700)
    telemetry = Telemetry(MetricsConfig())
    memory = limiter(fake, telemetry, check_interval=Duration(2))
    memory.check()
    fake.set(850)
    assert not refuses(memory), "decided by the last check, not per batch"
    memory.check()
    assert memory.should_refuse()
    with pytest.raises(Backpressure) as refused:
        memory.admit(40, "webhook")
    assert refused.value.retry_after == 2.0
    assert "850 MiB" in str(refused.value) and "800 MiB" in str(refused.value)
    assert refuses(memory, 2)
    assert fake.collections == 0, "no collection forced below the hard limit"
    fake.set(799)
    memory.check()
    assert not memory.should_refuse()
    assert not refuses(memory)
    assert metric_value(telemetry.registry, "meterline_memory_limiter_refused_events_total",
                        receiver="webhook") == 42
    assert metric_value(telemetry.registry, "meterline_process_memory_rss_bytes") == 799 * MIB
    assert metric_value(telemetry.registry, "meterline_memory_limiter_limit_bytes",
                        limit="soft") == 800 * MIB
    assert metric_value(telemetry.registry, "meterline_memory_limiter_limit_bytes",
                        limit="hard") == 1000 * MIB


def test_exactly_at_the_soft_limit_is_refused():
    fake = Fake(rss_mib=800)
    memory = limiter(fake)
    memory.check()
    assert memory.should_refuse()


def test_past_the_hard_limit_a_collection_is_forced_once_per_interval():
    fake = Fake(rss_mib=1100, freed_by_gc_mib=50)
    memory = limiter(fake, check_interval=Duration(1))
    assert memory.check() == 1050 * MIB, "the measure after the collection decides"
    assert fake.collections == 1 and memory.should_refuse()
    fake.set(1100)
    memory.check()  # a second check within the same interval collects no more
    assert fake.collections == 1
    fake.now += 1.0
    memory.check()
    assert fake.collections == 2
    fake.now += 1.0
    fake.set(900)  # above the soft limit only: refused, no collection
    memory.check()
    assert fake.collections == 2 and memory.should_refuse()


def test_a_collection_that_brings_memory_under_the_soft_limit_lets_batches_in():
    fake = Fake(rss_mib=1020, freed_by_gc_mib=300)
    memory = limiter(fake)
    memory.check()
    assert fake.collections == 1
    assert not memory.should_refuse()


def test_the_refusal_to_raise_is_backpressure_counted_by_receiver():
    fake = Fake(rss_mib=900)
    telemetry = Telemetry(MetricsConfig())
    memory = limiter(fake, telemetry, check_interval=Duration(0.2))
    memory.check()
    refusal = memory.refusal(7, "otlp")
    assert isinstance(refusal, Backpressure) and refusal.retry_after == 1.0
    assert metric_value(telemetry.registry, "meterline_memory_limiter_refused_events_total",
                        receiver="otlp") == 7


def test_nothing_is_refused_before_the_first_measure():
    memory = limiter(Fake(rss_mib=5000))
    assert not memory.should_refuse()


def test_the_default_collection_runs():
    collect_garbage()  # gc.collect and, on glibc, malloc_trim


# --- limits --------------------------------------------------------------------------
def test_default_limits_are_2048_mib_with_a_fifth_for_spikes():
    limits = resolve(MemoryLimiterConfig(), available=24 << 30)
    assert limits.hard == DEFAULT_LIMIT_MIB * MIB == 2048 * MIB
    assert limits.soft == limits.hard - int(limits.hard * 0.2)


def test_a_smaller_cgroup_or_machine_lowers_the_default_hard_limit_to_80_percent():
    limits = resolve(MemoryLimiterConfig(), available=512 * MIB)
    assert limits.hard == int(512 * MIB * 0.8)
    assert "80%" in limits.why


def test_a_configured_limit_is_kept_whatever_the_machine():
    limits = resolve(MemoryLimiterConfig(limit_mib=4096, spike_limit_mib=512),
                     available=512 * MIB)
    assert (limits.hard, limits.soft) == (4096 * MIB, 3584 * MIB)


def test_a_spike_limit_above_the_derived_hard_limit_is_refused_with_what_to_do():
    with pytest.raises(LimitsError, match=r"spike_limit_mib \(500\) must be less than the hard "
                                         r"limit, 409 MiB .*set limit_mib"):
        resolve(MemoryLimiterConfig(spike_limit_mib=500), available=512 * MIB)


def test_limits_that_do_not_fit_stop_the_daemon_as_a_runtime_error_would():
    assert issubclass(LimitsError, RuntimeError)  # `meterline run` reports it, "cannot run"


def test_a_reload_with_limits_that_do_not_fit_keeps_those_in_force():
    fake = Fake(rss_mib=700)
    memory = MemoryLimiter(MemoryLimiterConfig(), measure=fake.measure,
                           available=lambda: 512 * MIB)
    before = memory.limits
    with pytest.raises(LimitsError):
        memory.configure(MemoryLimiterConfig(spike_limit_mib=1000))
    assert memory.limits == before


def test_a_reload_applies_new_limits():
    fake = Fake(rss_mib=700)
    memory = limiter(fake)
    memory.check()
    memory.configure(MemoryLimiterConfig(limit_mib=800, spike_limit_mib=200,
                                         check_interval=Duration(0.5)))
    memory.check()
    assert memory.should_refuse()
    assert memory.retry_after == 1.0, "Retry-After is at least a second"


# --- the timer -----------------------------------------------------------------------
async def test_the_timer_measures_every_interval_until_shutdown():
    fake = Fake(rss_mib=100)
    slept: list[float] = []
    ticks: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await ticks.get()

    memory = MemoryLimiter(MemoryLimiterConfig(limit_mib=1000, check_interval=Duration(0.25)),
                           measure=fake.measure, clock=lambda: fake.now,
                           collect=fake.collect, available=lambda: None, sleep=sleep)
    await memory.start()
    assert fake.measures == 1, "measured at start, before the first batch"
    fake.set(900)
    for expected in (2, 3):
        ticks.put_nowait(None)
        await settle(lambda n=expected: fake.measures == n)
    assert memory.should_refuse()
    assert slept[:2] == [0.25, 0.25]
    await memory.shutdown()
    ticks.put_nowait(None)
    await settle(lambda: True)
    assert fake.measures == 3, "no measure after shutdown"


async def test_start_limiter_builds_none_when_off_and_a_running_limiter_when_on():
    assert await start_limiter(None, None) is None
    telemetry = Telemetry(MetricsConfig())
    memory = await start_limiter(MemoryLimiterConfig(), telemetry.meter)
    assert memory is not None
    try:
        assert memory.rss is not None and memory.rss > 0, "measured this process at start"
        assert not memory.should_refuse()
        assert metric_value(telemetry.registry, "meterline_process_memory_rss_bytes") > 0
    finally:
        await memory.shutdown()


async def test_a_failing_measure_does_not_stop_the_timer():
    fake = Fake()
    failures = iter([RuntimeError("proc gone")])
    ticks: asyncio.Queue[None] = asyncio.Queue()

    def measure() -> int:
        if fake.measures == 1 and (error := next(failures, None)):
            fake.measures += 1
            raise error
        return fake.measure()

    memory = MemoryLimiter(MemoryLimiterConfig(), measure=measure, available=lambda: None,
                           sleep=lambda _: ticks.get())
    await memory.start()
    ticks.put_nowait(None)
    await settle(lambda: fake.measures == 2)
    ticks.put_nowait(None)
    await settle(lambda: fake.measures == 3)
    await memory.shutdown()


async def settle(condition, turns: int = 2000) -> None:
    """Let the loop run until `condition()` holds (a check runs in a thread of its own: up
    to 2 s for it)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met")


async def test_the_timer_measures_in_a_thread_of_its_own_not_on_the_event_loop():
    threads: list[str] = []
    ticks: asyncio.Queue[None] = asyncio.Queue()

    def measure() -> int:
        threads.append(threading.current_thread().name)
        return 100 * MIB

    memory = MemoryLimiter(MemoryLimiterConfig(), measure=measure, available=lambda: None,
                           sleep=lambda _: ticks.get())
    await memory.start()  # (the first measure, before any batch: here)
    ticks.put_nowait(None)
    await settle(lambda: len(threads) == 2)
    await memory.shutdown()
    assert threads[1].startswith("memory-limiter") and memory.rss == 100 * MIB


# --- measuring a process tree --------------------------------------------------------
def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_measure_sums_a_process_and_all_its_descendants(tmp_path: Path):
    proc = tmp_path / "proc"
    write(proc / "100/status", "Name:\tmeterline\nVmRSS:\t    1000 kB\nRssAnon:\t 800 kB\n")
    write(proc / "100/task/100/children", "101 102 ")
    write(proc / "100/task/107/children", "")  # a thread that started no process
    write(proc / "101/status", "Name:\tworker\nVmRSS:\t2000 kB\n")
    write(proc / "101/task/101/children", "103")
    write(proc / "102/status", "Name:\tzombie\n")  # exited: no VmRSS any more
    write(proc / "102/task/102/children", "")
    write(proc / "103/status", "VmRSS:\t500 kB\n")
    write(proc / "103/task/103/children", "")
    write(proc / "200/status", "VmRSS:\t9999 kB\n")  # not ours
    assert sorted(descendants_of(100, proc)) == [101, 102, 103]
    assert rss_of(102, proc) is None and rss_of(999, proc) is None
    assert tree_rss(100, proc) == (1000 + 2000 + 500) * 1024


def test_without_children_files_the_parents_of_all_processes_are_read(tmp_path: Path):
    proc = tmp_path / "proc"
    write(proc / "100/status", "VmRSS:\t1000 kB\n")
    (proc / "100/task/100").mkdir(parents=True)  # an older kernel: no `children` file
    write(proc / "100/stat", "100 (meterline) S 1 100 100 0")
    write(proc / "101/status", "VmRSS:\t2000 kB\n")
    write(proc / "101/stat", "101 (a (strange) name) S 100 100 100 0")
    (proc / "101/task/101").mkdir(parents=True)
    write(proc / "102/status", "VmRSS:\t4000 kB\n")
    write(proc / "102/stat", "102 (other) S 1 102 102 0")
    assert tree_rss(100, proc) == 3000 * 1024


def test_the_real_measure_includes_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        assert child.pid in descendants_of(os.getpid())
        own = rss_of(os.getpid())
        assert own is not None and own > 0
        assert tree_rss() > own
    finally:
        child.communicate(b"")


# --- pipeline.yaml -------------------------------------------------------------------
PIPELINE = """\
receivers:
  webhook: {listen: "127.0.0.1:8090"}
exporters:
  debug: {}
service:
  pipelines:
    p: {receivers: [webhook], exporters: [debug]}
"""


def problems(block: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        loads(PIPELINE + textwrap.indent(block, "  "), "pipeline.yaml", {})
    return [str(p) for p in e.value.problems]


def test_the_limiter_is_on_by_default():
    assert loads(PIPELINE, "pipeline.yaml", {}).service.memory_limiter == MemoryLimiterConfig()
    assert MemoryLimiterConfig().check_interval == 1.0


def test_null_turns_the_limiter_off():
    loaded = loads(PIPELINE + "  memory_limiter: null\n", "pipeline.yaml", {})
    assert loaded.service.memory_limiter is None


def test_settings_are_read():
    loaded = loads(PIPELINE + "  memory_limiter: {limit_mib: 600, spike_limit_mib: 100, "
                              "check_interval: 500ms}\n", "pipeline.yaml", {})
    assert loaded.service.memory_limiter == MemoryLimiterConfig(
        limit_mib=600, spike_limit_mib=100, check_interval=Duration(0.5))


@pytest.mark.parametrize(("block", "message"), [
    ("memory_limiter: {limit_mib: 200, spike_limit_mib: 200}",
     "pipeline.yaml:8: service.memory_limiter: spike_limit_mib (200) must be less than "
     "limit_mib (200)"),
    ("memory_limiter: {limit_mib: 0}",
     "pipeline.yaml:8: service.memory_limiter: limit_mib must be at least 1, got 0"),
    ("memory_limiter: {spike_limit_mib: -5}",
     "pipeline.yaml:8: service.memory_limiter: spike_limit_mib must not be negative, got -5"),
    ("memory_limiter: {check_interval: 0s}",
     "pipeline.yaml:8: service.memory_limiter: check_interval must be a positive duration "
     "such as 1s"),
    ("memory_limiter: {check_interval: soon}",
     "pipeline.yaml:8: service.memory_limiter.check_interval: expected a duration such as "
     "200ms, 1s or 10m, got 'soon'"),
    ("memory_limiter: {limit_mib: lots}",
     "pipeline.yaml:8: service.memory_limiter.limit_mib: expected int | null, got str"),
    ("memory_limiter: {limit: 300}",
     "pipeline.yaml:8: service.memory_limiter.limit: unknown key (expected one of: limit_mib, "
     "spike_limit_mib, check_interval)"),
])
def test_invalid_settings_name_line_key_and_what_is_expected(block: str, message: str):
    assert problems(block + "\n") == [message]
