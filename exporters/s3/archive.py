"""Reading events back: an `s3` archive (a local directory of its Parquet files, or an
`s3://bucket/prefix`), one Parquet file, or a dead-letter file (the JSON lines the
delivery loop writes, one event per line, see `meterline/delivery.py`).

Events come in chunks, so that an archive larger than memory replays in bounded memory.
`--since/--until` skip whole files by their `dt=/hour=` partition before reading them
(but a batch's `_others` file, which may hold any hour: see `schema.partitions`), then
filter the events read by timestamp. A file that cannot be read raises
`ReplayError` naming it.
"""

from __future__ import annotations

import calendar
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from meterline.event import Event, from_json
from meterline.exporters.s3.client import classify
from meterline.exporters.s3.schema import HOUR_NS, OTHERS, from_table

CHUNK = 1000  # events per chunk handed on
_PARTITION = re.compile(r"dt=(\d{4})-(\d{2})-(\d{2})/hour=(\d{2})/")
_OTHERS = re.compile(rf"{OTHERS}(?:_\d+)?\.parquet$")  # a file of any hour (`partitions`)


class ReplayError(Exception):
    """A source that cannot be read; the message names the file and says why."""


@dataclass(frozen=True)
class Window:
    """Event times kept, in epoch ns: since <= timestamp < until (None: unbounded)."""

    since: int | None = None
    until: int | None = None

    def keeps(self, timestamp: int) -> bool:
        return ((self.since is None or timestamp >= self.since)
                and (self.until is None or timestamp < self.until))

    def overlaps(self, name: str) -> bool:
        """Whether the file `name` may hold events of the window (its partition's hour
        overlaps it, or it has no partition in its name, or holds a batch's other hours)."""
        found = _PARTITION.search(name)
        if found is None or _OTHERS.search(name):
            return True
        y, m, d, h = map(int, found.groups())
        start = calendar.timegm((y, m, d, h, 0, 0)) * 10**9
        return ((self.until is None or start < self.until)
                and (self.since is None or start + HOUR_NS > self.since))

    def filter(self, events: list[Event]) -> list[Event]:
        if self.since is None and self.until is None:
            return events
        return [e for e in events if self.keeps(e.timestamp)]


def read_parquet(data: BinaryIO | str, name: str) -> Iterator[list[Event]]:
    """The events of one archive file, a row group's worth at a time."""
    try:
        file = pq.ParquetFile(data)
        for record_batch in file.iter_batches(batch_size=CHUNK):
            yield from_table(pa.Table.from_batches([record_batch]))
    except (pa.ArrowException, OSError) as e:
        raise ReplayError(f"{name}: not a readable Parquet file: {e}") from e
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ReplayError(f"{name}: not a meterline archive file: {e}") from e


def read_jsonl(path: Path) -> Iterator[list[Event]]:
    """The events of a dead-letter file (or any file of meterline's JSON lines)."""
    chunk: list[Event] = []
    try:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    chunk.append(from_json(line))
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    raise ReplayError(f"{path}: line {number}: not a meterline event: "
                                      f"{e}") from e
                if len(chunk) >= CHUNK:
                    yield chunk
                    chunk = []
    except OSError as e:
        raise ReplayError(f"{path}: cannot read it: {e.strerror}") from e
    if chunk:
        yield chunk


def local_files(root: Path, window: Window) -> list[Path]:
    """The files to read under `root` (itself when it is a file): Parquet and JSON
    lines, in name order (partitions sort by time)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ReplayError(f"{root}: no such file or directory")
    return sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl")
                  and p.is_file() and window.overlaps(p.relative_to(root).as_posix()))


def read_local(root: Path, window: Window) -> Iterator[tuple[str, list[Event]]]:
    """The events of the files under `root`, listed now: a wrong path is refused before
    the replay's pipeline starts."""
    return _read_files(local_files(root, window), window)


def _read_files(paths: list[Path], window: Window) -> Iterator[tuple[str, list[Event]]]:
    for path in paths:
        chunks = read_parquet(str(path), str(path)) if path.suffix == ".parquet" else (
            read_jsonl(path))
        for events in chunks:
            yield str(path), window.filter(events)


def read_s3(client: Any, url: str, window: Window) -> Iterator[tuple[str, list[Event]]]:
    """The Parquet objects under an `s3://bucket/prefix` URL, each downloaded whole."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", ())
                      if o["Key"].endswith(".parquet") and window.overlaps(o["Key"]))
    except Exception as e:
        raise ReplayError(f"{url}: cannot list it: {classify(e, f'{bucket}/{prefix}')}") from e
    for key in keys:
        name = f"s3://{bucket}/{key}"
        try:
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            raise ReplayError(f"{name}: cannot download it: {classify(e, key)}") from e
        for events in read_parquet(io.BytesIO(data), name):
            yield name, window.filter(events)
