"""OTLP/JSON: protobuf's JSON mapping with the OTLP spec's exceptions.

Trace and span ids are hex strings rather than base64, enums are numbers, and
field names are lowerCamelCase (snake_case is accepted when reading). Shared by
what writes OTLP/JSON (the `otlp` encoding of events) and what reads it (the
`otlp` receiver, Kafka payloads).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Final, TypeVar

import msgspec
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from google.protobuf.message import Message

_ID_KEYS: Final = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id",
                             "parent_span_id"})
_encoder = msgspec.json.Encoder()
M = TypeVar("M", bound=Message)


def to_json(message: Message) -> bytes:
    data = MessageToDict(message, use_integers_for_enums=True)
    return _encoder.encode(_map_ids(data, lambda _, v: base64.b64decode(v).hex()))


def parse_json(data: bytes, message_class: type[M],
               check: Callable[[dict[str, Any]], None] | None = None) -> M:
    """An OTLP/JSON body as a protobuf message; ValueError saying what is wrong. `check`
    sees the parsed document before protobuf builds the message from it."""
    try:
        parsed = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise ValueError("malformed JSON: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ValueError("an OTLP/JSON body must be a JSON object")
    if check is not None:
        check(parsed)
    try:
        return ParseDict(_map_ids(parsed, _hex_to_base64), message_class(),
                         ignore_unknown_fields=True)
    except ParseError as e:
        raise ValueError(f"not an OTLP {message_class.__name__}: {e}") from None
    except RecursionError:
        raise ValueError(f"not an OTLP {message_class.__name__}: nested too deeply") from None
    except (TypeError, AttributeError) as e:  # json_format trips over some misplaced lists
        raise ValueError(f"not an OTLP {message_class.__name__}: {type(e).__name__}: "
                         f"{e}") from None


def _hex_to_base64(key: str, value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise ValueError(f"{key} must be hex, got {value!r}") from None


def _map_ids(node: Any, convert: Callable[[str, str], str]) -> Any:
    """Apply `convert` to every id in a parsed OTLP/JSON document, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = convert(key, value)
            else:
                _map_ids(value, convert)
    elif isinstance(node, list):
        for item in node:
            _map_ids(item, convert)
    return node
