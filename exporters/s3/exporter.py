"""Exporter `s3`: each batch as zstd Parquet files, one per hour of event time, under
`PREFIX/dt=YYYY-MM-DD/hour=HH/`.

Exactly once per batch: an object's name is the batch's id (stable across retries and
restarts, see `ExportBatch`), so a retried batch overwrites the same objects and never
leaves a second copy; a batch whose events span several hours writes one object per
hour, each named from the same id. Those are `max_partitions` hours at most: event
times are the client's to choose (any hour since 2000 passes the bounds), and a batch of
50,000 events in as many hours would otherwise be 50,000 uploads of one row each. The
events of a batch's other hours are written together, as `NAME_others.parquet` in the
partition of its busiest hour, where `archive.Window` knows to look for any hour.

Files are built in memory, then uploaded with boto3's transfer manager (multipart past
`multipart_threshold_mb`); boto3 blocks, so both run in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from boto3.s3.transfer import TransferConfig

from meterline.component import Context, ExportBatch, Exporter
from meterline.exporters.s3.client import classify, make_client
from meterline.exporters.s3.config import S3ExporterConfig
from meterline.exporters.s3.schema import HOUR_NS, partitions, to_table

_MB = 1 << 20


def partition(hour: int) -> str:
    """`dt=YYYY-MM-DD/hour=HH` of an hour since the epoch (UTC)."""
    return time.strftime("dt=%Y-%m-%d/hour=%H", time.gmtime(hour * HOUR_NS // 10**9))


def object_name(batch_id: str, part: int) -> str:
    """The file name of a batch's `part`-th file in a partition (a batch larger than
    `max_file_mb` has several): the same for every attempt of the batch."""
    name = batch_id.replace(":", "_").replace("/", "_")
    return f"{name}.parquet" if part == 0 else f"{name}_{part}.parquet"


def parquet(table: pa.Table, config: S3ExporterConfig) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd",
                   compression_level=config.compression_level,
                   row_group_size=config.row_group_size)
    return sink.getvalue()


def split(table: pa.Table, max_bytes: float) -> list[pa.Table]:
    """`table` cut into consecutive slices of about `max_bytes` in memory each; the cut is
    a function of the rows alone, so a retried batch is cut the same way."""
    parts = max(1, math.ceil(table.nbytes / max_bytes))
    rows = math.ceil(table.num_rows / parts)
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


class S3Exporter(Exporter):
    def __init__(self, config: S3ExporterConfig, context: Context) -> None:
        self.config = config
        self.log = context.log
        self._client: Any = None
        self._transfer = TransferConfig(
            multipart_threshold=int(config.multipart_threshold_mb * _MB),
            multipart_chunksize=int(config.part_size_mb * _MB), max_concurrency=4)

    async def start(self) -> None:
        # building a client reads the AWS configuration files: not on the event loop
        self._client = await asyncio.to_thread(make_client, self.config)

    async def export(self, batch: ExportBatch) -> None:
        await asyncio.to_thread(self._write, batch)

    def files(self, batch: ExportBatch) -> list[tuple[str, bytes]]:
        """The (key, Parquet bytes) of every object the batch is written as."""
        out = []
        for hour, suffix, events in partitions(batch.events, self.config.max_partitions):
            directory = f"{self.config.key_prefix}{partition(hour)}/"
            for part, table in enumerate(split(to_table(events), self.config.max_file_mb * _MB)):
                out.append((directory + object_name(batch.id + suffix, part),
                            parquet(table, self.config)))
        return out

    def _write(self, batch: ExportBatch) -> None:
        bucket = self.config.bucket
        for key, data in self.files(batch):
            try:
                self._client.upload_fileobj(io.BytesIO(data), bucket, key,
                                            Config=self._transfer)
            except Exception as e:
                raise classify(e, f"{bucket}/{key}") from e

    async def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
