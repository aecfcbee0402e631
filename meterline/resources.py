"""What the daemon may use of its machine: cores and memory, within its cgroup's limits.

A container (Docker's `--cpus`/`--memory`, a Kubernetes pod's `limits`) is limited by
its cgroup, not by what the process sees of the machine: `/proc/meminfo` and the CPU
affinity show the whole node. Defaults sized from the node alone go wrong there: a pod
limited to 2 CPUs and 512 MiB on a 32-core node would start 32 processing workers, some
45 MB each, and be killed for memory before it took an event. So the defaults that
scale with the machine (the memory limiter's limit, the number of workers) read the
limits here, which take the cgroup's into account (v2, and v1's controllers).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no memory limit" as a number near 2**63


def memory_available(proc: Path = PROC, cgroup: Path = CGROUP) -> int | None:
    """The memory this process may have, in bytes: the machine's, or its cgroup's limit
    (v2 `memory.max` or v1 `memory.limit_in_bytes`, the smallest along the path) when less.
    None when unknown."""
    total: int | None = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    limits = []
    for version, directory in _directories("memory", proc, cgroup):
        text = _read(directory / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
        with contextlib.suppress(ValueError):
            if text and text != "max" and int(text) < _UNLIMITED:
                limits.append(int(text))
    candidates = [v for v in (total, *limits) if v]
    return min(candidates) if candidates else None


def cores_available(proc: Path = PROC, cgroup: Path = CGROUP) -> tuple[int, str]:
    """The cores this process may keep busy, and what set that: the cores it may run on
    (its CPU affinity), or fewer when its cgroup's CPU quota allows less time than that
    (a quota of 1.5 CPUs counts as 2: the half core is still worth a worker)."""
    cores = _affinity()
    quota = cpu_quota(proc, cgroup)
    if quota is not None and quota < cores:
        return max(1, math.ceil(quota)), f"the cgroup's CPU quota of {quota:g} CPUs"
    return cores, f"{cores} cores"


def cpu_quota(proc: Path = PROC, cgroup: Path = CGROUP) -> float | None:
    """The CPUs' worth of time the process's cgroup allows per period (v2 `cpu.max`, v1
    `cpu.cfs_quota_us` over `cpu.cfs_period_us`; the smallest along the path), or None
    when no quota is set."""
    quotas = []
    for version, directory in _directories("cpu", proc, cgroup):
        if version == 2:
            quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
        else:
            quota = _read(directory / "cpu.cfs_quota_us") or "-1"
            period = _read(directory / "cpu.cfs_period_us") or ""
        with contextlib.suppress(ValueError, ZeroDivisionError):
            if quota not in ("max", "-1"):
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _directories(controller: str, proc: Path, cgroup: Path) -> Iterator[tuple[int, Path]]:
    """Each directory of the process's cgroup where `controller`'s limits may be set,
    with the cgroup version, from its own up to its hierarchy's root: a limit anywhere
    up the path applies."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # v2: one unified hierarchy
            version, base = 2, cgroup
        elif controller in controllers.split(","):  # v1: mounted as its controllers
            version, base = 1, cgroup / controllers  # (`memory`, `cpu,cpuacct`)
        else:
            continue
        directory = base / path.lstrip("/")
        while True:
            yield version, directory
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent


def _affinity() -> int:
    """The cores this process may run on: its CPU affinity, where the system has one (not
    macOS), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
