"""The `s3` exporter's options: where the archive goes, how to reach the store, and how
big its files are. A file holds one batch's events of one hour, so `batch.max_size` and
`batch.timeout` size the files by rows and by time, `max_file_mb` by bytes, and
`max_partitions` bounds how many hours (hence uploads) a batch makes."""

from __future__ import annotations

import msgspec

from meterline.component import Config
from meterline.delivery import BatchConfig, ExporterConfig, refuse_projection
from meterline.units import Duration


class Credentials(Config):
    access_key_id: str  # write it as ${env:NAME}, never literally
    secret_access_key: str  # write it as ${env:NAME}, never literally
    session_token: str | None = None  # for temporary credentials (STS)


def _archive_batches() -> BatchConfig:
    """Batches of an archive are large: a file per batch and hour, and query engines read
    a few big files much faster than many small ones (50,000 events of 1.4 KB fit the
    bytes bound: it cuts only a backlog of long prompts)."""
    return BatchConfig(max_size=50_000, timeout=Duration(300), max_size_mb=128)


class S3ExporterConfig(ExporterConfig, kw_only=True):
    bucket: str  # the bucket the archive is written to (it must exist)
    prefix: str = "meterline"  # key prefix: objects are PREFIX/dt=YYYY-MM-DD/hour=HH/NAME.parquet
    # rows per file (max_size) and how long a batch gathers events (timeout)
    batch: BatchConfig = msgspec.field(default_factory=_archive_batches)
    # a batch whose rows take more than this in memory (Arrow, uncompressed) is split
    # into several files; the Parquet files are several times smaller
    max_file_mb: float = 512
    # hours a batch writes a partition of, the busiest first: the events of its other
    # hours go together in one file of the busiest hour's partition (NAME_others.parquet),
    # so that timestamps spread over many hours cannot make an upload of each
    max_partitions: int = 24
    compression_level: int = 3  # zstd level, 1 (fast) to 22 (small)
    row_group_size: int = 100_000  # rows per Parquet row group
    multipart_threshold_mb: float = 64  # files larger than this are sent in parts
    part_size_mb: float = 16  # the size of each part: at least 5 (S3's smallest part)
    # an S3-compatible store's URL (MinIO, Ceph, R2, moto); null: AWS S3 itself
    endpoint: str | None = None
    region: str | None = None  # null: from the AWS configuration chain
    path_style: bool = False  # address buckets as endpoint/bucket/key (most non-AWS stores)
    profile: str | None = None  # a profile of ~/.aws/config; null: the default chain
    # explicit keys; null: the AWS default chain (environment, profile, instance role)
    credentials: Credentials | None = None
    timeout: Duration = Duration(60)  # connect and read timeout of one request

    def __post_init__(self) -> None:
        refuse_projection(self, "s3", "writes the fixed columns of its Parquet schema")
        if not self.bucket:
            raise ValueError("bucket must not be empty")
        if self.profile is not None and self.credentials is not None:
            raise ValueError("give either profile or credentials, not both")
        if min(self.max_file_mb, self.multipart_threshold_mb) <= 0:
            raise ValueError("max_file_mb and multipart_threshold_mb must be positive")
        if self.part_size_mb < 5:
            raise ValueError("part_size_mb must be at least 5 (S3's smallest part)")
        if self.max_partitions < 1:
            raise ValueError(f"max_partitions must be at least 1, got {self.max_partitions}")
        if not 1 <= self.compression_level <= 22 or self.row_group_size < 1:
            raise ValueError("compression_level must be in [1, 22] and row_group_size >= 1")

    @property
    def key_prefix(self) -> str:
        """The prefix with one trailing slash, or '' (keys never start with a slash)."""
        prefix = self.prefix.strip("/")
        return f"{prefix}/" if prefix else ""
