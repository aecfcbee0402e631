"""Receiver `kafka` against a real broker: formats, dead letters, commits after the
pipeline accepted, pausing under back-pressure, and a broker that is not up yet."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.event import to_json
from meterline.exporters.kafka.exporter import KafkaExporter, KafkaExporterConfig
from meterline.receivers.kafka import messages
from tests.helpers import (
    FIXTURES,
    eventually,
    make_context,
    make_event,
    metric_value,
    read_jsonl,
    running,
)
from tests.kafka.conftest import (
    Tansu,
    consume,
    create_topic,
    group_is_stable,
    group_timeouts,
    produce,
    stored_batches,
)

PIPELINE = """
receivers:
  kafka:
    brokers: {bootstrap}
    topics: [{topic}]
    group_id: {group}
    max_batch: {max_batch}
    retry_interval: 100ms
    {timeouts}
    {extra}
exporters:
  file:
    path: {path}
    batch: {{timeout: 10ms}}
    {exporter_extra}
service:
  data_dir: {{data}}
  admin: null
  workers: {workers}  # 1: no processor to run (tests/helpers.py, INLINE)
  pipelines:
    p: {{receivers: [kafka], exporters: [file]}}
"""


def pipeline(bootstrap, topic, tmp_path, group=None, max_batch=100, extra="", path=None,
             exporter_extra="", workers=1):
    return PIPELINE.format(timeouts=group_timeouts(),
                           bootstrap=bootstrap, topic=topic, group=group or topic,
                           max_batch=max_batch, extra=extra, exporter_extra=exporter_extra,
                           path=path or tmp_path / "out.jsonl", workers=workers)


def events(start, count):
    return [to_json(make_event(i)) for i in range(start, start + count)]


def exported(tmp_path):
    return [r["event_id"] for r in read_jsonl(tmp_path / "out.jsonl")]


async def committed(bootstrap, group, topic):
    """The group's committed offsets on `topic`, summed over its partitions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in partitions]
    finally:
        await consumer.stop()
    return sum(offset or 0 for offset in offsets)


async def test_meterline_otoroshi_and_litellm_messages_become_events(
        tmp_path, kafka_bootstrap, topic):
    litellm = msgspec.json.decode((FIXTURES / "litellm-standard-logging-payload.json")
                                  .read_bytes())
    await produce(kafka_bootstrap, topic, [
        to_json(make_event(0)),
        (FIXTURES / "otoroshi-llm-usage-audit.json").read_bytes(),
        msgspec.json.encode([litellm, {**litellm, "id": "second", "litellm_call_id": "c2"}]),
    ])
    async with running(pipeline(kafka_bootstrap, topic, tmp_path), tmp_path):
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "out.jsonl")) == 4
                                and read_jsonl(tmp_path / "out.jsonl"))
    assert sorted(r["source"] for r in rows) == ["gateway", "litellm", "litellm", "otoroshi"]


@pytest.mark.parametrize("encoding", ["json", "otlp_proto", "otlp_json"])
async def test_what_the_exporter_writes_the_receiver_reads_back_unchanged(
        tmp_path, kafka_bootstrap, topic, encoding):
    sent = [make_event(i, trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}",
                       api_key_id=f"k-{i % 3}", metadata={"team": "payments"},
                       input_messages=[{"role": "user", "content": f"question {i}"}],
                       cost_usd=0.001 * i) for i in range(12)]
    exporter = KafkaExporter(convert({"brokers": kafka_bootstrap, "topic": topic,
                                      "encoding": encoding, "compression": "zstd"},
                                     KafkaExporterConfig), make_context(tmp_path, "kafka"))
    await exporter.export(ExportBatch("b1", sent))
    await exporter.shutdown()
    config = pipeline(kafka_bootstrap, topic, tmp_path, extra=f"encoding: {encoding}")
    async with running(config, tmp_path):
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "out.jsonl")) == 12
                                and read_jsonl(tmp_path / "out.jsonl"))
    assert sorted(rows, key=lambda r: r["event_id"]) == [msgspec.to_builtins(e) for e in sent]


async def test_an_undecodable_message_goes_to_the_dead_letter_topic_and_the_rest_flows(
        tmp_path, kafka_bootstrap, topic):
    await produce(kafka_bootstrap, topic, [*events(0, 5), b"{not json", None, *events(5, 5)],
                  key=b"k1", headers=[("trace", b"abc")])
    async with running(pipeline(kafka_bootstrap, topic, tmp_path), tmp_path) as service:
        await eventually(lambda: len(exported(tmp_path)) == 10)
        dead = await consume(kafka_bootstrap, f"{topic}.dead-letter", 2)
        assert metric_value(service.telemetry.registry,
                            "meterline_receiver_refused_events_total",
                            reason="undecodable") == 2
    assert sorted(exported(tmp_path)) == [f"evt-{i:08d}" for i in range(10)]
    bad, empty = sorted(dead, key=lambda r: dict(r.headers)["meterline.source.offset"])
    assert bad.value == b"{not json" and bad.key == b"k1"
    headers = dict(bad.headers)
    assert headers["trace"] == b"abc"  # the original headers travel along
    assert b"malformed JSON" in headers["meterline.error"]
    assert (headers["meterline.source.topic"], headers["meterline.source.offset"]) == \
        (topic.encode(), b"5")
    assert empty.value is None
    assert dict(empty.headers)["meterline.error"] == b"the message has no value"


async def test_messages_are_decoded_in_a_worker_and_the_undecodable_still_dead_lettered(
        tmp_path, kafka_bootstrap, topic, monkeypatch):
    def _must_not_decode(*args, **kwargs):
        raise AssertionError("a message was decoded in the daemon's own process")

    monkeypatch.setattr(messages, "list_from_json", _must_not_decode)
    monkeypatch.setitem(messages._DECODERS, "json", _must_not_decode)
    await produce(kafka_bootstrap, topic, [*events(0, 3), b"{not json", *events(3, 3)], key=b"k1")
    async with running(pipeline(kafka_bootstrap, topic, tmp_path, workers=2), tmp_path):
        await eventually(lambda: len(exported(tmp_path)) == 6)
        [dead] = await consume(kafka_bootstrap, f"{topic}.dead-letter", 1)
    assert sorted(exported(tmp_path)) == [f"evt-{i:08d}" for i in range(6)]
    assert dead.value == b"{not json"
    assert dict(dead.headers)["meterline.source.offset"] == b"3"


async def test_otoroshi_events_that_are_not_llm_calls_are_skipped_not_dead_lettered(
        tmp_path, kafka_bootstrap, topic):
    audit = msgspec.json.decode((FIXTURES / "otoroshi-llm-usage-audit.json").read_bytes())
    broken = {k: v for k, v in audit.items() if k != "@timestamp"}  # real poison
    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, [msgspec.json.encode(item) for item in [
        {"@type": "GatewayEvent", "@id": "g1"}, audit, {"@type": "AlertEvent", "@id": "a1"},
        broken]])
    async with running(pipeline(kafka_bootstrap, topic, tmp_path), tmp_path) as service:
        await eventually(lambda: exported(tmp_path) == [audit["@id"]])
        registry = service.telemetry.registry
        await eventually(lambda: metric_value(registry, "meterline_receiver_refused_events_total",
                                              reason="undecodable") == 1)
        assert metric_value(registry, "meterline_receiver_refused_events_total",
                            reason="not_llm_call") == 2
        await eventually(lambda: service.receivers["kafka"].component.status()["partitions"][0]
                         ["committed"] == 4)
    [dead] = await stored_batches(kafka_bootstrap, f"{topic}.dead-letter")
    assert dead.records == 1  # the broken LLMUsageAudit alone
    [record] = await consume(kafka_bootstrap, f"{topic}.dead-letter", 1)
    assert b"without @timestamp" in dict(record.headers)["meterline.error"]


async def test_without_a_dead_letter_topic_undecodable_messages_are_counted_and_skipped(
        tmp_path, kafka_bootstrap, topic):
    await produce(kafka_bootstrap, topic, [b"[1, 2]", *events(0, 3)])
    config = pipeline(kafka_bootstrap, topic, tmp_path, extra="dead_letter_topic: null")
    async with running(config, tmp_path) as service:
        await eventually(lambda: len(exported(tmp_path)) == 3)
        assert metric_value(service.telemetry.registry,
                            "meterline_receiver_refused_events_total",
                            reason="undecodable") == 1


async def test_a_dead_letter_topic_that_cannot_be_written_stalls_its_partition_loudly(
        tmp_path, kafka_bootstrap, topic, capsys):
    # The broker refuses this name as it refuses a missing topic where topics are not
    # auto-created (UnknownTopicOrPartition): a dead-letter topic that cannot be written.
    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, [*events(0, 3), b"{not json", *events(3, 3)], key=b"k1")
    config = pipeline(kafka_bootstrap, topic, tmp_path,
                      extra="dead_letter_topic: '{topic} dlq'\n    dead_letter_timeout: 300ms")
    async with running(config, tmp_path) as service:
        receiver = service.receivers["kafka"].component
        await eventually(lambda: receiver.status()["dead_letter_blocked"], timeout=20)
        assert receiver.status()["paused"]
        await eventually(lambda: len(exported(tmp_path)) == 6)  # the good ones went on
    assert "cannot write the dead-letter topic" in capsys.readouterr().out
    assert await committed(kafka_bootstrap, topic, topic) == 0  # nothing skipped


async def test_a_restart_resumes_after_the_committed_offsets(tmp_path, kafka_bootstrap, topic):
    await produce(kafka_bootstrap, topic, events(0, 20))
    config = pipeline(kafka_bootstrap, topic, tmp_path, max_batch=7)
    async with running(config, tmp_path):
        await eventually(lambda: len(exported(tmp_path)) == 20)
    assert await committed(kafka_bootstrap, topic, topic) == 20
    await produce(kafka_bootstrap, topic, events(20, 10))
    async with running(config, tmp_path):
        await eventually(lambda: len(exported(tmp_path)) >= 30, timeout=20)
    assert sorted(exported(tmp_path)) == [f"evt-{i:08d}" for i in range(30)]


async def test_partitions_pause_while_the_pipeline_pushes_back_and_commits_wait(
        tmp_path, kafka_bootstrap, topic):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the exporter wants a directory")
    config = pipeline(kafka_bootstrap, topic, tmp_path, max_batch=10, path=blocked / "out.jsonl",
                      exporter_extra="queue: {type: memory, max_events: 30}\n"
                                     "    retry: {initial_interval: 50ms, max_interval: 100ms}")
    await produce(kafka_bootstrap, topic, events(0, 100))
    async with running(config, tmp_path) as service:
        receiver = service.receivers["kafka"].component
        registry = service.telemetry.registry
        await eventually(lambda: receiver.status()["paused"], timeout=20)
        assert metric_value(registry, "meterline_receiver_refused_events_total",
                            reason="backpressure") > 0
        queued = metric_value(registry, "meterline_receiver_accepted_events_total")
        assert queued < 100
        assert await committed(kafka_bootstrap, topic, topic) == queued  # no further
        blocked.unlink()
        blocked.mkdir()
        await eventually(lambda: len(read_jsonl(blocked / "out.jsonl")) >= 100, timeout=30)
        assert not receiver.status()["paused"]
        await eventually(lambda: receiver.status()["partitions"]
                         and all(p["lag"] == 0 for p in receiver.status()["partitions"]))
    assert sorted(r["event_id"] for r in read_jsonl(blocked / "out.jsonl")) == \
        [f"evt-{i:08d}" for i in range(100)]


async def test_a_batch_the_pipeline_fails_on_is_read_again_not_skipped(
        tmp_path, kafka_bootstrap, topic):
    await produce(kafka_bootstrap, topic, events(0, 30))
    async with running(pipeline(kafka_bootstrap, topic, tmp_path), tmp_path) as service:
        entry = service.entries["kafka"]
        consume, failures = entry.consume_encoded, []

        async def fail_once(decode, body):
            if not failures:
                failures.append(len(body))
                raise RuntimeError("a processor bug")
            return await consume(decode, body)
        entry.consume_encoded = fail_once
        await eventually(lambda: len(exported(tmp_path)) == 30)
    assert len(failures) == 1
    assert sorted(exported(tmp_path)) == [f"evt-{i:08d}" for i in range(30)]


async def test_a_broker_that_is_not_up_yet_is_waited_for(tmp_path, topic):
    broker = Tansu()  # its port is chosen; nothing listens there yet
    config = pipeline(broker.bootstrap, topic, tmp_path)
    try:
        async with running(config, tmp_path):
            broker.start()
            await produce(broker.bootstrap, topic, events(0, 5))
            await eventually(lambda: len(exported(tmp_path)) == 5, timeout=30)
    finally:
        broker.stop()


async def test_a_broker_that_goes_away_mid_consumption_and_comes_back_is_reconnected_to(
        tmp_path, tansu, topic):
    # Tansu keeps its log in memory, so the broker that comes back is empty: no topic, no
    # group, a log that starts again at offset 0. What is asserted is the receiver's side:
    # the outage does not stop it, what it accepted before is exported (the pipeline does
    # not need the broker), it rejoins the group on the broker that came back, and it
    # consumes and commits everything produced there. (The test produces only once the
    # group is back: before that, positions in the old log would skip the new log's first
    # offsets, which a Kafka that keeps its log never shows. Against such a Kafka, a batch
    # in hand when the broker left is read again after the restart: duplicates, never
    # loss.)
    await create_topic(tansu.bootstrap, topic, 2)
    config = pipeline(tansu.bootstrap, topic, tmp_path)
    async with running(config, tmp_path) as service:
        receiver = service.receivers["kafka"].component
        await produce(tansu.bootstrap, topic, events(0, 10))
        await eventually(lambda: len(exported(tmp_path)) == 10, timeout=20)
        tansu.stop()
        await asyncio.sleep(1)  # the outage: polls, heartbeats and commits fail
        assert receiver.status()["started"] and not receiver._task.done()
        tansu.start()
        await create_topic(tansu.bootstrap, topic, 2)
        await eventually(lambda: group_is_stable(tansu.bootstrap, topic), timeout=30,
                         interval=0.2)
        await produce(tansu.bootstrap, topic, events(10, 10))
        await eventually(lambda: len(exported(tmp_path)) == 20, timeout=20)
    assert sorted(exported(tmp_path)) == [f"evt-{i:08d}" for i in range(20)]
    assert await committed(tansu.bootstrap, topic, topic) == 10  # on the broker now up
