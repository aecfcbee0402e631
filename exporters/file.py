"""Exporter `file`: events as JSON lines, the same form the webhook accepts (or, with a
`projection`, the documents it makes of them).

With `rotation`, a file that would pass `max_megabytes` is renamed with a UTC
timestamp (`events-20261123T182530.123.jsonl`) and a new one started; only the
newest `max_backups` renamed files are kept. A write is a retryable failure
(disk full, permission), so a batch stays queued until it can be written.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from meterline.component import Config, Context, ExportBatch, Exporter, Factory, RetryableError
from meterline.delivery import ExporterConfig
from meterline.event import Event
from meterline.projection import jsonl_pieces


class RotationConfig(Config):
    max_megabytes: float = 100  # the file is rotated past this size
    max_backups: int = 10  # 0 keeps them all

    def __post_init__(self) -> None:
        if self.max_megabytes <= 0 or self.max_backups < 0:
            raise ValueError("max_megabytes must be positive and max_backups >= 0")


class FileExporterConfig(ExporterConfig):
    path: str | None = None  # default <data_dir>/events.jsonl (events-<name>.jsonl for file/name)
    rotation: RotationConfig | None = None  # null: one file that grows
    fsync: bool = False  # fsync after every batch (survives power loss, not only kill -9)


class FileExporter(Exporter):
    def __init__(self, config: FileExporterConfig, context: Context) -> None:
        name = context.id.partition("/")[2]
        default = context.data_dir / (f"events-{name}.jsonl" if name else "events.jsonl")
        self.path = Path(config.path) if config.path else default
        self.rotation = config.rotation
        self.fsync = config.fsync
        self.projection = config.projection
        self.log = context.log
        self._file: int | None = None

    async def export(self, batch: ExportBatch) -> None:
        try:
            await asyncio.to_thread(self._write, batch.events)
        except OSError as e:
            raise RetryableError(f"cannot write {self.path}: {e.strerror}") from e

    def _write(self, events: list[Event]) -> None:
        # encoded here, in this thread, and in pieces: the loop runs between them
        pieces = jsonl_pieces(events, self.projection)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._open()
        rotation = self.rotation
        if rotation is not None:
            size = os.fstat(self._file).st_size
            if size and size + sum(map(len, pieces)) > rotation.max_megabytes * (1 << 20):
                self._rotate(rotation)
        start = os.lseek(self._file, 0, os.SEEK_END)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(self._file, view):]
            if self.fsync:
                os.fsync(self._file)
        except OSError:
            os.ftruncate(self._file, start)  # no half batch: the retry writes it whole
            raise

    def _rotate(self, rotation: RotationConfig) -> None:
        assert self._file is not None
        os.close(self._file)
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        millis = int(time.time() * 1000) % 1000
        backup = self.path.with_name(f"{self.path.stem}-{stamp}.{millis:03d}{self.path.suffix}")
        os.replace(self.path, backup)
        self.log.info("file rotated", backup=str(backup))
        if rotation.max_backups:
            pattern = f"{self.path.stem}-????????T??????.???{self.path.suffix}"
            backups = sorted(self.path.parent.glob(pattern))
            for old in backups[:-rotation.max_backups]:
                old.unlink(missing_ok=True)
        self._file = self._open()

    def _open(self) -> int:
        """Open the file for appending, without the torn last line a kill in the middle of a
        write may have left: that batch was not acknowledged, so it is written again whole,
        and a line appended after the torn one would be joined to it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        end = os.lseek(fd, 0, os.SEEK_END)
        whole = end
        while whole > 0:
            chunk = os.pread(fd, min(whole, 1 << 16), whole - min(whole, 1 << 16))
            if (newline := chunk.rfind(b"\n")) >= 0:
                whole -= len(chunk) - newline - 1
                break
            whole -= len(chunk)
        if whole != end:
            os.ftruncate(fd, whole)
            self.log.warning("torn last line cut off (the daemon stopped in the middle of a "
                             "write; the batch is written again whole)", bytes=end - whole)
        return fd

    async def shutdown(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None


factory = Factory(kind="exporter", type="file", config=FileExporterConfig, create=FileExporter)
