"""Content policies (`content: full | metadata | none`, `meterline/content.py`): what of
prompts and answers each exporter receives, applied when the runner selects its events."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from meterline.config import convert
from meterline.content import enforcer
from meterline.delivery import ExporterConfig, ExporterRunner, QueueConfig, open_queue
from meterline.queue import Batch
from tests.clickhouse_helpers import clickhouse_exporters
from tests.helpers import eventually, make_context, make_event

PROMPT = [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]
ANSWER = [{"role": "assistant", "content": "noted", "tool_calls": [
    {"id": "t1", "type": "function", "function": {"name": "charge", "arguments": "{}"}}]}]


def with_content(i: int = 0):
    return make_event(i, input_messages=PROMPT, output_messages=ANSWER,
                      attributes={"tier": "gold"})


def runner_for(tmp_path, exporter=None, **config):
    cfg = convert({"queue": {"type": "memory"}, **config}, ExporterConfig)
    ctx = make_context(tmp_path)
    return ExporterRunner(exporter, cfg, ctx, open_queue(cfg.queue, ctx), ctx.telemetry)


def test_full_is_the_default_and_passes_the_same_list_on(tmp_path):
    events = [with_content()]
    assert enforcer("full") is None
    assert runner_for(tmp_path).select(events) is events


def test_none_drops_prompts_and_answers(tmp_path):
    [out] = runner_for(tmp_path, content="none").select([with_content()])
    assert (out.input_messages, out.output_messages) == (None, None)
    assert out.attributes == {"tier": "gold"} and out.input_tokens == 10


def test_metadata_replaces_them_by_count_size_and_sha256(tmp_path):
    [out] = runner_for(tmp_path, content="metadata").select([with_content()])
    prompt = msgspec.json.encode(PROMPT)
    assert out.input_messages is None and out.output_messages is None
    assert out.attributes is not None
    assert out.attributes["input_messages_count"] == 1
    assert out.attributes["input_messages_bytes"] == len(prompt)
    assert out.attributes["input_messages_sha256"] == hashlib.sha256(prompt).hexdigest()
    assert out.attributes["output_messages_sha256"] == hashlib.sha256(
        msgspec.json.encode(ANSWER)).hexdigest()
    assert out.attributes["tier"] == "gold"


def test_metadata_hashes_the_compact_json_form_of_the_messages(tmp_path):
    [out] = runner_for(tmp_path, content="metadata").select([with_content()])
    compact = json.dumps(PROMPT, separators=(",", ":")).encode()
    assert out.attributes["input_messages_sha256"] == hashlib.sha256(compact).hexdigest()


@pytest.mark.parametrize("policy", ["metadata", "none"])
def test_the_events_other_exporters_get_are_left_whole(tmp_path, policy):
    event = with_content()
    runner_for(tmp_path, content=policy).select([event])
    assert event.input_messages == PROMPT and event.attributes == {"tier": "gold"}


@pytest.mark.parametrize("policy", ["metadata", "none"])
def test_an_event_without_content_is_passed_on_as_it_is(tmp_path, policy):
    event = make_event(0)
    [out] = runner_for(tmp_path, content=policy).select([event])
    assert out is event


def test_an_unknown_policy_is_refused():
    with pytest.raises(msgspec.ValidationError, match="content"):
        convert({"content": "some"}, ExporterConfig)


async def test_clickhouse_with_content_none_stores_no_prompt(tmp_path):
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make(content="none")
        ctx = make_context(tmp_path / "runner", "clickhouse")
        runner = ExporterRunner(exporter, exporter.config, ctx,
                                open_queue(QueueConfig(type="memory"), ctx), ctx.telemetry)
        await runner.start()
        await runner.put(Batch(runner.select([with_content(i) for i in range(3)])))
        schema, client = exporter.schema, exporter.reader.client
        table = schema.qualified(schema.events)
        await eventually(lambda: client.query(f"SELECT count() FROM {table}")
                         .result_rows[0][0] == 3)
        rows = client.query(f"SELECT input_messages, output_messages, input_tokens "
                            f"FROM {table}").result_rows
        await runner.shutdown(1)
    assert all("4111" not in str(r) and "noted" not in str(r) for r in rows)
    assert [r[2] for r in rows] == [10, 11, 12]
