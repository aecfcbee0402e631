"""For the `s3` exporter's and `meterline replay`'s tests: a real S3-protocol server
(`moto_server` on a free port of 127.0.0.1, with the AWS environment pointed at it), boto3
clients of it, exporters, events spread over hours, and the totals ClickHouse stores."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import clickhouse_connect
import pytest

from meterline.config import convert
from meterline.event import Event
from meterline.exporters.s3.config import S3ExporterConfig
from meterline.exporters.s3.exporter import S3Exporter
from tests.helpers import free_port, make_context, make_event

HOUR = 3600 * 10**9
START = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4"]
TOTALS_SQL = ("SELECT request_model AS m, count() AS n, sum(input_tokens + output_tokens) "
              "AS tokens, round(sum(cost_usd), 9) AS cost FROM {table} GROUP BY m ORDER BY m")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


def moto_server_binary() -> str | None:
    """moto's `moto_server` command: beside this interpreter (its virtual environment,
    active or not), else on PATH; None when moto[server] is not installed."""
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.is_file() else shutil.which("moto_server")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """The endpoint URL of a running moto server, killed on leaving; meanwhile the AWS
    environment (keys, region) is that of the server, for boto3's default chain."""
    binary = moto_server_binary()
    if binary is None:
        pytest.skip("moto[server] is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("moto_server did not start") from None
                time.sleep(0.05)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in AWS_ENV.items():
                patch.setenv(key, value)
            yield endpoint
    finally:
        proc.kill()
        proc.wait()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def new_bucket(endpoint: str) -> str:
    name = f"archive-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def download(endpoint: str, bucket: str, into: Path) -> list[Path]:
    """Every object of the bucket as a file under `into`, keeping its key as its path."""
    client = s3_client(endpoint)
    paths = []
    for key in keys(endpoint, bucket):
        path = into / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
        paths.append(path)
    return paths


def spread_events(count: int, hours: int = 3) -> list[Event]:
    """Events over `hours` hours from START (event i in hour i % hours), three models,
    with costs."""
    return [make_event(i, timestamp=START + (i % hours) * HOUR + i,
                       request_model=MODELS[i % 3], cost_usd=(i % 5) * 0.001)
            for i in range(count)]


def s3_exporter(tmp_path: Path, bucket: str = "archive", endpoint: str | None = None,
                **options: Any) -> S3Exporter:
    """An `s3` exporter (not started) of `bucket` on `endpoint` (a moto server)."""
    config = convert({"bucket": bucket, "endpoint": endpoint, "path_style": True,
                      "region": "us-east-1", **options}, S3ExporterConfig)
    assert isinstance(config, S3ExporterConfig)
    return S3Exporter(config, make_context(tmp_path, "s3"))


def clickhouse_totals(ch: Path) -> list[tuple[Any, ...]]:
    """Events, tokens and cost by model in the `llm_events` of the chDB directory `ch`."""
    client = clickhouse_connect.get_client(interface="chdb", path=str(ch))
    try:
        return [tuple(r) for r in client.query(TOTALS_SQL.format(
            table="meterline.llm_events FINAL")).result_rows]
    finally:
        client.close()
