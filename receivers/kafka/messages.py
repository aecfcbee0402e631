"""Kafka messages to events, by the receiver's `encoding`.

`json` takes what the `webhook` receiver takes: meterline's own event JSON (what
the `kafka` exporter writes by default), Otoroshi's events (one per message, as
its Kafka data exporter writes them) and LiteLLM payloads; a message may hold one
item, a JSON array or NDJSON; Otoroshi events other than `LLMUsageAudit` (an
unfiltered data exporter writes every kind) are skipped and counted, not dead
letters. `otlp_proto` and `otlp_json` take OTLP `ExportLogsServiceRequest`s
(what the exporter's OTLP encodings write, or the OpenTelemetry Collector's
`kafka` exporter); log records that are not LLM calls are skipped and counted.

A message decodes whole or not at all: one with an item that fails is a dead
letter as a whole, so replaying it once fixed never duplicates its other items.
An `otlp_proto` message whose log record protobuf refuses (a string that is not
UTF-8) is parsed record by record for the reason, which names the record's place
(`resource_logs[0].scope_logs[0].log_records[2]: ...`), as the `otlp` receiver does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeAlias

import msgspec
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from meterline import bounds
from meterline.component import Decoded
from meterline.event import Event, list_from_json
from meterline.receivers.decoders import DecodeError, count_items, decode_body
from meterline.receivers.decoders.otlp import decode_logs, parse_json
from meterline.receivers.decoders.otlp_wire import parse_request

if TYPE_CHECKING:  # (a worker decoding values need not import the Kafka client)
    from aiokafka.structs import ConsumerRecord

Encoding = Literal["json", "otlp_proto", "otlp_json"]
Record: TypeAlias = "ConsumerRecord"  # of bytes keys and values
_values = msgspec.msgpack.Decoder(list[bytes | None])


def pack_values(records: list[Record]) -> bytes:
    """The messages' values as one body, for `decode_values` in a processing worker
    (`Consumer.consume_encoded`): the records themselves stay here."""
    return msgspec.msgpack.encode([r.value for r in records])


def decode_values(body: bytes, encoding: Encoding) -> Decoded:
    """The events of a polled batch (its values, `pack_values`), and the messages that
    hold none, by their place in the batch, with the reason (`rejected`: the poison).

    A batch of meterline events decodes in one call, as a JSON array of the
    messages, once that array is known to hold one item per message (a value such as
    `{},{},...` would otherwise be decoded as that many events, however many: see
    `bounds.ITEMS_MAX`); only when that fails is each message decoded on its own, within
    the bound.
    """
    values = _values.decode(body)
    if encoding == "json" and None not in values:
        joined = b"[" + b",".join(values) + b"]"  # type: ignore[arg-type]
        try:
            if count_items(joined) == len(values) and not bounds.too_many_containers(joined):
                events = list_from_json(joined)
                if not bounds.refused(events):
                    return Decoded(events)
        except (msgspec.DecodeError, RecursionError):
            pass
    decode = _DECODERS[encoding]
    out = Decoded()
    for index, value in enumerate(values):
        try:
            if value is None:
                raise DecodeError("the message has no value")
            events, skipped = decode(value)
        except DecodeError as e:
            out.rejected.append((index, str(e)))
            continue
        out.events += events
        out.skipped += skipped
    return out


def _json(value: bytes) -> tuple[list[Event], int]:
    decoded = decode_body(value)
    if decoded.rejected:
        raise DecodeError("; ".join(f"item {i}: {reason}" for i, reason in decoded.rejected[:3]))
    if not decoded.events and not decoded.skipped:
        raise DecodeError("the message holds no event")
    return decoded.events, decoded.skipped


def _otlp(request: ExportLogsServiceRequest) -> tuple[list[Event], int]:
    decoded = decode_logs(request)
    if decoded.rejected:
        raise DecodeError("; ".join(decoded.rejected[:3]))
    return decoded.events, decoded.skipped


def _otlp_proto(value: bytes) -> tuple[list[Event], int]:
    try:
        request, unparsed = parse_request(value, ExportLogsServiceRequest)
    except DecodeError as e:
        raise DecodeError(f"not an OTLP ExportLogsServiceRequest: {e}") from None
    if unparsed:  # the message is a dead letter whole, with where its bad records are
        raise DecodeError("; ".join(unparsed[:3]))
    return _otlp(request)


def _otlp_json(value: bytes) -> tuple[list[Event], int]:
    return _otlp(parse_json(value, ExportLogsServiceRequest))


_DECODERS: dict[str, Callable[[bytes], tuple[list[Event], int]]] = {
    "json": _json, "otlp_proto": _otlp_proto, "otlp_json": _otlp_json}
