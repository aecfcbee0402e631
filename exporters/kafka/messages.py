"""Events to Kafka messages: one message per event, its topic, key, headers and value.

The value is the event's meterline JSON (`json`, what the `kafka` and `webhook`
receivers read; with a `projection`, the document it makes of the event), or an OTLP
`ExportLogsServiceRequest` holding the event's one log record, as protobuf (`otlp_proto`)
or OTLP/JSON (`otlp_json`), for consumers that speak OTLP (the OpenTelemetry Collector's
`kafka` receiver with its `otlp_proto` / `otlp_json` encodings).

One event per message keeps Kafka's tools meaningful: the key places related
events (same API key, same trace) on one partition, in order; the headers carry
the event id and schema version so a consumer can deduplicate or route without
decoding the value; and a consumer group scales by partitions.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.partitioner import murmur2

from meterline.event import SCHEMA_VERSION, Event
from meterline.exporters.otlp.encode import to_json as otlp_json
from meterline.exporters.otlp.encode import to_logs_request
from meterline.fieldpath import ReadPath
from meterline.projection import Projection, jsonl

Encoding = Literal["json", "otlp_proto", "otlp_json"]

EVENT_ID_HEADER = "meterline.event_id"
SCHEMA_HEADER = "meterline.schema_version"
_SCHEMA = str(SCHEMA_VERSION).encode()
_NOT_IN_TOPIC = re.compile(r"[^A-Za-z0-9._-]")
MISSING = "unknown"  # a templated topic's part when the event has no value for the field
TOPIC_CHARS = 249  # Kafka's longest topic name


class TopicTemplate(str):
    """A topic name, or a template on event fields such as `llm.{provider}`."""

    @classmethod
    def from_config(cls, value: Any) -> TopicTemplate:
        if not isinstance(value, str):
            raise ValueError(f"expected a topic name, got {value!r}")
        topic_router(value)
        return cls(value)


def bad_topic(topic: str) -> bool:
    """Whether Kafka refuses `topic` (a template filled from an event: a user id of 300
    characters, a provider `..`) as a name; its event fails alone, else the whole batch
    would be retried for ever."""
    return len(topic) > TOPIC_CHARS or topic in ("", ".", "..")


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def topic_router(template: str) -> Callable[[Event], str] | str:
    """The topic of each event from a template such as `llm.{provider}`, or the template
    itself when it has no field. A field the event lacks becomes `unknown`; characters
    Kafka refuses in topic names become `_`."""
    parts: list[str | Callable[[Event], Any]] = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(literal)
        if field is not None:
            if not field or spec or conversion:
                raise ValueError(f"{template!r}: write fields as {{name}}, e.g. llm.{{provider}}")
            parts.append(ReadPath(field).get)
    if all(isinstance(p, str) for p in parts):
        if _NOT_IN_TOPIC.search(template) or bad_topic(template):
            raise ValueError(f"{template!r} is not a valid topic name (letters, digits, . _ -; "
                             f"not . or ..; at most {TOPIC_CHARS} characters)")
        return template

    def route(event: Event) -> str:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = part(event)
                out.append(_NOT_IN_TOPIC.sub("_", str(value)) if value is not None else MISSING)
        return "".join(out)
    return route


class MessageBuilder:
    """Builds a batch's messages; the whole batch is encoded in as few calls as it can."""

    def __init__(self, topic: str, key: ReadPath | None, encoding: Encoding,
                 projection: Projection | None = None) -> None:
        self.topic = topic_router(topic)
        self.key = key.get if key is not None else None
        self.encoding = encoding
        self.projection = projection  # json only: the value is the projected document

    def build(self, events: list[Event]) -> list[Message]:
        values = self.encode(events)
        topic, key = self.topic, self.key
        messages = []
        for event, value in zip(events, values, strict=True):
            k = key(event) if key is not None else None
            messages.append(Message(
                topic if isinstance(topic, str) else topic(event),
                str(k).encode() if k is not None else None,
                value,
                [(EVENT_ID_HEADER, event.event_id.encode()), (SCHEMA_HEADER, _SCHEMA)]))
        return messages

    def encode(self, events: list[Event]) -> list[bytes]:
        if self.encoding == "otlp_proto":
            return [to_logs_request([e]).SerializeToString() for e in events]
        if self.encoding == "otlp_json":
            return [otlp_json(to_logs_request([e])) for e in events]
        # The JSON form never holds a raw newline (strings escape it), so one
        # encode_lines call and a split give every event's JSON.
        return jsonl(events, self.projection).split(b"\n")[:-1]


@functools.lru_cache(maxsize=65536)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition of a keyed message: Kafka's default partitioner (murmur2 of the
    key, as the Java client computes it), so every producer agrees where a key goes."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions

