"""Receiver `kafka`: a consumer group on one or more topics, at-least-once.

Each polled batch is decoded (`messages.py`: meterline's own JSON, Otoroshi's
events, LiteLLM payloads, or OTLP logs), handed to the pipeline, and its offsets
are committed only once `consume` returned, that is once the events are durably
queued. A crash before the commit means the batch is read again: duplicates,
never loss.

While the pipeline pushes back, the receiver pauses its partitions (nothing more
is fetched) and keeps polling so the group does not think it dead. A message
that cannot be decoded is copied to the dead-letter topic, with the reason in the
`meterline.error` header, and its partition goes on. A dead-letter topic that
cannot be written (missing where topics are not auto-created, an ACL refusing
the write) stalls the batch instead, partitions paused and retried with backoff,
logged as an error: skipping the message would lose it, so nothing is committed
past it until the topic can be written (`dead_letter_blocked` in the status).

When the group rebalances (a collector joins or leaves), the batch in hand is
finished and committed before the partitions are given up; one stuck on
back-pressure or on the dead-letter topic is let go uncommitted, for the
partitions' next owner to read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, Literal

import msgspec
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from meterline.backoff import exponential
from meterline.backpressure import offer_encoded, retry_hint
from meterline.clients.kafka import (
    Brokers,
    SaslConfig,
    TlsConfig,
    client_options,
    default_brokers,
    start_producer,
)
from meterline.component import (
    AdminHandler,
    Config,
    Consumer,
    Context,
    Decode,
    Factory,
    Received,
    Receiver,
    cancel_and_wait,
)
from meterline.receivers.decoders import loggable
from meterline.receivers.kafka.messages import Encoding, Record, decode_values, pack_values
from meterline.units import Duration

ERROR_HEADER = "meterline.error"
_MAX_RETRY_INTERVAL = 30.0  # connection attempts back off up to this many seconds
Records = dict[TopicPartition, list[Record]]


class KafkaReceiverConfig(Config):
    brokers: Brokers = msgspec.field(default_factory=default_brokers)  # bootstrap servers
    client_id: str = "meterline"  # as the brokers log it
    sasl: SaslConfig | None = None  # null: no authentication
    tls: TlsConfig | None = None  # null: plaintext
    topics: list[str] = msgspec.field(default_factory=lambda: ["meterline.events"])  # read
    group_id: str = "meterline"  # the consumer group: its members share the partitions
    encoding: Encoding = "json"  # or otlp_proto, otlp_json (OTLP logs)
    start_at: Literal["earliest", "latest"] = "earliest"  # for a group with no offset yet
    dead_letter_topic: str | None = "{topic}.dead-letter"  # null: log and skip instead
    dead_letter_timeout: Duration = Duration(10)  # for a dead-letter write, before a retry
    max_batch: int = 1000  # messages per poll
    session_timeout: Duration = Duration(30)  # a member silent this long leaves the group
    heartbeat_interval: Duration = Duration(3)  # how often the member tells it is alive
    rebalance_timeout: Duration = Duration(30)  # for members to rejoin in a rebalance
    retry_interval: Duration = Duration(1)  # first wait while the brokers are away (doubles)

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("topics: give at least one topic")
        if self.dead_letter_topic is not None:
            try:
                self.dead_letter_topic.format(topic="t")
            except (KeyError, IndexError, ValueError):
                raise ValueError("dead_letter_topic may only use {topic}") from None
            if self.dead_letter_topic.format(topic="") == "" or any(
                    self.dead_letter_topic.format(topic=t) == t for t in self.topics):
                raise ValueError("dead_letter_topic must differ from the topics read")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.dead_letter_timeout <= 0:
            raise ValueError("dead_letter_timeout must be positive")
        if self.heartbeat_interval >= self.session_timeout:
            raise ValueError("heartbeat_interval must be shorter than session_timeout")


class KafkaReceiver(Receiver):
    def __init__(self, config: KafkaReceiverConfig, context: Context,
                 consumer: Consumer) -> None:
        super().__init__(consumer)
        self.config = config
        self.id = context.id
        self.log = context.log
        # (run where the events are processed: a worker process, when there are some)
        self._decode: Decode = functools.partial(decode_values, encoding=config.encoding)
        self.kafka: AIOKafkaConsumer | None = None
        self.dead_letters: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._batch = asyncio.Lock()  # held from a poll until its offsets are committed
        self._letting_go = 0  # rebalances or shutdown waiting for the batch in hand
        self._paused = False
        self._dead_letter_blocked = False
        self._committed: dict[TopicPartition, int] = {}  # next offset, by owned partition
        self._lag = context.meter.create_gauge(
            "meterline_kafka_consumer_lag",
            description="Messages in a partition after the kafka receiver's last commit "
                        "(0 once the partition went to another member)")

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kafka receiver")

    async def shutdown(self) -> None:
        """Finish (or, when pushed back, let go) the batch in hand, then leave the group
        so that the other members take the partitions at once."""
        self._letting_go += 1
        async with self._batch:
            await cancel_and_wait(self._task)
        for client in (self.kafka, self.dead_letters):
            if client is not None:
                try:
                    await client.stop()
                except KafkaError as e:  # the brokers are gone: nothing left to tell them
                    self.log.info("kafka client stopped uncleanly", error=repr(e))

    async def _run(self) -> None:
        self.kafka = await self._connect()
        while True:
            try:
                records = await self.kafka.getmany(timeout_ms=1000,
                                                   max_records=self.config.max_batch)
            except KafkaError as e:
                self.log.warning("kafka poll failed; retrying", error=repr(e))
                await asyncio.sleep(float(self.config.retry_interval))
                continue
            if not records:
                continue
            async with self._batch:
                try:
                    done = await self._handle(records)
                except Exception:
                    self.log.exception("batch failed; reading it again")
                    await asyncio.sleep(float(self.config.retry_interval))
                    done = False
                if not done:
                    self._rewind(records)

    def _rewind(self, records: Records) -> None:
        """Read a batch that was not committed again, from its first message."""
        assert self.kafka is not None
        owned = self.kafka.assignment()
        for tp, batch in records.items():
            if tp in owned:
                self.kafka.seek(tp, batch[0].offset)

    async def _connect(self) -> AIOKafkaConsumer:
        config = self.config
        delays = exponential(float(config.retry_interval), _MAX_RETRY_INTERVAL)
        while True:
            kafka = AIOKafkaConsumer(
                **client_options(config), group_id=config.group_id,
                enable_auto_commit=False, auto_offset_reset=config.start_at,
                max_poll_records=config.max_batch,
                session_timeout_ms=int(config.session_timeout * 1000),
                heartbeat_interval_ms=int(config.heartbeat_interval * 1000),
                rebalance_timeout_ms=int(config.rebalance_timeout * 1000))
            kafka.subscribe(config.topics, listener=_Rebalance(self, kafka))
            try:
                await kafka.start()
            except BaseException as e:
                await kafka.stop()
                if not isinstance(e, KafkaError):
                    raise
                delay = next(delays)
                self.log.warning("cannot reach kafka; retrying", brokers=config.brokers,
                                 error=repr(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                continue
            self.log.info("kafka consumer started", topics=config.topics,
                          group_id=config.group_id)
            return kafka

    # --- status ------------------------------------------------------------------
    def admin_routes(self) -> dict[str, AdminHandler]:
        return {f"receivers/{self.id}": self._status}

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        """The group, the partitions this member owns and how far behind each is."""
        kafka = self.kafka
        partitions = []
        for tp in sorted(kafka.assignment() if kafka is not None else ()):
            committed = self._committed.get(tp)
            highwater = kafka.highwater(tp) if kafka is not None else None
            lag = (highwater - committed if highwater is not None and committed is not None
                   else None)
            partitions.append({"topic": tp.topic, "partition": tp.partition,
                               "committed": committed, "highwater": highwater, "lag": lag})
        return {"group_id": self.config.group_id, "topics": self.config.topics,
                "started": kafka is not None, "paused": self._paused,
                "dead_letter_blocked": self._dead_letter_blocked, "partitions": partitions}

    # --- one batch -----------------------------------------------------------------
    async def _handle(self, records: Records) -> bool:
        """Decode, deliver and commit a batch; False when it was let go uncommitted. The
        values are decoded where the events are processed (a worker process, when there
        are some): the loop that serves every listener of the daemon does not decode."""
        batch = [r for rs in records.values() for r in rs]
        received = await self._deliver(pack_values(batch))
        if received is None:
            return False
        poison = [(batch[index], reason) for index, reason in received.rejected]
        if poison and not await self._dead_letter(poison):
            return False
        if received.skipped:
            self.consumer.refused(received.skipped, "not_llm_call")
        offsets = {tp: rs[-1].offset + 1 for tp, rs in records.items()}
        assert self.kafka is not None
        try:
            await self.kafka.commit(offsets)
        except KafkaError as e:  # the partitions went to another member, which reads them
            self.log.warning("offsets not committed (their events may be read again)",
                             error=repr(e))
            return True
        self._committed.update(offsets)
        for tp, offset in offsets.items():
            self._report_lag(tp, max(0, (self.kafka.highwater(tp) or offset) - offset))
        return True

    def _report_lag(self, tp: TopicPartition, lag: int) -> None:
        self._lag.set(lag, {"receiver": self.id, "topic": tp.topic,
                            "partition": str(tp.partition)})

    async def _deliver(self, body: bytes) -> Received | None:
        """Hand the batch to the pipeline, pausing the partitions while it pushes back.
        None when the batch was let go (a rebalance or shutdown is waiting)."""
        assert self.kafka is not None
        try:
            return await offer_encoded(self.consumer, self._decode, body,
                                       self._wait_pushed_back)
        finally:
            self._resume()

    async def _wait_pushed_back(self, pushback: Exception) -> bool:
        if self._letting_go:
            return False
        if not self._paused:
            self.log.info("pipeline pushing back; partitions paused", reason=str(pushback))
        hint = retry_hint(pushback)
        await self._paused_wait(hint if hint is not None else float(self.config.retry_interval))
        return True

    async def _paused_wait(self, seconds: float) -> None:
        """Wait with the partitions paused: they return nothing, and polling keeps this
        member in the group (and lets a rebalance happen)."""
        assert self.kafka is not None
        if not self._paused:
            self._paused = True
            self.kafka.pause(*self.kafka.assignment())
        await self.kafka.getmany(timeout_ms=int(seconds * 1000))

    def _resume(self) -> None:
        if self._paused:
            assert self.kafka is not None
            self._paused = False
            self.kafka.resume(*self.kafka.paused())
            self.log.info("partitions resumed")

    async def _dead_letter(self, poison: list[tuple[Record, str]]) -> bool:
        """Copy the poison to the dead-letter topic, retrying until it is written: the
        batch (and its partitions) waits, since skipping it would lose the messages.
        False when the batch was let go meanwhile."""
        template = self.config.dead_letter_topic
        for record, reason in poison:
            self.log.warning("undecodable message", topic=record.topic,
                             partition=record.partition, offset=record.offset,
                             reason=loggable(reason),
                             dead_letter=template.format(topic=record.topic) if template else None)
        delays, attempts = exponential(float(self.config.retry_interval), _MAX_RETRY_INTERVAL), 0
        try:
            while template is not None:
                try:
                    await self._send_dead_letters(template, poison)
                    break
                except KafkaError as e:
                    if self._letting_go:
                        return False
                    attempts += 1
                    delay = next(delays)
                    if not self._dead_letter_blocked:
                        self._dead_letter_blocked = True
                        self.log.error(
                            "cannot write the dead-letter topic: the partitions are paused and "
                            "nothing is committed past the undecodable messages until it can "
                            "be written (create the topic, or let this client write it)",
                            dead_letter=sorted({template.format(topic=r.topic)
                                                for r, _ in poison}),
                            error=repr(e))
                    else:
                        self.log.warning("dead-letter topic still not writable; retrying",
                                         attempts=attempts, retry_in_s=delay, error=repr(e))
                    await self._paused_wait(delay)
        finally:
            self._resume()
            blocked, self._dead_letter_blocked = self._dead_letter_blocked, False
        if blocked:
            self.log.info("dead-letter topic written; partitions go on", attempts=attempts)
        self.consumer.refused(len(poison), "undecodable")
        return True

    async def _send_dead_letters(self, template: str,
                                 poison: list[tuple[Record, str]]) -> None:
        if self.dead_letters is None:
            timeout_ms = int(self.config.dead_letter_timeout * 1000)
            self.dead_letters, _ = await start_producer(self.config, self.log, idempotent=False,
                                                        acks="all", request_timeout_ms=timeout_ms)
        pending = []
        for record, reason in poison:
            headers = [*record.headers, (ERROR_HEADER, reason.encode()),
                       ("meterline.source.topic", record.topic.encode()),
                       ("meterline.source.partition", str(record.partition).encode()),
                       ("meterline.source.offset", str(record.offset).encode())]
            pending.append(await self.dead_letters.send(
                template.format(topic=record.topic), record.value, key=record.key,
                headers=headers))
        await asyncio.gather(*pending)


class _Rebalance(ConsumerRebalanceListener):
    """Before partitions are given up, wait for the batch in hand to be committed, so
    that their next owner starts after it (no duplicates on an orderly rebalance)."""

    def __init__(self, receiver: KafkaReceiver, kafka: AIOKafkaConsumer) -> None:
        self.receiver = receiver
        self.kafka = kafka

    async def on_partitions_revoked(self, revoked: Any) -> None:
        receiver = self.receiver
        receiver._letting_go += 1
        try:
            async with receiver._batch:
                pass
        finally:
            receiver._letting_go -= 1
        for tp in revoked:
            if receiver._committed.pop(tp, None) is not None:
                receiver._report_lag(tp, 0)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        receiver = self.receiver
        receiver.log.info("partitions assigned",
                          partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        for tp in assigned:  # where the group stands, for the status and the lag
            with contextlib.suppress(KafkaError):
                committed = await self.kafka.committed(tp)
                if committed is not None:
                    receiver._committed[tp] = committed


factory = Factory(kind="receiver", type="kafka", config=KafkaReceiverConfig, create=KafkaReceiver)
