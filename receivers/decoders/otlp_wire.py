"""An OTLP export request parsed item by item when it does not parse whole.

Protobuf refuses a whole message when any string in it is not UTF-8 (or any part of it
is malformed), so one span with a bad attribute would cost the sender every other span
of its request. When the whole request does not parse, `parse_request` splits it along
its fixed shape, request -> `resource_spans` -> `scope_spans` -> `spans` (`resource_logs`
-> `scope_logs` -> `log_records` for logs), and parses each part on its own: the good
items are kept in a request rebuilt from them, and each item that does not parse is
rejected alone, with a reason naming where it was (`resource_spans[0].scope_spans[1]
.spans[3]: String field had bad UTF-8`). When a resource or scope does not parse (its
`resource`, `scope` or `schema_url`), every item under it is rejected with its reason.
The reasons carry protobuf's words, never the bytes: they may hold personal data.

Only the framing of those three levels is walked; bytes that break it (a truncated
varint, a length past the end, a deprecated group: not protobuf, or cut short) refuse
the whole request with `DecodeError`. The walk reads each level's field boundaries (their
varints) and hands `memoryview` slices of the body to protobuf's parser
(no copy); a level that parses whole is not split further, so the cost stays linear in
the body, and the fast path (a request that parses) is one `FromString` as before.

Before any parsing, a request longer than `2 * bounds.ITEMS_MAX` bytes has its items
counted along the same framing, up to the bound: an empty span is two bytes, and 8 MB of
them took a worker 15 s and 700 MB to parse and skip. Past the bound it is refused whole
(`TooManyItems`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from meterline import bounds
from meterline.logs import bounded
from meterline.receivers.decoders.errors import DecodeError, TooManyItems

__all__ = ["parse_request", "too_many_items"]

M = TypeVar("M", bound=Message)

_LENGTH_DELIMITED = 2
_WIRE_SIZES = {1: 8, 5: 4}  # fixed64, fixed32; a varint (0) is read, a length (2) too
_LEVELS = 2  # below the request: resources, then scopes; their items are parsed whole
_MAX_REASON = 200


def parse_request(body: bytes, request_class: type[M]) -> tuple[M, list[str]]:
    """An `Export*ServiceRequest` from its bytes, and why each item left out of it could
    not be parsed (see the module's docstring); `DecodeError` when the bytes are not
    protobuf, `TooManyItems` when they hold more than `bounds.ITEMS_MAX` items."""
    if len(body) > 2 * bounds.ITEMS_MAX and _count(memoryview(body)) > bounds.ITEMS_MAX:
        raise too_many_items()
    try:
        return request_class.FromString(body), []
    except (ProtobufDecodeError, RecursionError):
        pass
    request = request_class()
    rejected: list[str] = []
    if (why := _split(memoryview(body), request, 1, _LEVELS, "", rejected)) is not None:
        raise DecodeError(why)  # the request's own fields are unknown ones: not protobuf
    return request, rejected


def _split(view: memoryview, message: Message, items_number: int, levels: int, path: str,
           rejected: list[str]) -> str | None:
    """Merge the fields of `view` into `message`, its items (field `items_number`) each on
    its own: an item that does not parse is split in turn while `levels` remain, else
    rejected. When `message`'s own fields do not parse, why (its items are rejected)."""
    fields = list(_fields(view, path))
    chunks = _items(view, fields, items_number)
    for number, wire, start, _, end in fields:
        if number != items_number or wire != _LENGTH_DELIMITED:
            try:
                message.MergeFromString(view[start:end])
            except (ProtobufDecodeError, RecursionError) as e:
                field = message.DESCRIPTOR.fields_by_number.get(number)
                why = f"{_child(path, field.name if field else f'field {number}')}: {_text(e)}"
                rejected += [why] * _leaves(chunks, levels, path)
                return why
    name = message.DESCRIPTOR.fields_by_number[items_number].name
    items = getattr(message, name)
    for n, chunk in enumerate(chunks):
        where = _child(path, f"{name}[{n}]")
        item = items.add()
        try:
            item.MergeFromString(chunk)
        except (ProtobufDecodeError, RecursionError) as e:
            item.Clear()
            if levels:
                kept = _split(chunk, item, 2, levels - 1, where, rejected) is None
            else:
                rejected.append(f"{where}: {_text(e)}")
                kept = False
            if not kept:
                del items[-1]
    return None


def too_many_items() -> TooManyItems:
    """The refusal of a request of more than `bounds.ITEMS_MAX` spans or log records
    (OTLP/JSON's too, `decoders/otlp.py`)."""
    return TooManyItems(f"more than {bounds.ITEMS_MAX} items in one request "
                        "(send smaller batches)")


def _count(view: memoryview, levels: int = _LEVELS, counted: int = 0) -> int:
    """The items (spans, log records) `counted` so far and those under `view`, `levels`
    levels above them, read from the framing alone; the count stops once past the bound,
    so it costs at most `bounds.ITEMS_MAX` fields read."""
    for number, wire, _, value, end in _fields(view, ""):
        if number == (1 if levels == _LEVELS else 2) and wire == _LENGTH_DELIMITED:
            counted = _count(view[value:end], levels - 1, counted) if levels else counted + 1
            if counted > bounds.ITEMS_MAX:
                break
    return counted


def _leaves(chunks: list[memoryview], levels: int, path: str) -> int:
    """The spans or log records among `chunks`, parts `levels` levels above them."""
    if not levels:
        return len(chunks)
    return sum(_leaves(_items(c, list(_fields(c, path)), 2), levels - 1, path) for c in chunks)


def _items(view: memoryview, fields: list[tuple[int, int, int, int, int]],
           number: int) -> list[memoryview]:
    """The values of the length-delimited fields `number` (a part's items)."""
    return [view[value:end] for n, wire, _, value, end in fields
            if n == number and wire == _LENGTH_DELIMITED]


def _fields(view: memoryview, path: str) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, start, value's start, end) of each field of one message."""
    pos, size = 0, len(view)
    while pos < size:
        start = pos
        tag, pos = _varint(view, pos, path)
        number, wire = tag >> 3, tag & 7
        value = pos
        if wire == 0:
            _, pos = _varint(view, pos, path)
        elif wire == _LENGTH_DELIMITED:
            length, value = _varint(view, pos, path)
            pos = value + length
        elif wire in _WIRE_SIZES:
            pos += _WIRE_SIZES[wire]
        else:
            what = "a group, which is not read here" if wire < 6 else "no such wire type"
            raise DecodeError(f"{path or 'the request'}: field {number} at byte {start} "
                              f"has wire type {wire}: {what}")
        if not number:
            raise DecodeError(f"{path or 'the request'}: field number 0 at byte {start}")
        if pos > size:
            raise DecodeError(f"{path or 'the request'}: field {number} at byte {start} "
                              f"runs past the end ({size} bytes)")
        yield number, wire, start, value, pos


def _varint(view: memoryview, pos: int, path: str) -> tuple[int, int]:
    """The base-128 varint at `pos` (10 bytes at most), and where it ends. Read here:
    protobuf's own varint decoder is private to it."""
    value = 0
    for shift, at in enumerate(range(pos, min(pos + 10, len(view)))):
        value |= (view[at] & 0x7F) << (7 * shift)
        if view[at] < 0x80:
            return value, at + 1
    raise DecodeError(f"{path or 'the request'}: truncated or overlong varint at byte {pos}")


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _text(error: Exception) -> str:
    """Protobuf's reason without its preamble (`Error parsing message with type '...':`),
    bounded: it never quotes the bytes."""
    return bounded(str(error).rpartition(": ")[2] or type(error).__name__, _MAX_REASON)
