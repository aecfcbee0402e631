"""Exporter `kafka` against a real broker: messages, compression, topics, keys,
idempotence fallback, TLS, and a broker that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections import defaultdict

import msgspec
import pytest
import trustme
from aiokafka.partitioner import DefaultPartitioner

from meterline.clients.kafka import client_options
from meterline.component import ExportBatch, PermanentError, RetryableError
from meterline.config import ConfigError, convert, loads
from meterline.exporters.kafka.exporter import KafkaExporter, KafkaExporterConfig
from tests.helpers import (
    ROOT,
    event_dicts,
    eventually,
    free_port,
    make_context,
    make_event,
    metric_value,
    post_json,
    running,
)
from tests.kafka.conftest import Tansu, consume, create_topic, stored_batches, topic_names


def make_exporter(tmp_path, **config):
    context = make_context(tmp_path, "kafka")
    return KafkaExporter(convert(config, KafkaExporterConfig), context), context


def idempotent_flag(context):
    return [s.value for family in context.telemetry.registry.collect() for s in family.samples
            if s.name == "meterline_kafka_producer_idempotent"
            and s.labels["exporter"] == "kafka"]


async def export(exporter, events, batch_id="b1"):
    try:
        await exporter.export(ExportBatch(batch_id, events))
    finally:
        await exporter.shutdown()


async def test_events_become_json_messages_with_event_id_and_schema_headers(
        tmp_path, kafka_bootstrap, topic):
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic)
    events = [make_event(i, metadata={"customer_id": "acme"}) for i in range(20)]
    await export(exporter, events)
    records = await consume(kafka_bootstrap, topic, 20)
    by_id = {msgspec.json.decode(r.value)["event_id"]: r for r in records}
    assert sorted(by_id) == [e.event_id for e in events]
    record = by_id["evt-00000003"]
    assert msgspec.json.decode(record.value) == msgspec.to_builtins(events[3])
    assert dict(record.headers) == {"meterline.event_id": b"evt-00000003",
                                    "meterline.schema_version": b"1"}
    assert record.key is None


@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_every_compression_is_used_on_the_wire_and_round_trips(
        tmp_path, kafka_bootstrap, topic, compression):
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic,
                                compression=compression)
    events = [make_event(i, input_messages=[{"role": "user", "content": "hi " * 50}])
              for i in range(30)]
    await export(exporter, events)
    records = await consume(kafka_bootstrap, topic, 30)
    assert sorted(msgspec.json.decode(r.value)["event_id"] for r in records) == \
        [e.event_id for e in events]
    stored = await stored_batches(kafka_bootstrap, topic)  # the consumer hid the codec
    assert {b.compression for b in stored} == {compression}
    assert sum(b.records for b in stored) == 30


async def test_max_batch_bytes_splits_a_large_batch_into_record_batches_that_fit(
        tmp_path, kafka_bootstrap, topic):
    await create_topic(kafka_bootstrap, topic, 1)
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic,
                                max_batch_bytes=4000)
    events = [make_event(i, input_messages=[{"role": "user", "content": "hi " * 100}])
              for i in range(40)]
    await export(exporter, events)
    stored = await stored_batches(kafka_bootstrap, topic)
    assert len(stored) > 1
    assert all(b.size <= 4000 for b in stored)
    assert sum(b.records for b in stored) == 40


async def test_the_topic_follows_event_fields(tmp_path, kafka_bootstrap, topic):
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic + ".{provider}")
    await export(exporter, [make_event(0, provider="openai"),
                            make_event(1, provider="azure.ai.openai"),
                            make_event(2, provider=None), make_event(3, provider="openai")])
    assert len(await consume(kafka_bootstrap, f"{topic}.openai", 2)) == 2
    assert len(await consume(kafka_bootstrap, f"{topic}.azure.ai.openai", 1)) == 1
    assert len(await consume(kafka_bootstrap, f"{topic}.unknown", 1)) == 1


async def test_events_with_the_same_key_share_a_partition(tmp_path, kafka_bootstrap, topic):
    await create_topic(kafka_bootstrap, topic, 4)
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic,
                                key="api_key_id")
    await export(exporter, [make_event(i, api_key_id=f"k-{i % 5}") for i in range(50)])
    partitions = defaultdict(set)
    for record in await consume(kafka_bootstrap, topic, 50):
        partitions[record.key].add(record.partition)
    assert sorted(partitions) == [f"k-{i}".encode() for i in range(5)]
    assert all(len(p) == 1 for p in partitions.values())
    assert len(set().union(*partitions.values())) > 1  # the keys spread over partitions
    java_default = DefaultPartitioner()  # where any other producer would put these keys
    assert all(p == {java_default(key, [0, 1, 2, 3], [0, 1, 2, 3])}
               for key, p in partitions.items())


async def test_the_keyless_messages_of_a_batch_go_to_one_partition(
        tmp_path, kafka_bootstrap, topic):
    await create_topic(kafka_bootstrap, topic, 4)
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic)
    await export(exporter, [make_event(i) for i in range(20)])
    assert len({r.partition for r in await consume(kafka_bootstrap, topic, 20)}) == 1


async def test_a_broker_refusing_idempotence_gets_a_plain_producer_and_the_flag_says_so(
        tmp_path, tansu, topic):
    # Tansu's in-memory storage fails InitProducerId: exactly a broker refusing idempotence.
    exporter, context = make_exporter(tmp_path, brokers=tansu.bootstrap, topic=topic)
    await export(exporter, [make_event(i) for i in range(5)])
    assert len(await consume(tansu.bootstrap, topic, 5)) == 5
    assert idempotent_flag(context) == [0.0]


@pytest.mark.skipif(not os.environ.get("KAFKA_BOOTSTRAP"),
                    reason="Tansu refuses idempotence; set KAFKA_BOOTSTRAP to a Kafka")
async def test_the_producer_is_idempotent_when_the_broker_allows_it(tmp_path, topic):
    exporter, context = make_exporter(tmp_path, brokers=os.environ["KAFKA_BOOTSTRAP"],
                                      topic=topic)
    await export(exporter, [make_event(0)])
    assert idempotent_flag(context) == [1.0]


async def test_an_event_over_max_message_bytes_fails_alone_once_the_rest_is_sent(
        tmp_path, kafka_bootstrap, topic):
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic,
                                max_message_bytes=2000)
    huge = make_event(1, input_messages=[{"role": "user", "content": "x" * 5000}])
    with pytest.raises(PermanentError, match=r"1 events larger than max_message_bytes.*"
                                             r"evt-00000001") as caught:
        await export(exporter, [make_event(0), huge, make_event(2)])
    assert caught.value.events == [huge]  # what the delivery dead-letters
    records = await consume(kafka_bootstrap, topic, 2)
    assert sorted(dict(r.headers)["meterline.event_id"] for r in records) == \
        [b"evt-00000000", b"evt-00000002"]


async def test_an_event_whose_templated_topic_kafka_refuses_fails_alone_once_the_rest_is_sent(
        tmp_path, kafka_bootstrap, topic):
    """A topic filled from traffic (a provider of 300 characters) that Kafka cannot name
    must not hold the batch back, retried for ever."""
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic + ".{provider}")
    long = make_event(1, provider="x" * 300)
    with pytest.raises(PermanentError, match=r"1 events .*topic Kafka refuses.*evt-00000001") \
            as caught:
        await export(exporter, [make_event(0), long, make_event(2)])
    assert caught.value.events == [long]
    assert len(await consume(kafka_bootstrap, f"{topic}.openai", 2)) == 2


async def test_an_event_bound_for_one_topic_more_than_max_topics_fails_alone(
        tmp_path, kafka_bootstrap, topic):
    """A client sending a new value in every event must not make the brokers create a
    topic for each: the exporter names at most `max_topics`, across its batches."""
    exporter, _ = make_exporter(tmp_path, brokers=kafka_bootstrap, topic=topic + ".{provider}",
                                max_topics=2)
    await export(exporter, [make_event(0, provider="a"), make_event(1, provider="b")])
    new = make_event(3, provider="c")
    with pytest.raises(PermanentError, match=r"1 events whose topic would be one more than "
                                             r"max_topics \(2\).*evt-00000003") as caught:
        await export(exporter, [make_event(2, provider="a"), new, make_event(4, provider="b")])
    assert caught.value.events == [new]
    assert len(await consume(kafka_bootstrap, f"{topic}.a", 2)) == 2
    assert len(await consume(kafka_bootstrap, f"{topic}.b", 2)) == 2
    assert f"{topic}.c" not in await topic_names(kafka_bootstrap)


async def test_an_unreachable_broker_is_a_retryable_error(tmp_path, topic):
    exporter, _ = make_exporter(tmp_path, brokers=f"127.0.0.1:{free_port()}", topic=topic)
    with pytest.raises(RetryableError, match="cannot connect"):
        await export(exporter, [make_event(0)])


async def test_a_broker_that_goes_away_and_comes_back_loses_nothing(tmp_path, tansu, topic):
    # Tansu keeps its log in memory, so what counts is meterline's side: events accepted
    # while the broker is down wait in the exporter's queue and reach the broker when one
    # is back on the same address.
    port = free_port()
    pipeline = f"""
    receivers:
      webhook: {{listen: 127.0.0.1:{port}}}
    exporters:
      kafka:
        brokers: {tansu.bootstrap}
        topic: {topic}
        timeout: 1s
        batch: {{timeout: 10ms}}
        retry: {{initial_interval: 100ms, max_interval: 300ms}}
    service:
      data_dir: {{data}}
      admin: null
      pipelines:
        p: {{receivers: [webhook], exporters: [kafka]}}
    """
    url = f"http://127.0.0.1:{port}/v1/events"
    async with running(pipeline, tmp_path) as service:
        assert (await post_json(url, event_dicts(0, 10)))[0] == 200
        await consume(tansu.bootstrap, topic, 10)
        tansu.stop()
        assert (await post_json(url, event_dicts(10, 40)))[0] == 200
        registry = service.telemetry.registry
        await eventually(lambda: metric_value(registry, "meterline_exporter_retries_total") >= 2)
        tansu.start()
        records = await consume(tansu.bootstrap, topic, 40, timeout=30)
        assert {msgspec.json.decode(r.value)["event_id"] for r in records} == \
            {f"evt-{i:08d}" for i in range(10, 50)}


# --- TLS ---------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def tls_broker(ca):
    """Tansu behind a TLS-terminating proxy (this Tansu build serves no TLS itself): the
    client does a real handshake against a certificate that `ca` signed."""
    cert = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    proxy_port = free_port()
    broker = Tansu().start(advertised_port=proxy_port)

    async def pipe(reader, writer):
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(client_reader, client_writer):
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", broker.port)
        await asyncio.gather(pipe(client_reader, upstream_writer),
                             pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", proxy_port, ssl=server_context)
    try:
        yield f"127.0.0.1:{proxy_port}"
    finally:
        server.close()
        broker.stop()


async def test_tls_to_a_broker_signed_by_the_configured_ca(tmp_path, topic):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    async with tls_broker(ca) as address:
        exporter, _ = make_exporter(tmp_path, brokers=address, topic=topic,
                                    tls={"ca_file": str(tmp_path / "ca.pem")})
        await export(exporter, [make_event(0)])
        assert len(await consume(address, topic, 1, **client_options(exporter.config))) == 1


async def test_tls_refuses_a_broker_the_configured_ca_did_not_sign(tmp_path, topic):
    trustme.CA().cert_pem.write_to_path(tmp_path / "other-ca.pem")
    async with tls_broker(trustme.CA()) as address:
        exporter, _ = make_exporter(tmp_path, brokers=address, topic=topic,
                                    tls={"ca_file": str(tmp_path / "other-ca.pem")})
        with pytest.raises(RetryableError, match="cannot connect"):
            await export(exporter, [make_event(0)])


# --- configuration -----------------------------------------------------------------

def test_sasl_and_tls_settings_become_client_options(tmp_path):
    config = convert({"brokers": "a:9093, b:9093", "client_id": "edge-1",
                      "sasl": {"mechanism": "SCRAM-SHA-512", "username": "u", "password": "p"},
                      "tls": {"insecure_skip_verify": True}}, KafkaExporterConfig)
    options = client_options(config)
    assert options["bootstrap_servers"] == ["a:9093", "b:9093"]
    assert options["client_id"] == "edge-1"
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"],
            options["sasl_plain_password"]) == ("SCRAM-SHA-512", "u", "p")
    assert options["ssl_context"].verify_mode == ssl.CERT_NONE
    plain = client_options(convert({"sasl": {"username": "u", "password": "p"}},
                                   KafkaExporterConfig))
    assert (plain["security_protocol"], plain["sasl_mechanism"]) == ("SASL_PLAINTEXT", "PLAIN")


def test_a_bound_of_no_topics_is_refused():
    with pytest.raises(msgspec.ValidationError, match="max_topics must be at least 1, got 0"):
        convert({"max_topics": 0}, KafkaExporterConfig)


@pytest.mark.parametrize(("block", "message"), [
    ("topic: llm.{provdier}", "'provdier' is not an event field"),
    ("topic: 'llm events'", "not a valid topic name"),
    ("key: model", "'model' is not an event field"),
    ("brokers: 'localhost'", "expected host:port, got 'localhost'"),
    ("tls: {cert_file: /nonexistent.pem}", "cert_file and key_file go together"),
    ("tls: {ca_file: /nonexistent.pem}", "ca_file: no such file"),
    (f"tls: {{ca_file: {ROOT / 'pyproject.toml'}}}", "cannot load the certificates"),
    ("compression: brotli", "invalid enum value 'brotli'"),
])
def test_config_errors_name_the_key_and_the_problem(block, message):
    text = f"""
receivers: {{webhook: {{}}}}
exporters:
  kafka:
    {block}
service: {{pipelines: {{p: {{receivers: [webhook], exporters: [kafka]}}}}}}
"""
    with pytest.raises(ConfigError) as caught:
        loads(text)
    problem = str(caught.value)
    assert "exporters.kafka" in problem and ":5:" in problem
    assert message in problem
