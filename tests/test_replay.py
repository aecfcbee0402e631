"""`meterline replay`: an `s3` archive (local or on an S3-protocol server) or a dead-letter
file sent through a pipeline of pipeline.yaml, with the events' ids and times kept, so
that a fresh ClickHouse gets the archive's totals and a replay run twice counts once."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline import cli
from meterline.component import ExportBatch, Exporter, PermanentError
from meterline.delivery import ExporterConfig, ExporterRunner, QueueConfig, open_queue
from meterline.event import Event, to_jsonl
from meterline.queue import Batch
from tests.deploy_files import load_pipeline
from tests.helpers import (
    ROOT,
    config_text,
    eventually,
    free_port,
    make_context,
    make_event,
    pipeline,
    read_jsonl,
)
from tests.s3_helpers import (
    clickhouse_totals,
    moto_server,
    new_bucket,
    s3_client,
    s3_exporter,
    spread_events,
)

HOWTO = ROOT / "docs" / "howto" / "replay-into-clickhouse.md"


def _totals(events: list[Event]) -> list[tuple[Any, ...]]:
    rows: dict[str, list[Any]] = {}
    for e in events:
        row = rows.setdefault(e.request_model or "", [0, 0, 0.0])
        row[0] += 1
        row[1] += (e.input_tokens or 0) + (e.output_tokens or 0)
        row[2] += e.cost_usd or 0.0
    return [(m, n, tokens, round(cost, 9)) for m, (n, tokens, cost) in sorted(rows.items())]


def _archive(root: Path, events: list[Event], batch: int = 100, **options: Any) -> Path:
    """The files the `s3` exporter writes for `events`, at their keys under `root`."""
    exporter = s3_exporter(root.parent, prefix="llm", **options)
    for start in range(0, len(events), batch):
        for key, data in exporter.files(ExportBatch(f"q:{start}", events[start:start + batch])):
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)
    return root


def _pipeline(tmp_path: Path, exporters: dict[str, Any]) -> Path:
    path = tmp_path / "replay.yaml"
    path.write_text(config_text(pipeline(
        {"webhook": {"listen": f"127.0.0.1:{free_port()}"}}, None, exporters), tmp_path))
    return path


def _into_clickhouse(tmp_path: Path) -> Path:
    return _pipeline(tmp_path, {"clickhouse": {"endpoint": f"chdb://{tmp_path / 'ch'}",
                                               "batch": {"timeout": "10ms"}}})


def _into_file(tmp_path: Path) -> Path:
    return _pipeline(tmp_path, {"file": {"path": str(tmp_path / "out.jsonl"),
                                         "batch": {"timeout": "10ms"}}})


def test_an_archive_replayed_into_a_fresh_clickhouse_gives_its_totals(tmp_path, capsys):
    events = spread_events(300)
    archive = _archive(tmp_path / "archive", events)
    assert cli.main(["replay", str(archive), "-c", str(_into_clickhouse(tmp_path))]) == 0
    assert clickhouse_totals(tmp_path / "ch") == _totals(events)
    out = capsys.readouterr().out
    assert "replayed 300 events from 9 files into pipeline p" in out
    assert "clickhouse: 300 delivered, 0 given up on" in out


def test_an_archive_replayed_twice_is_counted_once(tmp_path):
    events = spread_events(90)
    archive = _archive(tmp_path / "archive", events)
    config = str(_into_clickhouse(tmp_path))
    assert cli.main(["replay", str(archive), "-c", config]) == 0
    assert cli.main(["replay", str(archive), "-c", config]) == 0
    assert clickhouse_totals(tmp_path / "ch") == _totals(events)


# (with max_partitions 1, the events of two of the three hours are in an `_others` file of
# the third's partition)
@pytest.mark.parametrize("max_partitions", [24, 1], ids=["own-hours", "others-file"])
def test_since_and_until_keep_the_events_of_their_window(tmp_path, max_partitions):
    archive = _archive(tmp_path / "archive", spread_events(30), max_partitions=max_partitions)
    assert cli.main(["replay", str(archive), "-c", str(_into_file(tmp_path)),
                     "--since", "2023-11-14T23:00:00Z", "--until", "2023-11-15"]) == 0
    replayed = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(e["event_id"] for e in replayed) == [
        f"evt-{i:08d}" for i in range(30) if i % 3 == 1]


def test_an_archived_event_replays_as_the_file_exporter_wrote_it(tmp_path):
    """sample_weight's default (1.0) fills its column in every row of the archive: read
    back it is the default again, absent from the event's JSON as it was."""
    events = [make_event(0), make_event(1, sample_weight=4.0)]
    archive = _archive(tmp_path / "archive", events)
    assert cli.main(["replay", str(archive), "-c", str(_into_file(tmp_path))]) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == to_jsonl(events)


class _Refusing(Exporter):
    async def export(self, batch: ExportBatch) -> None:
        raise PermanentError("refused")


async def _dead_letters(tmp_path: Path, events: list[Event]) -> Path:
    """The dead-letter directory of an exporter that refused `events`, as delivery wrote it."""
    config = ExporterConfig(queue=QueueConfig(dir=str(tmp_path / "queue")))
    context = make_context(tmp_path, "refusing")
    queue = open_queue(config.queue, context)
    runner = ExporterRunner(_Refusing(), config, context, queue, context.telemetry)
    await runner.start()
    await runner.put(Batch(events))
    directory = queue.dead_letter_dir
    assert directory is not None
    await eventually(lambda: list(directory.glob("*.jsonl")))
    await runner.shutdown(grace=1)
    return directory


def test_a_dead_letter_file_is_replayed_with_its_event_ids(tmp_path):
    events = spread_events(25)
    dead = asyncio.run(_dead_letters(tmp_path / "refused", events))
    [file] = dead.glob("*.jsonl")
    assert cli.main(["replay", str(file), "-c", str(_into_file(tmp_path))]) == 0
    replayed = read_jsonl(tmp_path / "out.jsonl")
    assert [e["event_id"] for e in replayed] == [e.event_id for e in events]
    assert [e["timestamp"] for e in replayed] == [e.timestamp for e in events]


def test_a_replay_ends_once_sent_without_waiting_out_the_batch_timeout(tmp_path):
    events = spread_events(5)
    dead = asyncio.run(_dead_letters(tmp_path / "refused", events))
    [file] = dead.glob("*.jsonl")
    config = _pipeline(tmp_path, {"file": {"path": str(tmp_path / "out.jsonl"),
                                           "batch": {"timeout": "10m"}}})
    started = time.monotonic()
    assert cli.main(["replay", str(file), "-c", str(config)]) == 0
    assert time.monotonic() - started < 60  # (the batch would have waited 10 minutes)
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


def test_a_missing_source_is_refused_before_the_pipeline_starts(tmp_path, capsys):
    config = _into_file(tmp_path)
    assert cli.main(["replay", str(tmp_path / "nowhere"), "-c", str(config)]) == 1
    assert capsys.readouterr().err == f"replay: {tmp_path / 'nowhere'}: no such file or directory\n"
    assert not (tmp_path / "data").exists()  # no queue made, nothing started


def test_a_bad_parquet_file_is_refused_naming_it(tmp_path, capsys):
    archive = _archive(tmp_path / "archive", spread_events(10))
    bad = archive / "llm" / "dt=2023-11-14" / "hour=22" / "torn.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert cli.main(["replay", str(archive), "-c", str(_into_file(tmp_path))]) == 1
    assert re.search(rf"replay: {re.escape(str(bad))}: not a readable Parquet file",
                     capsys.readouterr().err)


def test_a_bad_line_of_a_dead_letter_file_is_refused_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "dead.jsonl"
    bad.write_text('{"event_id": "a", "timestamp": 1}\n{"event_id": 5}\n')
    assert cli.main(["replay", str(bad), "-c", str(_into_file(tmp_path))]) == 1
    assert f"replay: {bad}: line 2: not a meterline event" in capsys.readouterr().err


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


def test_an_archive_on_s3_is_replayed_from_its_url(s3_endpoint, tmp_path):
    events = spread_events(60)
    archive = _archive(tmp_path / "archive", events)
    bucket = new_bucket(s3_endpoint)
    client = s3_client(s3_endpoint)
    for path in archive.rglob("*.parquet"):
        client.upload_file(str(path), bucket, path.relative_to(archive).as_posix())
    assert cli.main(["replay", f"s3://{bucket}/llm/dt=2023-11-14/", "-c",
                     str(_into_file(tmp_path)), "--endpoint", s3_endpoint,
                     "--path-style"]) == 0
    replayed = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(e["event_id"] for e in replayed) == [  # 22:00 and 23:00, not the next day
        e.event_id for i, e in enumerate(events) if i % 3 != 2]


def test_the_howto_pipelines_are_valid(tmp_path):
    blocks = re.findall(r"^```yaml\n(.*?)^```", HOWTO.read_text(), re.M | re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        assert load_pipeline(path, {}).service.pipelines
