"""Receiver `file`: replays JSONL, skips bad lines, resumes from its checkpoint."""

import msgspec
from structlog.testing import capture_logs

from meterline import bounds
from meterline.event import to_jsonl
from tests.helpers import eventually, make_event, read_jsonl, running

PIPELINE = """
receivers:
  file:
    path: {source}
    batch_size: 7
    {extra}
exporters:
  file:
    path: {{data}}/out.jsonl
    batch: {{timeout: 10ms}}
service:
  data_dir: {{data}}
  admin: null
  workers: 1  # no processor to run (tests/helpers.py, INLINE)
  pipelines:
    p: {{receivers: [file], exporters: [file]}}
"""


def pipeline(source, extra=""):
    return PIPELINE.format(source=source, extra=extra)


def write_events(path, start, count):
    with open(path, "ab") as f:
        f.write(to_jsonl([make_event(i) for i in range(start, start + count)]))


async def test_a_jsonl_file_is_replayed_into_the_pipeline(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 50)
    async with running(pipeline(source), tmp_path):
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 50
                                and read_jsonl(tmp_path / "data/out.jsonl"))
        assert [r["event_id"] for r in rows] == [f"evt-{i:08d}" for i in range(50)]


async def test_bad_lines_are_skipped_and_the_rest_read(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 2)
    with open(source, "ab") as f:
        f.write(b"{not json\n" + msgspec.json.encode({"unknown": "shape"}) + b"\n")
    write_events(source, 2, 2)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 4)


async def test_the_logged_reason_of_a_skipped_line_masks_what_it_quotes(tmp_path):
    source = tmp_path / "in.jsonl"
    with open(source, "ab") as f:  # (msgspec names an unknown field in its reason)
        f.write(msgspec.json.encode({"provider": "openai", "jane.doe@corp.com": 1}) + b"\n")
    write_events(source, 0, 1)
    with capture_logs() as logged:
        async with running(pipeline(source), tmp_path):
            await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 1)
    [skipped] = [e for e in logged if e["event"] == "line skipped"]
    assert "jane.doe" not in skipped["reason"] and "<EMAIL>" in skipped["reason"]


async def test_a_line_nested_too_deep_is_skipped_and_the_rest_read(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 2)
    with open(source, "ab") as f:
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    write_events(source, 2, 2)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 4)


async def test_a_line_longer_than_max_line_mb_is_skipped_unkept_and_the_rest_read(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 2)
    with open(source, "ab") as f:
        f.write(b"x" * 3_000_000 + b"\n")  # across three of the reader's chunks
    write_events(source, 2, 2)
    with capture_logs() as logged:
        async with running(pipeline(source, "max_line_mb: 1"), tmp_path):
            rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 4
                                    and read_jsonl(tmp_path / "data/out.jsonl"))
    assert [r["event_id"] for r in rows] == [f"evt-{i:08d}" for i in range(4)]
    [skipped] = [e for e in logged if e["event"] == "line skipped"]
    assert (skipped["line"], skipped["reason"]) == (3, "longer than max_line_mb (1 MB)")


async def test_a_line_of_more_json_containers_than_the_bound_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(bounds, "CONTAINERS_MAX", 1000)
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 1)
    with open(source, "ab") as f:
        f.write(msgspec.json.encode({"provider": "openai", "input_messages": [{}] * 1000}))
        f.write(b"\n")
    write_events(source, 1, 1)
    with capture_logs() as logged:
        async with running(pipeline(source), tmp_path):
            await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 2)
    [skipped] = [e for e in logged if e["event"] == "line skipped"]
    assert skipped["reason"] == "more than 1,000 JSON objects and arrays"


async def test_a_line_over_several_chunks_within_the_bound_is_read_whole(tmp_path):
    source = tmp_path / "in.jsonl"
    prompt = "word " * 600_000  # 3 MB: the reader's chunks are 1 MB
    with open(source, "ab") as f:
        f.write(to_jsonl([make_event(0, input_messages=[{"role": "user", "content": prompt}])]))
    write_events(source, 1, 1)
    async with running(pipeline(source), tmp_path):
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 2
                                and read_jsonl(tmp_path / "data/out.jsonl"))
    assert rows[0]["input_messages"][0]["content"] == prompt


async def test_a_long_last_line_without_its_newline_is_skipped_and_checkpointed_past(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 1)
    with open(source, "ab") as f:
        f.write(b"y" * 2_500_000)
    async with running(pipeline(source, "max_line_mb: 1"), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 1)
        checkpoint = tmp_path / "data/checkpoints/file.json"
        saved = await eventually(lambda: checkpoint.exists()
                                 and msgspec.json.decode(checkpoint.read_bytes()))
        await eventually(lambda: msgspec.json.decode(checkpoint.read_bytes())["line"] == 2)
    assert msgspec.json.decode(checkpoint.read_bytes())["offset"] == source.stat().st_size
    assert saved["path"] == str(source)


async def test_a_restart_resumes_from_the_checkpoint(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 20)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 20)
    write_events(source, 20, 5)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) >= 25)
    ids = [r["event_id"] for r in read_jsonl(tmp_path / "data/out.jsonl")]
    assert ids == [f"evt-{i:08d}" for i in range(25)]  # nothing read twice


async def test_a_replaced_file_is_read_from_its_start(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 10)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 10)
    source.unlink()
    write_events(source, 100, 3)
    async with running(pipeline(source), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 13)


async def test_follow_reads_lines_appended_later(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 3)
    async with running(pipeline(source, "follow: true\n    poll_interval: 20ms"), tmp_path):
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 3)
        write_events(source, 3, 4)
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 7)


async def test_start_at_end_skips_what_was_there(tmp_path):
    source = tmp_path / "in.jsonl"
    write_events(source, 0, 5)
    extra = "follow: true\n    start_at: end\n    poll_interval: 20ms"
    async with running(pipeline(source, extra), tmp_path) as service:
        await eventually(lambda: service.receivers["file"].component._inode)
        write_events(source, 5, 2)
        rows = await eventually(lambda: read_jsonl(tmp_path / "data/out.jsonl"))
        await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 2)
        assert rows[0]["event_id"] == "evt-00000005"
