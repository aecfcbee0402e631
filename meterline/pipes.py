"""Frames between the event loop and a worker process, on a pipe each way.

Framed as `multiprocessing.Connection` frames them, so that the worker, which may block,
reads and writes with one over its ends (plain file descriptors it inherits). The loop
writes through an asyncio pipe transport (buffered: a big batch never blocks it) and
reads through `FrameReader`: no thread stands between the loop and the workers.
`concurrent.futures.ProcessPoolExecutor` put two (a feeder, a manager) and a pipe and a
futex wake-up each on every batch's way: 695-800 us of the main process's CPU per round
trip of a single-event batch, against 165-190 this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")  # after a length of -1: a frame of 2 GiB or more
_PIPE_BYTES = 1 << 20


def header(size: int) -> bytes:
    """What goes before a frame of `size` bytes."""
    if size > 0x7FFFFFFF:
        return _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    return _LENGTH.pack(size)


def as_file(fd: int, mode: str) -> Any:
    """A pipe's end as a file, for an asyncio pipe transport (which owns it from then)."""
    return os.fdopen(fd, mode, buffering=0)


def widen(fd: int) -> None:
    """Give a pipe room for a batch of about a megabyte, so that it crosses in a few
    writes rather than in 64 KiB ones that each wait for the other side to read (batches
    of 1,000 events through the workers: 4.8-5.8 us of the main process's CPU an event
    against 7.1-7.8, 37,000-50,000 events/s against 34,000-38,000). Linux; up to
    `/proc/sys/fs/pipe-max-size`, 1 MiB by default."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


class FrameReader(asyncio.Protocol):
    """Each whole frame read to `on_frame`; `on_lost` once the pipe closes."""

    def __init__(self, on_frame: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= _LENGTH.size:
            (size,), start = _LENGTH.unpack_from(buffer), _LENGTH.size
            if size == -1:
                if len(buffer) < _LENGTH.size + _LONG_LENGTH.size:
                    return
                (size,), start = _LONG_LENGTH.unpack_from(buffer, _LENGTH.size), start + 8
            if len(buffer) < start + size:
                return
            with memoryview(buffer) as view:
                frame = bytes(view[start:start + size])
            del buffer[:start + size]
            self.on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()
