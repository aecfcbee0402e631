"""Receiver `file`: replay or backfill from a JSONL file, resumable.

Each line is one item in any format the decoders know (meterline's own JSON
lines, such as the file exporter and dead-letter files write, Otoroshi or
LiteLLM). Progress is checkpointed after every batch the pipeline has durably
accepted, so a restart resumes where it stopped instead of re-reading; a file
replaced by another (new inode, or shorter than the checkpoint) is read from
its start. With `follow`, lines appended later are read as they come.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec

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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


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
        pending = b""
        events: list[Event] = []
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                if not self.config.follow:
                    if pending.strip():  # a last line without its newline
                        line_no += 1
                        self._decode(pending, line_no, events)
                        offset += len(pending)
                    await self._deliver(events, offset, line_no)
                    self.log.info("file read to the end", path=str(self.path), lines=line_no,
                                  seconds=round(time.monotonic() - started, 1))
                    return
                await self._deliver(events, offset, line_no)
                events = []
                await asyncio.sleep(float(self.config.poll_interval))
                continue
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                line_no += 1
                offset += len(line) + 1
                if line.strip():
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

    def _decode(self, line: bytes, line_no: int, events: list[Event]) -> None:
        try:
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
