"""Exporter `debug`: what each verbosity prints."""

import json

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.event import Event
from meterline.exporters.debug import DebugConfig, DebugExporter
from tests.helpers import make_context, make_event


async def export(tmp_path, verbosity):
    exporter = DebugExporter(convert({"verbosity": verbosity}, DebugConfig),
                             make_context(tmp_path, "debug"))
    await exporter.export(ExportBatch("b1", [make_event(1), make_event(2)]))


async def test_basic_prints_one_line_per_batch(tmp_path, capsys):
    await export(tmp_path, "basic")
    assert capsys.readouterr().out == "debug: batch b1: 2 events\n"


async def test_normal_prints_one_line_per_event(tmp_path, capsys):
    await export(tmp_path, "normal")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "evt-00000001 gateway openai/gpt-4o-mini chat status=200" in lines[1]


async def test_normal_writes_a_figure_not_reported_as_a_dash(tmp_path, capsys):
    exporter = DebugExporter(convert({"verbosity": "normal"}, DebugConfig),
                             make_context(tmp_path, "debug"))
    bare = Event(event_id="e1", timestamp=make_event(1).timestamp)
    await exporter.export(ExportBatch("b1", [bare]))
    line = capsys.readouterr().out.splitlines()[1]
    assert line.endswith("status=- in=- out=- - cost=-")
    assert "None" not in line


async def test_detailed_prints_every_event_as_json(tmp_path, capsys):
    await export(tmp_path, "detailed")
    out = capsys.readouterr().out
    first = out[out.index("{"):out.index("\n}") + 2]
    assert json.loads(first)["event_id"] == "evt-00000001"


def test_its_queue_is_in_memory_by_default():
    assert DebugConfig().queue.type == "memory"
