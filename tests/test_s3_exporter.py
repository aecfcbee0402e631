"""The `s3` exporter against a real S3-protocol server (moto): Parquet files under
dt=/hour= partitions of event time, one object per batch and hour whatever the retries,
multipart uploads, failures told apart, and an archive that other engines (DuckDB,
ClickHouse's `file()`) read as it is, with the totals the `clickhouse` exporter stores."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from typing import Any

import clickhouse_connect
import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from meterline.component import ExportBatch, PermanentError, RetryableError
from meterline.config import convert
from meterline.event import Event, Guardrail
from meterline.exporters.s3.client import classify
from meterline.exporters.s3.config import S3ExporterConfig
from meterline.exporters.s3.schema import SCHEMA, from_table, to_table
from tests.helpers import (
    free_port,
    make_event,
    pipeline,
    post_json,
    running,
)
from tests.s3_helpers import (
    HOUR,
    START,
    TOTALS_SQL,
    clickhouse_totals,
    download,
    keys,
    moto_server,
    new_bucket,
    s3_client,
    s3_exporter,
    spread_events,
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def archived(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """webhook -> s3 + clickhouse, 300 events over three hours posted and delivered; the
    bucket, its keys, a local copy of the archive and the chDB directory."""
    tmp = tmp_path_factory.mktemp("archived")
    bucket = new_bucket(s3_endpoint)
    port = free_port()
    body = pipeline(
        {"webhook": {"listen": f"127.0.0.1:{port}"}}, None,
        {"s3": {"bucket": bucket, "endpoint": s3_endpoint, "path_style": True,
                "prefix": "llm/", "batch": {"max_size": 100, "timeout": "10ms"}},
         "clickhouse": {"endpoint": f"chdb://{tmp / 'ch'}", "batch": {"timeout": "10ms"}}},
        {"workers": 1})

    events = msgspec.to_builtins(spread_events(300))

    async def run() -> None:
        async with running(body, tmp):
            for start in range(0, 300, 100):
                status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events",
                                               events[start:start + 100])
                assert status == 200
    asyncio.run(run())
    return {"bucket": bucket, "keys": keys(s3_endpoint, bucket), "ch": tmp / "ch",
            "files": download(s3_endpoint, bucket, tmp / "copy"), "copy": tmp / "copy"}


def test_objects_are_under_dt_and_hour_partitions_of_event_time(archived):
    hours = {"dt=2023-11-14/hour=22", "dt=2023-11-14/hour=23", "dt=2023-11-15/hour=00"}
    partitions = {k.rsplit("/", 1)[0] for k in archived["keys"]}
    assert partitions == {f"llm/{h}" for h in hours}
    for path in archived["files"]:
        events = from_table(pq.read_table(path))
        day, hour = path.parent.parent.name[3:], int(path.parent.name[5:])
        stamps = {pa.scalar(e.timestamp, pa.timestamp("ns", "UTC")).as_py() for e in events}
        assert {(s.strftime("%Y-%m-%d"), s.hour) for s in stamps} == {(day, hour)}
    assert sum(pq.read_metadata(p).num_rows for p in archived["files"]) == 300


def test_duckdb_reads_the_archive_with_the_totals_of_clickhouse(archived):
    pattern = f"{archived['copy']}/**/*.parquet"
    archive = duckdb.sql(TOTALS_SQL.format(table=f"read_parquet('{pattern}')")).fetchall()
    assert archive == clickhouse_totals(archived["ch"])
    assert sum(n for _, n, _, _ in archive) == 300


def test_clickhouse_file_reads_the_archive_with_the_same_totals(archived):
    client = clickhouse_connect.get_client(interface="chdb", path=str(archived["ch"]))
    try:
        archive = [tuple(r) for r in client.query(TOTALS_SQL.format(
            table=f"file('{archived['copy']}/llm/*/*/*.parquet', Parquet)")).result_rows]
        stored = [tuple(r) for r in client.query(TOTALS_SQL.format(
            table="meterline.llm_events FINAL")).result_rows]
    finally:
        client.close()
    assert archive == stored and len(archive) == 3


async def test_a_retried_batch_overwrites_its_objects(s3_endpoint, tmp_path):
    bucket = new_bucket(s3_endpoint)
    exporter = s3_exporter(tmp_path, bucket, s3_endpoint)
    await exporter.start()
    events = spread_events(20, hours=2)
    await exporter.export(ExportBatch("q1:1.0-2.10", events))
    first = keys(s3_endpoint, bucket)
    await exporter.export(ExportBatch("q1:1.0-2.10", events, attempt=1))  # a retry
    assert keys(s3_endpoint, bucket) == first and len(first) == 2  # one object per hour
    await exporter.export(ExportBatch("q1:2.10-3.0", events[:1]))  # the next batch
    assert len(keys(s3_endpoint, bucket)) == 3
    await exporter.shutdown()


async def test_a_file_past_the_threshold_is_uploaded_in_parts(s3_endpoint, tmp_path):
    bucket = new_bucket(s3_endpoint)
    exporter = s3_exporter(tmp_path, bucket, s3_endpoint, multipart_threshold_mb=1,
                         part_size_mb=5)
    await exporter.start()
    small = ExportBatch("q:0.0-1.0", [make_event()])
    large = ExportBatch("q:1.0-2.0", [  # incompressible prompts: about 5.5 MB of Parquet
        make_event(i, input_messages=[{"role": "user", "content": os.urandom(2200).hex()}])
        for i in range(2600)])
    [(small_key, _)] = exporter.files(small)
    [(large_key, data)] = exporter.files(large)
    assert 5 << 20 < len(data) < 10 << 20
    await exporter.export(small)
    await exporter.export(large)
    await exporter.shutdown()
    client = s3_client(s3_endpoint)
    head = client.head_object(Bucket=bucket, Key=large_key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-2")  # the ETag of a 2-part multipart upload
    assert "-" not in client.head_object(Bucket=bucket, Key=small_key)["ETag"]


async def test_a_batch_past_max_partitions_hours_writes_the_rest_in_its_busiest_hour(
        s3_endpoint, tmp_path):
    """Event times are the client's: a batch spread over many hours must not make an
    upload of each. The events of its other hours share one file, archived still."""
    bucket = new_bucket(s3_endpoint)
    exporter = s3_exporter(tmp_path, bucket, s3_endpoint, prefix="llm", max_partitions=2)
    await exporter.start()
    hours = [0, 0, 0, 1, 1, 5, 9]  # from 2023-11-14 22:00; hour 0 is the busiest
    await exporter.export(ExportBatch("q:0.0-1.0", [
        make_event(i, timestamp=START + hour * HOUR) for i, hour in enumerate(hours)]))
    await exporter.shutdown()
    assert keys(s3_endpoint, bucket) == ["llm/dt=2023-11-14/hour=22/q_0.0-1.0.parquet",
                                         "llm/dt=2023-11-14/hour=22/q_0.0-1.0_others.parquet",
                                         "llm/dt=2023-11-14/hour=23/q_0.0-1.0.parquet"]
    others = s3_client(s3_endpoint).get_object(
        Bucket=bucket, Key="llm/dt=2023-11-14/hour=22/q_0.0-1.0_others.parquet")
    assert pq.read_table(io.BytesIO(others["Body"].read())).column("event_id").to_pylist() == [
        "evt-00000005", "evt-00000006"]


def test_a_bound_of_no_partitions_is_refused():
    with pytest.raises(msgspec.ValidationError, match="max_partitions must be at least 1, got 0"):
        convert({"bucket": "b", "max_partitions": 0}, S3ExporterConfig)


def test_a_batch_larger_than_max_file_mb_is_split_into_files_named_alike(tmp_path):
    exporter = s3_exporter(tmp_path, max_file_mb=0.01)
    files = exporter.files(ExportBatch("q:0.0-1.0", [make_event(i) for i in range(200)]))
    names = [key.rsplit("/", 1)[1] for key, _ in files]
    assert len(names) > 1 and names[:2] == ["q_0.0-1.0.parquet", "q_0.0-1.0_1.parquet"]
    assert sum(pq.read_metadata(pa.BufferReader(d)).num_rows for _, d in files) == 200


async def test_a_missing_bucket_is_a_permanent_error_naming_it(s3_endpoint, tmp_path):
    exporter = s3_exporter(tmp_path, "no-such-bucket", s3_endpoint)
    await exporter.start()
    with pytest.raises(PermanentError, match=r"no-such-bucket.*does not exist"):
        await exporter.export(ExportBatch("q:0.0-1.0", [make_event()]))
    await exporter.shutdown()


async def test_an_unreachable_store_is_a_retryable_error(tmp_path):
    exporter = s3_exporter(tmp_path, "b", f"http://127.0.0.1:{free_port()}", timeout="1s")
    await exporter.start()
    with pytest.raises(RetryableError, match="s3://b/"):
        await exporter.export(ExportBatch("q:0.0-1.0", [make_event()]))
    await exporter.shutdown()


def test_the_schema_is_the_same_whatever_the_events_hold():
    bare = to_table([Event(event_id="a", timestamp=1)])
    full = to_table([make_event(1, metadata={"customer": "acme"}, params={"temperature": 0.2},
                                guardrails=[Guardrail(rule="pii", stage="input",
                                                      action="redact")],
                                finish_reasons=["stop"], redactions={"email": 1},
                                attributes={"x": [1, {"y": None}]})])
    assert bare.schema == full.schema == SCHEMA
    assert SCHEMA.names == ["schema_version", *Event.__struct_fields__]
    assert str(SCHEMA.field("metadata").type) == "map<string, string>"
    assert str(SCHEMA.field("timestamp").type) == "timestamp[ns, tz=UTC]"
    assert from_table(full) == [make_event(1, metadata={"customer": "acme"},
                                           params={"temperature": 0.2},
                                           guardrails=[Guardrail(rule="pii", stage="input",
                                                                 action="redact")],
                                           finish_reasons=["stop"], redactions={"email": 1},
                                           attributes={"x": [1, {"y": None}]})]


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("SlowDown", 503, RetryableError), ("InternalError", 500, RetryableError),
    ("RequestTimeout", 400, RetryableError), ("AccessDenied", 403, PermanentError),
    ("NoSuchBucket", 404, PermanentError), ("InvalidArgument", 400, PermanentError)])
def test_store_answers_are_told_retryable_or_permanent(code, status, kind):
    error = ClientError({"Error": {"Code": code, "Message": "m"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    classified = classify(error, "bucket/key")
    assert type(classified) is kind and "s3://bucket/key" in str(classified)


def test_a_projection_is_refused_at_validation():
    with pytest.raises(msgspec.ValidationError, match=r"s3 exporter .* takes no projection"):
        convert({"bucket": "b", "projection": {"model": "request_model"}}, S3ExporterConfig)
