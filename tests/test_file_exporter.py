"""Exporter `file`: JSON lines, size-based rotation, retryable write failures."""

import asyncio

import pytest

from meterline.component import ExportBatch, RetryableError
from meterline.config import convert
from meterline.event import from_json, to_json
from meterline.exporters.file import FileExporter, FileExporterConfig
from tests.helpers import make_context, make_event


def exporter(tmp_path, **config):
    ctx = make_context(tmp_path, config.pop("id", "file"))
    return FileExporter(convert(config, FileExporterConfig), ctx)


async def test_each_event_is_one_json_line(tmp_path):
    e = exporter(tmp_path, path=str(tmp_path / "out.jsonl"))
    await e.export(ExportBatch("b", [make_event(1), make_event(2)]))
    await e.shutdown()
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert [from_json(line) for line in lines] == [make_event(1), make_event(2)]


async def test_a_torn_last_line_left_by_a_kill_is_cut_off_before_appending(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = b"".join(to_json(make_event(i)) + b"\n" for i in (1, 2))
    out.write_bytes(whole + to_json(make_event(3))[:40])  # killed in the middle of a write
    e = exporter(tmp_path, path=str(out))
    await e.export(ExportBatch("b", [make_event(3)]))
    await e.shutdown()
    lines = out.read_bytes().splitlines()
    assert [from_json(line) for line in lines] == [make_event(1), make_event(2), make_event(3)]


async def test_a_file_of_one_torn_line_is_emptied_before_appending(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(to_json(make_event(1))[:40])
    e = exporter(tmp_path, path=str(out))
    await e.export(ExportBatch("b", [make_event(1)]))
    await e.shutdown()
    assert [from_json(line) for line in out.read_bytes().splitlines()] == [make_event(1)]


def test_the_default_path_is_under_the_data_dir_and_named_after_the_exporter(tmp_path):
    assert exporter(tmp_path).path == tmp_path / "events.jsonl"
    assert exporter(tmp_path, id="file/archive").path == tmp_path / "events-archive.jsonl"


async def test_a_file_past_its_size_is_rotated_and_old_backups_removed(tmp_path):
    e = exporter(tmp_path, path=str(tmp_path / "out.jsonl"),
                 rotation={"max_megabytes": 0.001, "max_backups": 2})
    for i in range(8):
        await e.export(ExportBatch(str(i), [make_event(i * 3 + k) for k in range(3)]))
        await asyncio.sleep(0.002)  # distinct backup names
    await e.shutdown()
    backups = sorted(tmp_path.glob("out-*.jsonl"))
    assert len(backups) == 2
    assert (tmp_path / "out.jsonl").stat().st_size <= 1100
    survivors = [from_json(line).event_id for p in [*backups, tmp_path / "out.jsonl"]
                 for line in p.read_bytes().splitlines()]
    assert survivors == sorted(survivors)  # the newest kept, in order


async def test_rotation_leaves_other_exporters_files_alone(tmp_path):
    (tmp_path / "events-archive.jsonl").write_text("{}\n")
    e = exporter(tmp_path, rotation={"max_megabytes": 0.0005, "max_backups": 1})
    for i in range(5):
        await e.export(ExportBatch(str(i), [make_event(i)] * 3))
    await e.shutdown()
    assert (tmp_path / "events-archive.jsonl").exists()


async def test_a_write_failure_is_retryable(tmp_path):
    (tmp_path / "blocked").write_text("")
    e = exporter(tmp_path, path=str(tmp_path / "blocked" / "out.jsonl"))
    with pytest.raises(RetryableError, match="cannot"):
        await e.export(ExportBatch("b", [make_event(1)]))
