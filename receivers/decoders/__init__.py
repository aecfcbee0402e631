"""Decoders: foreign formats in, events out.

Every receiver that takes JSON (webhook, file, kafka) goes through `decode_body`
or `decode_item`. The decoder is chosen per item by what the item carries:
Otoroshi audit events have `@type`/`audit`, LiteLLM's `StandardLoggingPayload`
has its own keys, and anything else must be meterline's own JSON form. An item
that fits none is refused with the reason, never dropped silently; an item that
is well-formed but not an LLM call (`NotAnLLMCall`: an Otoroshi GatewayEvent...)
is skipped and counted apart. Every event is then checked against the bounds of
`meterline.bounds` (token counts, weights, timestamps, status codes, id lengths, control
characters...): an item out of bounds is refused alone, with the reason.
"""

from __future__ import annotations

from typing import Any

import msgspec

from meterline import bounds
from meterline.component import Decoded
from meterline.event import FIELDS, Event, from_dict, list_from_json
from meterline.receivers.decoders import litellm, otoroshi
from meterline.receivers.decoders.errors import DecodeError, NotAnLLMCall, TooManyItems, loggable

__all__ = ["DecodeError", "Decoded", "NotAnLLMCall", "TooManyItems", "check_items",
           "count_items", "decode_body", "decode_item", "decode_ndjson", "loggable"]

_raw = msgspec.json.Decoder()
_raw_items = msgspec.json.Decoder(list[msgspec.Raw])
_TOO_DEEP = "JSON nested too deeply"  # msgspec stops at the interpreter's recursion limit
_UNEXPECTED = "cannot decode: "  # the reason given for an exception no decoder expected


def decode_item(item: Any) -> Event:
    """One parsed JSON item to an event, whichever format it is in."""
    try:
        event = _decode_item(item)
    except DecodeError:
        raise
    except Exception as e:  # a decoder's bug: refused with its name, as in `decode_body`
        raise DecodeError(f"{_UNEXPECTED}{type(e).__name__}: {e}") from e
    if bad := bounds.refused([event]):
        raise DecodeError(_out_of_bounds(bad[0]))
    return event


def _decode_item(item: Any) -> Event:
    if not isinstance(item, dict):
        raise DecodeError(f"expected a JSON object, got {type(item).__name__}")
    if "@type" in item or "audit" in item:
        return otoroshi.decode(item)
    if litellm.recognises(item):
        return litellm.decode(item)
    if not FIELDS.intersection(item):
        raise DecodeError(
            "matches no decoder: not an Otoroshi audit event (no @type or audit), not a "
            "LiteLLM StandardLoggingPayload (no litellm_call_id, call_type or "
            "custom_llm_provider), not a meterline event (none of its fields)")
    try:
        return from_dict(item)
    except msgspec.ValidationError as e:
        raise DecodeError(f"invalid meterline event: {e}") from None


def decode_body(body: bytes, ndjson: bool = False) -> Decoded:
    """A request body (JSON object, JSON array, or NDJSON) to events and rejections.

    A JSON array of meterline events decodes in a single call; only when that
    fails does each item go through `decode_item` on its own.
    """
    if why := bounds.too_many_containers(body):
        raise TooManyItems(f"{why} in one body (send smaller batches)")
    text = body.lstrip()
    if not ndjson and text[:1] == b"[":
        check_items(text)
        try:
            events = list_from_json(text)
        except (msgspec.DecodeError, RecursionError):
            pass  # not all meterline events: go item by item below
        else:
            bad = bounds.refused(events)
            return Decoded([e for i, e in enumerate(events) if i not in bad],
                           [(i, _out_of_bounds(bad[i])) for i in sorted(bad)])
    items: list[Any]
    if ndjson:
        items = _lines(body)
    else:
        try:
            parsed = _raw.decode(body)
        except RecursionError:
            raise DecodeError(_TOO_DEEP) from None
        except msgspec.DecodeError as e:
            if (isolated := _items(text)) is not None:
                items = isolated  # a well-formed array with a bad value in some item
            elif b"\n" not in text.rstrip():
                raise DecodeError(f"malformed JSON: {e}") from None
            else:
                items = _lines(body)  # several JSON documents, one per line
                if isinstance(items[0], DecodeError):
                    raise DecodeError(f"malformed JSON: {e}") from None
        else:
            items = parsed if isinstance(parsed, list) else [parsed]
    decoded = Decoded()
    indexes = []  # the item each event came from
    for index, item in enumerate(items):
        try:
            if isinstance(item, DecodeError):
                raise item
            decoded.events.append(_decode_item(item))
            indexes.append(index)
        except NotAnLLMCall:
            decoded.skipped += 1
        except DecodeError as e:
            decoded.rejected.append((index, str(e)))
        except Exception as e:
            decoded.rejected.append((index, f"{_UNEXPECTED}{type(e).__name__}: {e}"))
    if bad := bounds.refused(decoded.events):
        decoded.events = [e for n, e in enumerate(decoded.events) if n not in bad]
        decoded.rejected = sorted(decoded.rejected + [(indexes[n], _out_of_bounds(reason))
                                                      for n, reason in bad.items()])
    return decoded


def decode_ndjson(body: bytes) -> Decoded:
    """`decode_body` of NDJSON, as a function of its own: one that pickles by name, for
    a worker process to run (`Consumer.consume_encoded`)."""
    return decode_body(body, ndjson=True)


def count_items(array: bytes) -> int | None:
    """The items of a JSON array, counted before any is decoded: parsed as raw spans of
    it (about 50 bytes each, for an instant). None when it is not a well-formed array."""
    try:
        return len(_raw_items.decode(array))
    except (msgspec.DecodeError, RecursionError):
        return None


def check_items(array: bytes) -> None:
    """Refuse a JSON array of more than `bounds.ITEMS_MAX` items (`TooManyItems`) before
    any is decoded. An item takes two bytes at least (itself and a comma), so only a
    longer array is counted. A malformed one passes: the decoding that follows says why."""
    if len(array) > 2 * bounds.ITEMS_MAX and (count := count_items(array) or 0) > bounds.ITEMS_MAX:
        raise TooManyItems(f"{count} items in one body: at most {bounds.ITEMS_MAX} "
                           "(send smaller batches)")


def _out_of_bounds(reason: str) -> str:
    return reason if reason == bounds.OUT_OF_RANGE else f"out of bounds: {reason}"


def _items(text: bytes) -> list[Any] | None:
    """A JSON array whose structure is sound but some value is not (a number out of
    range): each item parsed alone, the bad ones as their DecodeError, so that they are
    refused alone. None when the array itself is malformed."""
    if text[:1] != b"[":
        return None
    try:
        raws = _raw_items.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    items: list[Any] = []
    for raw in raws:
        try:
            items.append(_raw.decode(raw))
        except msgspec.DecodeError as e:
            items.append(DecodeError(f"malformed JSON: {e}"))
        except RecursionError:
            items.append(DecodeError(_TOO_DEEP))
    return items


def _lines(body: bytes) -> list[Any]:
    """NDJSON: one parsed item (or the DecodeError of that line) per non-blank line; a
    body of more than `bounds.ITEMS_MAX` lines (blank ones too) is refused whole, before
    any is parsed."""
    if (lines := body.count(b"\n") + (not body.endswith(b"\n"))) > bounds.ITEMS_MAX:
        raise TooManyItems(f"{lines} lines in one body: at most {bounds.ITEMS_MAX} "
                           "(send smaller batches)")
    items: list[Any] = []
    for number, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(_raw.decode(line))
        except msgspec.DecodeError as e:
            items.append(DecodeError(f"line {number}: malformed JSON: {e}"))
        except RecursionError:
            items.append(DecodeError(f"line {number}: {_TOO_DEEP}"))
    return items
