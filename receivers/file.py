"""Receiver `file`: replay or backfill from a JSONL file, resumable.

Each line is one item in any format the decoders know (meterline's own JSON
lines, such as the file exporter and dead-letter files write, Otoroshi or
LiteLLM). Progress is checkpointed after every batch the pipeline has durably
accepted, so a restart resumes where it stopped instead of re-reading; a file
replaced by another (new inode, or shorter than the checkpoint) is read from
its start. With `follow`, lines appended later are read as they come.

A line longer than `max_line_mb` (a binary file, JSON never split into lines) is
skipped, counted and logged, without being kept: it costs the time to read it, not
its size in memory (before, a 300 MB line took 40 s of copying on the event loop).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec

from meterline import bounds
from meterline.backpressure import offer
from meterline.component import Config, Consumer, Context, Factory, Receiver, cancel_and_wait
from meterline.event import Event
from meterline.receivers.decoders import DecodeError, NotAnLLMCall, decode_item, loggable
from meterline.units import Duration

_raw = msgspec.json.Decoder()
_CHUNK = 1 << 20


class FileReceiverConfig(Config):
    path: str  # the JSONL file read (one event per line; a dead-letter file too)
    batch_size: int = 1000  # events handed to the pipeline at once
    start_at: Literal["beginning", "end"] = "beginning"  # where a file never read starts
    follow: bool = False  # keep reading lines appended later
    poll_interval: Duration = Duration(1)  # how often to look for new lines, or retry
    progress_interval: Duration = Duration(5)  # how often progress is logged
    max_line_mb: float = 16  # a longer line is skipped (as the webhook's max_body_mb)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.max_line_mb <= 0:
            raise ValueError("max_line_mb must be positive")


class _Lines:
    """The complete lines in the chunks of a file, each with its length (its newline
    included), and None in place of a line longer than `limit` bytes: of such a line
    only its length is kept, so its size costs no memory, and the start of a line is
    kept as pieces, joined once, so a long one costs no copying per chunk."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pieces: list[bytes] = []  # the line begun, when within the limit
        self.size = 0  # its bytes so far

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, int]]:
        *ended, begun = chunk.split(b"\n")
        lines = [self._line(piece, newline=True) for piece in ended]
        self.size += len(begun)
        if self.size > self.limit:
            self.pieces = []
        elif begun:
            self.pieces.append(begun)
        return lines

    def last(self) -> tuple[bytes | None, int] | None:
        """The last line when the file ends without a newline after it."""
        return self._line(b"", newline=False) if self.size else None

    def _line(self, end: bytes, newline: bool) -> tuple[bytes | None, int]:
        size = self.size + len(end)
        line = None if size > self.limit else b"".join([*self.pieces, end])
        self.pieces, self.size = [], 0
        return line, size + newline


class FileReceiver(Receiver):
    def __init__(self, config: FileReceiverConfig, context: Context, consumer: Consumer) -> None:
        super().__init__(consumer)
        self.config = config
        self.log = context.log
        self.path = Path(config.path)
        self.checkpoint_path = context.state_path("checkpoints").with_suffix(".json")
        self._task: asyncio.Task[None] | None = None
        self._inode = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"file receiver {self.path}")

    async def shutdown(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while not self.path.exists():
            self.log.warning("waiting for the file to appear", path=str(self.path))
            await asyncio.sleep(float(self.config.poll_interval))
        offset, line_no = self._resume()
        with open(self.path, "rb") as f:
            self._inode = os.fstat(f.fileno()).st_ino
            f.seek(offset)
            await self._read(f, offset, line_no)

    def _resume(self) -> tuple[int, int]:
        stat = self.path.stat()
        try:
            saved = json.loads(self.checkpoint_path.read_text())
        except (OSError, ValueError):
            saved = None
        if saved and saved.get("inode") == stat.st_ino and saved.get("offset", 0) <= stat.st_size:
            self.log.info("resuming from checkpoint", path=str(self.path), offset=saved["offset"],
                          line=saved.get("line", 0))
            return int(saved["offset"]), int(saved.get("line", 0))
        if self.config.start_at == "end":
            return stat.st_size, 0
        return 0, 0

    async def _read(self, f: BinaryIO, offset: int, line_no: int) -> None:
        total = os.fstat(f.fileno()).st_size
        started, last_report, start_offset = time.monotonic(), time.monotonic(), offset
        lines = _Lines(int(self.config.max_line_mb * (1 << 20)))
        events: list[Event] = []
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                if not self.config.follow:
                    if (last := lines.last()) is not None:  # a last line without its newline
                        line_no += 1
                        offset += last[1]
                        self._decode(last[0], line_no, events)
                    await self._deliver(events, offset, line_no)
                    self.log.info("file read to the end", path=str(self.path), lines=line_no,
                                  seconds=round(time.monotonic() - started, 1))
                    return
                await self._deliver(events, offset, line_no)
                events = []
                await asyncio.sleep(float(self.config.poll_interval))
                continue
            for line, length in lines.feed(chunk):
                line_no += 1
                offset += length
                self._decode(line, line_no, events)
                if len(events) >= self.config.batch_size:
                    await self._deliver(events, offset, line_no)
                    events = []
            now = time.monotonic()
            if now - last_report >= float(self.config.progress_interval):
                last_report = now
                total = max(total, offset)
                self.log.info("file progress", path=str(self.path), line=line_no,
                              percent=round(100 * offset / total, 1) if total else 100.0,
                              mb_per_s=round((offset - start_offset) / (now - started) / 1e6, 2))

    def _decode(self, line: bytes | None, line_no: int, events: list[Event]) -> None:
        """The event of a line, appended to `events`; a blank line is nothing, a line
        that holds no event (None: longer than `max_line_mb`) is refused and logged."""
        if line is not None and not line.strip():
            return
        try:
            if line is None:
                raise DecodeError(f"longer than max_line_mb ({self.config.max_line_mb:g} MB)")
            if why := bounds.too_many_containers(line):
                raise DecodeError(why)
            events.append(decode_item(_raw.decode(line)))
        except NotAnLLMCall:
            self.consumer.refused(1, "not_llm_call")
        except (DecodeError, msgspec.DecodeError, RecursionError) as e:
            reason = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
            self.consumer.refused(1, "undecodable")
            self.log.warning("line skipped", path=str(self.path), line=line_no,
                             reason=loggable(reason))

    async def _deliver(self, events: list[Event], offset: int, line_no: int) -> None:
        """Hand a batch over, waiting out back-pressure, then checkpoint past it."""
        if events:
            await offer(self.consumer, events, self._wait)
        self._checkpoint(offset, line_no)

    async def _wait(self, pushback: Exception) -> bool:
        self.log.info("pipeline pushing back; waiting", reason=str(pushback))
        await asyncio.sleep(float(self.config.poll_interval))
        return True

    def _checkpoint(self, offset: int, line_no: int) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"path": str(self.path), "inode": self._inode,
                                   "offset": offset, "line": line_no}))
        os.replace(tmp, self.checkpoint_path)


factory = Factory(kind="receiver", type="file", config=FileReceiverConfig, create=FileReceiver)
