"""`memory.page_out`: the resident pages of a library's read-only mappings handed back to
the kernel, its writable mappings and other files left alone."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from meterline.memory import page_out

PAGES = 512  # 2 MiB of 4 KiB pages


def resident_kib(path: Path) -> int:
    """The resident KiB of this process's mappings of `path`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as lines:
        for line in lines:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on (/proc/self/mountinfo: the longest mount
    point above it)."""
    best, kind = "", ""
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields, after = line.split(" - ", 1)
            point = fields.split()[4]
            if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                best, kind = point, after.split()[0]
    return kind


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """A file's pages on tmpfs are memory, which only swap can take: nothing to hand back."""
    if filesystem_of(tmp_path) == "tmpfs":
        pytest.skip("the temporary directory is on tmpfs, whose pages are not the file's")
    return tmp_path


def mapped(path: Path, access: int) -> mmap.mmap:
    """`path` mapped and every page of it read, so that all of it is resident."""
    path.write_bytes(bytes(range(256)) * (PAGES * mmap.PAGESIZE // 256))
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=access)
    sum(mapping[offset] for offset in range(0, len(mapping), mmap.PAGESIZE))
    return mapping


def test_a_read_only_mappings_resident_pages_are_handed_back(tmp_path: Path):
    library = tmp_path / "library.so"
    mapping = mapped(library, mmap.ACCESS_READ)
    assert resident_kib(library) >= PAGES * 4
    assert page_out(str(library)) == len(mapping)
    assert resident_kib(library) < PAGES * 4 // 8
    assert mapping[mmap.PAGESIZE * 7 + 3] == 3, "a page handed back reads from the file again"


def test_a_writable_mapping_is_left_alone(tmp_path: Path):
    library = tmp_path / "library.so"
    mapping = mapped(library, mmap.ACCESS_WRITE)
    assert page_out(str(library)) == 0
    assert resident_kib(library) >= PAGES * 4
    mapping.close()


def test_a_library_this_process_has_not_mapped_is_nothing_to_do(tmp_path: Path):
    other = tmp_path / "other.so"
    mapping = mapped(tmp_path / "library.so", mmap.ACCESS_READ)
    other.write_bytes(b"\0" * mmap.PAGESIZE)
    assert page_out(str(other)) == 0
    assert resident_kib(tmp_path / "library.so") >= PAGES * 4
    mapping.close()
