"""Kafka connection settings, written once for the `kafka` exporter and the `kafka` receiver.

Both take the same keys (`brokers`, `client_id`, `sasl`, `tls`: the options
Otoroshi's Kafka data exporter has; `tls` is the core's `meterline.tls.TlsConfig`),
so the edge that writes a topic and the collectors that read it are configured
alike. This module turns them into aiokafka client options and starts producers,
falling back to a non-idempotent producer when the broker refuses idempotence
rather than failing for ever.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError
from structlog.typing import FilteringBoundLogger

from meterline.component import Config
from meterline.tls import TlsConfig, client_context

# What a broker that is down or unreachable raises; anything else from starting an
# idempotent producer means the broker would not give it a producer id.
UNREACHABLE = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError)

# aiokafka logs every failed connection attempt at ERROR through the standard library;
# the components log each failure once, with their id and what they will do about it.
logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


class SaslConfig(Config):
    username: str  # the SASL user
    password: str  # its password (use ${env:...})
    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"  # over TLS


class Brokers(list[str]):
    """`host:port` bootstrap addresses: a list, or a comma-separated string (handy with
    `${env:KAFKA_BROKERS}`)."""

    config_type = "list of host:port"  # as `meterline components` names it

    @classmethod
    def from_config(cls, value: Any) -> Brokers:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected host:port addresses (a list or a comma-separated "
                             f"string), got {value!r}")
        brokers = cls(item.strip() for item in items if item.strip())
        if not brokers:
            raise ValueError("expected at least one host:port address")
        for broker in brokers:
            host, sep, port = broker.rpartition(":")
            if not (sep and host and port.isdigit()):
                raise ValueError(f"expected host:port, got {broker!r}")
        return brokers


def default_brokers() -> Brokers:
    return Brokers(["localhost:9092"])


class Connection(Protocol):
    """The connection keys both Kafka config classes declare."""

    brokers: Brokers
    client_id: str
    sasl: SaslConfig | None
    tls: TlsConfig | None


def client_options(conn: Connection) -> dict[str, Any]:
    """aiokafka keyword arguments for the connection: bootstrap servers, client id,
    security protocol, SASL credentials and TLS context."""
    options: dict[str, Any] = {"bootstrap_servers": conn.brokers, "client_id": conn.client_id}
    transport = "SSL" if conn.tls is not None else "PLAINTEXT"
    options["security_protocol"] = f"SASL_{transport}" if conn.sasl is not None else transport
    if conn.tls is not None:
        options["ssl_context"] = client_context(conn.tls)
    if conn.sasl is not None:
        options.update(sasl_mechanism=conn.sasl.mechanism,
                       sasl_plain_username=conn.sasl.username,
                       sasl_plain_password=conn.sasl.password)
    return options


async def start_producer(conn: Connection, log: FilteringBoundLogger, idempotent: bool,
                         **options: Any) -> tuple[AIOKafkaProducer, bool]:
    """Start a producer; returns it and whether it is idempotent.

    Some brokers refuse idempotence (no `InitProducerId`: old versions, missing
    `IdempotentWrite` ACL, Tansu's in-memory storage). Then a warning is logged and
    a non-idempotent producer is started instead: at-least-once delivery still
    holds, and a retried batch may be written twice (with the same event ids).
    Raises the aiokafka error when the broker cannot be reached at all.
    """
    base = {**client_options(conn), **options}
    refusal: KafkaError | None = None
    if idempotent:
        try:
            return await _started(AIOKafkaProducer(**base, enable_idempotence=True)), True
        except UNREACHABLE:
            raise
        except KafkaError as e:
            refusal = e
    producer = await _started(AIOKafkaProducer(**base, enable_idempotence=False))
    if refusal is not None:
        log.warning("the broker refused an idempotent producer; using a non-idempotent one "
                    "(a retried batch may then be written twice)", error=repr(refusal))
    return producer, False


async def _started(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    return producer
