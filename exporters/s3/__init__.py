"""The `s3` archive exporter: events as Parquet files on S3 or any S3-compatible store,
partitioned by hour, queryable as they are (DuckDB, ClickHouse's `s3()`, Athena, Spark),
and `meterline replay`, which reads such an archive (or a dead-letter file) back into a
pipeline.

pyarrow and boto3 are an optional extra (`meterline[s3]`): the factory is importable
without them, so that a base install still lists, documents and validates the exporter,
and says what to install when one is built.
"""

from __future__ import annotations

from typing import Any

from meterline.component import Context, Factory
from meterline.exporters.s3.config import S3ExporterConfig

EXTRA = "pyarrow and boto3: pip install 'meterline[s3]'"


def _create(config: S3ExporterConfig, context: Context) -> Any:
    try:
        from meterline.exporters.s3.exporter import S3Exporter
    except ImportError as e:
        raise RuntimeError(f"the s3 exporter needs {EXTRA} ({e})") from e
    return S3Exporter(config, context)


factory = Factory(kind="exporter", type="s3", config=S3ExporterConfig, create=_create)
