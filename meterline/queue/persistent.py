"""The persistent queue: a write-ahead log on disk, so an acknowledged event survives
kill -9 (and, with `fsync`, power loss).

Layout of the queue directory:

- `meta.json`: the queue's incarnation id, part of every batch id.
- `000000000001.seg`, ...: segments of records, each `header + payload` where the
  header is `<IIQI` (payload length, crc32, record seq, event count) and the
  payload is the events in msgpack. A torn record at the tail (a crash mid-write)
  fails its CRC and is cut off at the next start.
- `journal`: lines `F s i s2 i2` (a batch covering [(s,i), (s2,i2)) was formed and
  handed to the exporter), `A s i` (everything before (s,i) was delivered) and
  `C s` (record s was taken back: never deliver it). On restart a formed-but-unacked
  batch is formed again with the same extent, hence the same id, so the exporter's
  downstream deduplication recognises the retry.

Writes go through one thread per queue, with group commit: every put that arrives
while a write is in progress joins the next write and shares its fsync. Segments
are fsynced before a put returns; the journal is not (see `_formed`), except for
`C` lines, which are fsynced before the abort that wrote them returns.

A record written but aborted (another queue of the same batch failed, see
`meterline.queue.put_all`), or whose fsync failed, is taken back: cut off when it
is at the end of the segment being written (which also gives the space back on a
full disk), else named in a `C` line. A segment is deleted as soon as none of its
records is still to be delivered; the one being written is cut to 0 bytes instead
and written on from there (deleting it would cost the next put a file creation and
a directory fsync). A drained queue holds at most one empty segment file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from meterline.event import Event, unpack
from meterline.queue import Batch, Position, Queue, QueueWriteError, Record

_HEADER = struct.Struct("<IIQI")
_JOURNAL_COMPACT_BYTES = 1 << 20


@dataclass
class _Pending:
    seq: int
    batch: Batch
    future: asyncio.Future[Record]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = _HEADER.size + len(self.batch.packed)


class PersistentQueue(Queue):
    def __init__(self, directory: Path, max_bytes: int, *, fsync: bool = True,
                 segment_bytes: int = 32 << 20, cache_bytes: int = 32 << 20) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self._incarnation())
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.cache_bytes = cache_bytes  # recent records also kept decoded, up to this size
        self._cached_bytes = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"wal-{directory.name}")
        # The segment table, `_live`, `_cancelled` and `_fd` are changed by the writer
        # thread only (and by `__init__`, before it runs).
        self._segments: dict[int, int] = {}  # segment number -> bytes on disk
        self._live: dict[int, int] = {}  # segment number -> records still to deliver
        self._cancelled: dict[int, int] = {}  # record seq taken back -> its segment
        self._readers: dict[int, int] = {}  # segment number -> read fd
        self._pending: list[_Pending] = []
        self._reserved = 0
        self._writer: asyncio.Task[None] | None = None
        self._segment = 0  # the segment being written (opened at the first write)
        self._fd: int | None = None
        self._recover()
        self._journal = open(self.dir / "journal", "ab")  # noqa: SIM115 - held open

    @property
    def durable(self) -> bool:
        return True

    @property
    def dead_letter_dir(self) -> Path:
        return self.dir / "dead-letter"

    # --- opening -------------------------------------------------------------------
    def _incarnation(self) -> str:
        meta = self.dir / "meta.json"
        try:
            return str(json.loads(meta.read_text())["incarnation"])
        except (OSError, ValueError, KeyError):
            incarnation = uuid.uuid4().hex[:12]
            atomic_write(meta, json.dumps({"incarnation": incarnation}).encode())
            return incarnation

    def _recover(self) -> None:
        acked, formed, cancelled = _read_journal(self.dir / "journal")
        self._acked = acked
        numbers = sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit())
        for n in numbers:
            self._scan_segment(n, cancelled)
        for n in numbers:
            if not self._live.get(n):
                self._delete_segment(n)
        self._segment = max(numbers, default=0)  # the next write opens a new segment
        # Never hand out a seq the journal may name: records past the acked position
        # with a seq it covers would count as delivered, and a `C` line would take
        # back a new record that reused its seq.
        self._seq = max(self._seq, acked[0], max(cancelled, default=0),
                        formed[1][0] if formed else 0)
        if formed is not None and formed[0] == self._acked:
            self._replay = formed
        self._rewrite_journal()

    def _scan_segment(self, n: int, cancelled: set[int]) -> None:
        """Index the segment's records; cut it off at the first torn or corrupt one."""
        path = self._segment_path(n)
        data = memoryview(path.read_bytes())
        size = len(data)
        offset = 0
        while offset + _HEADER.size <= size:
            length, crc, seq, count = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            if end > size or _crc(seq, count, data[offset + _HEADER.size:end]) != crc:
                break
            self._seq = max(self._seq, seq)
            acked_seq, acked_index = self._acked
            if seq in cancelled:
                self._cancelled[seq] = n
            elif seq > acked_seq or (seq == acked_seq and acked_index < count):
                record = Record(seq, count, end - offset, None, n, offset)
                self._records.append(record)
                self._live[n] = self._live.get(n, 0) + 1
                skipped = acked_index if seq == acked_seq else 0
                self._available += count - skipped
                self._available_bytes += record.share(skipped, count)
                self._queued += count - skipped
            offset = end
        if offset < size:
            self.discarded_bytes += size - offset
            with open(path, "r+b") as f:
                f.truncate(offset)
        self._segments[n] = offset

    # --- writing -------------------------------------------------------------------
    def has_room(self, batch: Batch) -> bool:
        if self._queued == 0 and not self._staging:
            return True  # an empty queue takes any one batch, however large
        used = sum(list(self._segments.values())) + self._reserved
        return used + _HEADER.size + len(batch.packed) <= self.max_bytes

    def _store(self, seq: int, batch: Batch) -> asyncio.Future[Record]:
        # the reservation is taken here, synchronously; the writer releases it whether
        # the write succeeds (the bytes then count in `_segments`) or fails
        pending = _Pending(seq, batch, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._reserved += pending.size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop())
        return pending.future

    def _appended(self, record: Record) -> None:
        if record.events is not None and self._cached_bytes + record.size <= self.cache_bytes:
            self._cached_bytes += record.size
        else:
            record.events = None  # read back from disk when its turn comes
        super()._appended(record)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            group, self._pending = self._pending, []
            try:
                written = await loop.run_in_executor(self._executor, self._write_group, group)
            except BaseException as e:
                written = [e] * len(group)
            for pending, result in zip(group, written, strict=True):
                self._reserved -= pending.size
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(QueueWriteError(
                        f"cannot write the queue in {self.dir}: {result}"))
                else:
                    pending.future.set_result(result)

    def _write_group(self, group: list[_Pending]) -> list[Record | BaseException]:
        """In the writer thread: append every record, then one fsync for all. A record
        whose write fails is cut off (it and those after it fail); if the fsync fails,
        every record of the group is taken back and fails."""
        results: list[Record | BaseException] = []
        written: list[Record] = []
        try:
            for pending in group:
                if self._fd is None or self._segments[self._segment] >= self.segment_bytes:
                    self._next_segment()  # on failure, all fail (see below)
                assert self._fd is not None
                offset = self._segments[self._segment]
                payload = pending.batch.packed
                count = len(pending.batch)
                header = _HEADER.pack(len(payload), _crc(pending.seq, count, payload),
                                      pending.seq, count)
                try:
                    _write_all(self._fd, header + payload)
                except OSError as e:
                    self._cut(offset)
                    results.extend([e] * (len(group) - len(results)))
                    break
                self._segments[self._segment] = offset + pending.size
                self._live[self._segment] = self._live.get(self._segment, 0) + 1
                record = Record(pending.seq, count, pending.size, pending.batch.events,
                                self._segment, offset)
                written.append(record)
                results.append(record)
            if written and self.fsync and self._fd is not None:
                os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                self._take_back(written)
            return [e] * len(group)
        return results

    def _cut(self, offset: int) -> None:
        """Remove a partial record at the end of the segment being written; if even
        that fails, leave the segment (the next start cuts the torn tail) for a new one."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, offset)
        except OSError:
            fd, self._fd = self._fd, None
            try:
                if self.fsync:
                    os.fsync(fd)  # what was written before it is kept
            finally:
                os.close(fd)
        self._segments[self._segment] = offset

    def _next_segment(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._segment += 1
        self._fd = self._open_segment(self._segment)

    def _open_segment(self, n: int) -> int:
        fd = os.open(self._segment_path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments[n] = os.fstat(fd).st_size
        if self.fsync:
            try:
                _fsync_dir(self.dir)
            except OSError:
                os.close(fd)
                raise
        return fd

    def _take_back(self, records: list[Record]) -> None:
        """In the writer thread: make written records never delivered, durably. Those at
        the end of the segment being written are cut off; the others are named in `C`
        lines of the journal."""
        named: list[Record] = []
        end = self._segments.get(self._segment, 0) if self._fd is not None else -1
        cut = end
        for record in sorted(records, key=lambda r: r.seq, reverse=True):
            self._live[record.segment] -= 1
            if record.segment == self._segment and record.offset + record.size == cut:
                cut = record.offset
            else:
                named.append(record)
        if cut != end:
            try:
                assert self._fd is not None
                os.ftruncate(self._fd, cut)
                if self.fsync:
                    os.fsync(self._fd)
                self._segments[self._segment] = cut
            except OSError:
                named.extend(r for r in records if r.segment == self._segment
                             and r.offset >= cut and r not in named)
        if named:
            for record in named:
                self._cancelled[record.seq] = record.segment
            self._journal_append(b"".join(b"C %d\n" % r.seq for r in named))
            if self.fsync:
                os.fsync(self._journal.fileno())
        self._release_segments()

    def _release_segments(self) -> None:
        """In the writer thread: give back the space of segments none of whose records
        is still to be delivered. The one being written is cut to 0 bytes and reused
        (no fsync needed: a later write's fsync makes the cut durable with it, and
        should the cut be lost, what it held was delivered or taken back)."""
        for n in [n for n in self._segments if not self._live.get(n)]:
            if n == self._segment and self._fd is not None:
                if self._segments[n] == 0:
                    continue
                try:
                    os.ftruncate(self._fd, 0)
                except OSError:
                    self._delete_segment(n)
                    continue
                self._segments[n] = 0
                self._forget_cancelled(n)
            else:
                self._delete_segment(n)

    async def _cancel(self, record: Record) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._take_back, [record])

    def _segment_path(self, n: int) -> Path:
        return self.dir / f"{n:012d}.seg"

    # --- reading -------------------------------------------------------------------
    async def _read_back(self, records: list[Record]) -> dict[int, list[Event]]:
        """In the writer thread, which alone opens and closes the segments: a read may
        wait for the disk, and unpacking a batch of 10,000 events takes about 20 ms,
        which the event loop would otherwise spend not serving clients (a backlog an
        exporter catches up on is read back batch after batch)."""
        if not records:
            return {}
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._events_by_seq, records)

    def _events_of(self, record: Record) -> list[Event]:
        if record.events is not None:
            return record.events
        fd = self._readers.get(record.segment)
        if fd is None:
            fd = self._readers[record.segment] = os.open(self._segment_path(record.segment),
                                                         os.O_RDONLY)
        data = os.pread(fd, record.size, record.offset)
        length, crc, seq, count = _HEADER.unpack_from(data)
        payload = memoryview(data)[_HEADER.size:]
        if len(payload) != length or _crc(seq, count, payload) != crc:
            raise QueueWriteError(f"corrupt record {record.seq} in {self.dir}")
        return unpack(payload)

    # --- the journal ---------------------------------------------------------------
    async def _formed(self, start: Position, end: Position) -> None:
        # Not fsynced: kill -9 keeps it (page cache); after a power loss a batch may be
        # formed anew with another extent, which downstream event_id deduplication covers.
        line = f"F {start[0]} {start[1]} {end[0]} {end[1]}\n".encode()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._journal_append, line)

    async def _acknowledged(self, end: Position, released: list[Record]) -> None:
        for record in released:
            if record.events is not None:
                self._cached_bytes -= record.size
                record.events = None
        segments = [r.segment for r in released]
        line = f"A {end[0]} {end[1]}\n".encode()
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._after_ack, line, segments)

    def _after_ack(self, line: bytes, released: list[int]) -> None:
        """In the writer thread (which alone changes the segment table). A segment none
        of whose records is still to be delivered is deleted, the current one too."""
        self._journal_append(line)
        for n in released:
            self._live[n] -= 1
        self._release_segments()
        if self._journal.tell() > _JOURNAL_COMPACT_BYTES:
            self._journal.close()
            self._rewrite_journal()
            self._journal = open(self.dir / "journal", "ab")  # noqa: SIM115

    def _journal_append(self, line: bytes) -> None:
        self._journal.write(line)
        self._journal.flush()

    def _rewrite_journal(self) -> None:
        seq, index = self._acked
        text = f"A {seq} {index}\n"
        text += "".join(f"C {c}\n" for c in sorted(self._cancelled))
        if self._replay is not None:
            (s, i), (s2, i2) = self._replay
            text += f"F {s} {i} {s2} {i2}\n"
        atomic_write(self.dir / "journal", text.encode(), sync=self.fsync)

    def _delete_segment(self, n: int) -> None:
        if n == self._segment and self._fd is not None:
            os.close(self._fd)
            self._fd = None  # the next write opens a new segment
        if (fd := self._readers.pop(n, None)) is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._segment_path(n).unlink()
        self._segments.pop(n, None)
        self._live.pop(n, None)
        self._forget_cancelled(n)

    def _forget_cancelled(self, n: int) -> None:
        """Segment n no longer holds its records: `C` lines need not name them."""
        for seq in [s for s, segment in self._cancelled.items() if segment == n]:
            del self._cancelled[seq]

    # --- lifecycle -----------------------------------------------------------------
    async def close(self) -> None:
        await self._until_unstaged()  # a batch being put everywhere settles first
        if self._writer is not None:
            await asyncio.shield(self._writer)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_files)
        self._executor.shutdown(wait=True)

    def _close_files(self) -> None:
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        if self._fd is not None:
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._journal.close()

    def capacity(self) -> dict[str, float]:
        return {"bytes": sum(list(self._segments.values())), "capacity_bytes": self.max_bytes}


def _crc(seq: int, count: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, count)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace `path` with `data` whole: a crash leaves the old file or the new one (with
    `sync`, the new one once this returns), never a torn one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        _fsync_dir(path.parent)


def _read_journal(path: Path
                  ) -> tuple[Position, tuple[Position, Position] | None, set[int]]:
    """The last acked position, a batch formed after it (if one was), and the seqs of
    records taken back."""
    acked: Position = (0, 0)
    formed: tuple[Position, Position] | None = None
    cancelled: set[int] = set()
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return acked, None, cancelled
    for line in lines:
        parts = line.split()
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            continue  # a torn last line
        if parts[:1] == [b"A"] and len(numbers) == 2:
            acked = (numbers[0], numbers[1])
            formed = None
        elif parts[:1] == [b"F"] and len(numbers) == 4:
            formed = ((numbers[0], numbers[1]), (numbers[2], numbers[3]))
        elif parts[:1] == [b"C"] and len(numbers) == 1:
            cancelled.add(numbers[0])
    return acked, formed, cancelled
