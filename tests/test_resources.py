"""What the daemon may use of its machine (`meterline/resources.py`), read from a /proc and
a cgroup tree laid out by each test as a container's would be, and the default number of
processing workers it gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meterline import workers
from meterline.config import loads
from meterline.resources import cores_available, cpu_quota, memory_available
from meterline.service import Service
from meterline.workers import MEMORY_PER_WORKER_MIB, workers_for

MIB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "proc", tmp_path / "cgroup"


# --- memory --------------------------------------------------------------------------
def test_the_memory_available_is_the_smallest_cgroup_limit_or_the_machine(tree):
    proc, cgroup = tree
    write(proc / "meminfo", "MemTotal:       24683792 kB\nMemFree: 1 kB\n")
    write(proc / "self/cgroup", "0::/a/b\n")
    write(cgroup / "a/memory.max", f"{512 * MIB}\n")
    write(cgroup / "a/b/memory.max", "max\n")
    assert memory_available(proc, cgroup) == 512 * MIB
    write(proc / "self/cgroup", "4:memory:/x\n0::/\n")  # cgroup v1, no limit set
    write(cgroup / "memory/x/memory.limit_in_bytes", "9223372036854771712\n")
    assert memory_available(proc, cgroup) == 24683792 * 1024
    write(cgroup / "memory/x/memory.limit_in_bytes", f"{300 * MIB}\n")
    assert memory_available(proc, cgroup) == 300 * MIB


def test_the_memory_available_here_is_known():
    available = memory_available()
    assert available is not None and available > 64 * MIB


# --- CPU -----------------------------------------------------------------------------
def test_a_cgroup_v2_cpu_max_is_a_quota_in_cpus(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/kubepods/pod1/app\n")
    write(cgroup / "kubepods/pod1/app/cpu.max", "150000 100000\n")
    assert cpu_quota(proc, cgroup) == 1.5


def test_the_smallest_quota_up_the_cgroup_path_applies(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/kubepods/pod1/app\n")
    write(cgroup / "kubepods/pod1/cpu.max", "200000 100000\n")  # the pod's limit
    write(cgroup / "kubepods/pod1/app/cpu.max", "max 100000\n")  # the container: none
    assert cpu_quota(proc, cgroup) == 2.0


def test_no_quota_anywhere_is_none(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/a\n")
    write(cgroup / "a/cpu.max", "max 100000\n")
    assert cpu_quota(proc, cgroup) is None
    write(proc / "self/cgroup", "")  # no cgroup at all (not Linux's, a bare chroot)
    assert cpu_quota(proc, cgroup) is None


def test_a_cgroup_v1_quota_is_read_where_a_container_sees_it(tree):
    # Docker on cgroup v1: /proc/self/cgroup names the host's path, while the
    # container's own cgroup is mounted at the controller's root.
    proc, cgroup = tree
    write(proc / "self/cgroup", "5:cpu,cpuacct:/docker/3f2a\n4:memory:/docker/3f2a\n")
    write(cgroup / "cpu,cpuacct/cpu.cfs_quota_us", "50000\n")
    write(cgroup / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cpu_quota(proc, cgroup) == 0.5
    write(cgroup / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")  # v1's "no quota"
    assert cpu_quota(proc, cgroup) is None


def test_unreadable_or_malformed_cpu_files_are_no_quota(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/a\n")
    write(cgroup / "a/cpu.max", "lots 0\n")
    assert cpu_quota(proc, cgroup) is None
    write(cgroup / "a/cpu.max", "100000 0\n")
    assert cpu_quota(proc, cgroup) is None


def test_a_quota_below_the_cores_sets_them_rounded_up(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/a\n")
    write(cgroup / "a/cpu.max", "50000 100000\n")
    assert cores_available(proc, cgroup) == (1, "the cgroup's CPU quota of 0.5 CPUs")


def test_without_a_quota_the_cores_are_the_affinity(tree):
    proc, cgroup = tree
    write(proc / "self/cgroup", "0::/a\n")
    cores = len(os.sched_getaffinity(0))
    assert cores_available(proc, cgroup) == (cores, f"{cores} cores")


def test_without_an_affinity_the_cores_are_every_core(tree, monkeypatch):
    proc, cgroup = tree
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert cores_available(proc, cgroup) == (12, "12 cores")


# --- the default number of workers ---------------------------------------------------
def test_workers_are_one_per_core_when_memory_holds_them():
    assert workers_for(32, "32 cores", 64 << 30) == (32, "32 cores")
    assert workers_for(2, "2 cores", None) == (2, "2 cores")


def test_a_small_memory_limit_bounds_the_workers_whatever_the_cores():
    # the shipped sidecar manifest: a 512 MiB pod, on a node of many cores
    count, why = workers_for(32, "32 cores", 512 * MIB)
    assert count == 512 // MEMORY_PER_WORKER_MIB == 2
    assert "512 MiB of memory" in why


def test_memory_for_less_than_one_worker_still_gives_one():
    assert workers_for(8, "8 cores", 100 * MIB)[0] == 1


def test_the_daemon_sizes_its_pool_from_its_cgroup(monkeypatch, tmp_path):
    monkeypatch.setattr(workers.resources, "cores_available", lambda: (3, "the cgroup's"))
    monkeypatch.setattr(workers.resources, "memory_available", lambda: 64 << 30)
    config = loads(f"""
receivers: {{webhook: {{listen: "127.0.0.1:0"}}}}
exporters: {{debug: {{}}}}
service:
  data_dir: {tmp_path}
  admin: null
  pipelines: {{p: {{receivers: [webhook], exporters: [debug]}}}}
""")
    service = Service(config)
    assert service.pool is not None and service.pool.workers == 3
    monkeypatch.setattr(workers.resources, "memory_available", lambda: 256 * MIB)
    assert Service(config).pool is None  # one worker: processors in the daemon itself
