"""Exporter `kafka`: one message per event, on a topic that may follow the event.

The producer is idempotent with `acks: all` by default, so the broker drops the
duplicates its own retries would make. When the broker refuses idempotence, a
warning is logged, `meterline_kafka_producer_idempotent{exporter}` reads 0 and a
plain producer is used. The producer is started on the first batch, not at
daemon start: a broker that is down only keeps the batch in the exporter's queue,
retried with backoff, and a batch whose messages were not all acknowledged is
sent again whole (at-least-once; the duplicates carry the same event ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any, Literal

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.producer.message_accumulator import BatchBuilder

from meterline.clients.kafka import (
    Brokers,
    SaslConfig,
    TlsConfig,
    default_brokers,
    start_producer,
)
from meterline.component import (
    Context,
    ExportBatch,
    Exporter,
    Factory,
    PermanentError,
    RetryableError,
)
from meterline.delivery import ExporterConfig
from meterline.event import Event
from meterline.exporters.kafka.messages import (
    TOPIC_CHARS,
    Encoding,
    Message,
    MessageBuilder,
    TopicTemplate,
    bad_topic,
    key_partition,
)
from meterline.fieldpath import ReadPath
from meterline.units import Duration


class KafkaExporterConfig(ExporterConfig):
    brokers: Brokers = msgspec.field(default_factory=default_brokers)  # bootstrap servers
    client_id: str = "meterline"  # as the brokers log it
    sasl: SaslConfig | None = None  # null: no authentication
    tls: TlsConfig | None = None  # null: plaintext
    topic: TopicTemplate = TopicTemplate("meterline.events")  # may name fields: llm.{provider}
    # distinct topics a templated topic may name in the exporter's life: beyond, an event
    # bound for a new one is refused (dead-lettered), so that traffic cannot make the
    # brokers create a topic for each value it sends
    max_topics: int = 100
    key: ReadPath | None = None  # event field whose value keys the message (api_key_id...)
    encoding: Encoding = "json"  # json: meterline's events; otlp_*: OTLP logs
    acks: Literal["all", 0, 1] = "all"  # replicas that must have a message
    idempotence: bool = True  # with acks: all only
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"  # of batches
    # No `linger`: the `batch` block is the linger (`batch.timeout` is how long the exporter
    # waits to fill a batch), and the batch is handed to the producer whole.

    max_batch_bytes: int = 1 << 20  # per partition and request: a larger batch is split
    max_message_bytes: int = 1_000_000  # larger events fail permanently (under the broker's
                                        # message.max.bytes, 1048588 by default, with room
                                        # for the key and headers)
    timeout: Duration = Duration(30)  # for a message to be acknowledged

    def __post_init__(self) -> None:
        if self.max_batch_bytes < 1 or self.max_message_bytes < 1:
            raise ValueError("max_batch_bytes and max_message_bytes must be positive")
        if self.max_topics < 1:
            raise ValueError(f"max_topics must be at least 1, got {self.max_topics}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.projection is not None and self.encoding != "json":
            raise ValueError(f"projection: applies to encoding: json only ({self.encoding} "
                             "messages are OTLP log records, whose shape the protocol fixes)")


class KafkaExporter(Exporter):
    def __init__(self, config: KafkaExporterConfig, context: Context) -> None:
        self.config = config
        self.id = context.id
        self.log = context.log
        self.builder = MessageBuilder(config.topic, config.key, config.encoding,
                                      config.projection)
        self.producer: AIOKafkaProducer | None = None
        self.topics: set[str] = set()  # those sent to, `max_topics` at most
        self._idempotent = context.meter.create_gauge(
            "meterline_kafka_producer_idempotent",
            description="1 when the kafka exporter's producer is idempotent, 0 when the "
                        "broker refused idempotence (retried batches may be written twice)")

    async def export(self, batch: ExportBatch) -> None:
        messages = self.builder.build(batch.events)
        fitting: list[Message] = []
        refused: list[tuple[Event, str]] = []
        for event, m in zip(batch.events, messages, strict=True):
            reason = self._refusal(m)
            if reason is None:
                fitting.append(m)
            else:
                refused.append((event, reason))
        producer = await self._producer()
        try:
            await self._send(producer, fitting)
        except MessageSizeTooLargeError as e:
            raise PermanentError(
                "kafka refused a request as too large: keep max_batch_bytes and "
                "max_message_bytes under the broker's message.max.bytes") from e
        except (KafkaError, OSError) as e:
            # A fresh producer on the retry: it reconnects and asks for idempotence again.
            self.producer = None
            with contextlib.suppress(Exception):
                await producer.stop()
            raise RetryableError(f"kafka: {len(fitting)} messages not all acknowledged: "
                                 f"{e!r}") from e
        if refused:  # only these fail (and are dead-lettered): the others were sent
            raise PermanentError(_refused(refused, len(fitting)),
                                 events=[event for event, _ in refused])

    def _refusal(self, message: Message) -> str | None:
        """Why `message` cannot be sent, if it cannot. Its topic counts towards
        `max_topics` only here, once nothing else refuses it."""
        config = self.config
        if len(message.value) > config.max_message_bytes:
            return f"larger than max_message_bytes ({config.max_message_bytes})"
        if bad_topic(message.topic):
            return f"whose topic Kafka refuses (., .., over {TOPIC_CHARS} characters)"
        if message.topic not in self.topics:
            if len(self.topics) >= config.max_topics:
                return (f"whose topic would be one more than max_topics ({config.max_topics}) "
                        "distinct topics")
            self.topics.add(message.topic)
        return None

    async def _producer(self) -> AIOKafkaProducer:
        if self.producer is not None:
            return self.producer
        config = self.config
        options: dict[str, Any] = {
            "acks": config.acks,
            "compression_type": None if config.compression == "none" else config.compression,
            "linger_ms": 0,  # the record batches are complete when handed over
            "max_batch_size": config.max_batch_bytes,
            "request_timeout_ms": int(config.timeout * 1000),
        }
        try:
            self.producer, idempotent = await start_producer(
                config, self.log, config.idempotence and config.acks == "all", **options)
        except KafkaError as e:
            raise RetryableError(f"kafka: cannot connect to {','.join(config.brokers)}: "
                                 f"{e!r}") from e
        self._idempotent.set(int(idempotent), {"exporter": self.id})
        self.log.info("kafka producer started", brokers=config.brokers, idempotent=idempotent)
        return self.producer

    @staticmethod
    async def _send(producer: AIOKafkaProducer, messages: list[Message]) -> None:
        """Hand the messages to the producer as one batch per partition, then wait for
        every acknowledgement. Building the batches here costs a fraction of `send()`
        per message, which is what limits a Python producer."""
        topics: dict[str, tuple[int, int]] = {}  # partition count, where keyless ones go
        batches: dict[tuple[str, int], BatchBuilder] = {}
        sent: list[asyncio.Future[Any]] = []
        try:
            for m in messages:
                topic = topics.get(m.topic)
                if topic is None:
                    count = len(await producer.partitions_for(m.topic))
                    # Keyless messages stick to one partition per batch (fewer, larger
                    # requests, as Kafka's sticky partitioner does); batches spread out.
                    topic = topics[m.topic] = (count, random.randrange(count))
                count, keyless = topic
                where = (m.topic, key_partition(m.key, count) if m.key is not None else keyless)
                batch = batches.get(where)
                if batch is None:
                    batch = batches[where] = producer.create_batch()
                if batch.append(key=m.key, value=m.value, timestamp=None,
                                headers=m.headers) is None:  # full: send it, start another
                    sent.append(await producer.send_batch(batch, where[0], partition=where[1]))
                    batch = batches[where] = producer.create_batch()
                    batch.append(key=m.key, value=m.value, timestamp=None, headers=m.headers)
            for (name, partition), batch in batches.items():
                sent.append(await producer.send_batch(batch, name, partition=partition))
        except Exception:
            await asyncio.gather(*sent, return_exceptions=True)  # the batch fails whole
            raise
        for result in await asyncio.gather(*sent, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def shutdown(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None


def _refused(refused: list[tuple[Event, str]], sent: int) -> str:
    """The error of a batch some of whose events were refused: how many for each reason,
    with the first event ids of each."""
    by_reason: dict[str, list[str]] = {}
    for event, reason in refused:
        by_reason.setdefault(reason, []).append(event.event_id)
    return "; ".join(f"{len(ids)} events {reason}: {', '.join(ids[:5])}"
                     for reason, ids in by_reason.items()) + f"; the other {sent} were sent"


factory = Factory(kind="exporter", type="kafka", config=KafkaExporterConfig, create=KafkaExporter)
