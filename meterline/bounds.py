"""Bounds on what an event may hold: the values an LLM call can really have.

`Event` itself stays unconstrained (the persistent queue decodes stored batches with
it: a bound there could make a stored batch unreadable). What enters the daemon is
checked against twins of `Event` derived from its fields (`msgspec.defstruct`), whose
types carry msgspec constraints: one `pack` of a batch and msgpack decodes into the
twins check it in C (about 2 µs for a 1.2 KB event, see `refused`); only when that
fails is each event checked alone, to give each bad one its reason. Events the
gateway builds from upstream answers are repaired instead (`repair`): a value out of
bounds is dropped, the call is still recorded.

The bounds (a numeric field without a rule here fails at import, so that a new field
gets one):

| fields | bound |
|---|---|
| `timestamp` (epoch ns) | 2000-01-01T00:00:00Z ... now + 1 day |
| `*_tokens` | integer, 0 ... 10^9 |
| `images`, `characters`, `search_queries` | integer, 0 ... 10^9 |
| `status_code` | 100 ... 599 |
| `ratelimit_*` | integer, 0 ... 10^12 |
| `attempts` | 1 ... 1000 |
| `*_bytes` | integer, 0 ... 2^40 |
| `*_ms` | finite, 0 ... 30 days |
| `*_seconds` (audio, video) | finite, 0 ... 30 days in seconds |
| `*_usd` | finite, 0 ... 1,000,000 |
| `sample_weight` | finite, > 0 ... 1,000,000 |
| `event_id` | 1 ... 256 characters |
| `trace_id`, `span_id`, `parent_span_id` | at most 128 characters |
| `endpoint`, `upstream` | at most 4096 characters |
| `error_message` | at most 65,536 characters; tab, newline and CR allowed |
| other strings (models, ids, names) | at most 1024 characters |
| `metadata` | at most 256 entries, keys 256 and values 4096 characters |
| `attributes`, `params`, `redactions` | at most 1024 / 256 / 256 entries, keys 256 characters |
| `finish_reasons`, `tags`, `policies` (lists of names) | at most 1024 |
| `guardrails` | at most 1024, each of names (`rule`, `stage`, `action`, `detector`) |

Strings, `finish_reasons`, `tags` and metadata keys and values hold no control character (C0,
DEL); `error_message` may hold tab, newline and CR. Message content (`input_messages`,
`output_messages`), attribute and parameter values (and their keys' characters) are
free, bounded by the receivers' body size limits, and nest at most 100 levels of
objects and lists (`NESTING_MAX`). The JSON decoders stop only at Python's recursion
limit (about 990 levels from where they run); an event nested nearly that deep would
be decoded in a worker and then fail wherever it is next encoded or decoded from a
deeper stack (the main process unpacking it, on the loop: a 500 for the whole request).

A body (a webhook request, an OTLP request, a Kafka message) holds at most 100,000
items (`ITEMS_MAX`; NDJSON: lines; OTLP: spans or log records), counted before any is
decoded: an item becomes an event of about a kilobyte in memory however few its bytes,
so 15 MB of `[{},{},...]` would otherwise be 5 million events, gigabytes, in the worker
decoding them and then in the daemon. A legitimate 16 MB body of 100,000 events has
160 bytes per event.
"""

from __future__ import annotations

import functools
import operator
import re
import time
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Final

import msgspec

from meterline.event import SCHEMA_VERSION, Event, pack, uuid7

TOKENS_MAX: Final = 10**9  # 100x the largest context windows; ClickHouse stores UInt32
RATELIMIT_MAX: Final = 10**12
STATUS_MIN, STATUS_MAX = 100, 599  # RFC 9110's range; 499 (client closed) is in it
ATTEMPTS_MAX: Final = 1000
BYTES_MAX: Final = 1 << 40  # a body of a terabyte: no call sends more
DURATION_MAX_MS: Final = 30 * 86_400_000.0  # batch jobs take hours, not a month
COST_MAX_USD: Final = 1_000_000.0
WEIGHT_MAX: Final = 1_000_000.0  # a sampling rate of one in a million
TIMESTAMP_MIN: Final = 946_684_800 * 10**9  # 2000-01-01T00:00:00Z, in ns
TIMESTAMP_AHEAD: Final = 86_400 * 10**9  # now + 1 day: clocks differ, not by days
UNITS_MAX: Final = 10**9  # images, characters, searches in one call
SECONDS_MAX: Final = DURATION_MAX_MS / 1000  # audio or video in one call
_COUNTS: Final = frozenset({"images", "characters", "search_queries"})
_REFRESH_S: Final = 3600.0  # the upper timestamp bound follows the clock hourly

NAME_CHARS: Final = 1024
ID_CHARS: Final = 256
TRACE_ID_CHARS: Final = 128
URL_CHARS: Final = 4096
ERROR_MESSAGE_CHARS: Final = 65_536
KEY_CHARS: Final = 256
METADATA_VALUE_CHARS: Final = 4096
METADATA_ENTRIES: Final = 256
ATTRIBUTE_ENTRIES: Final = 1024
PARAM_ENTRIES: Final = 256
LIST_ITEMS: Final = 1024

NO_CONTROL: Final = r"\A[^\x00-\x1f\x7f]*\Z"
TEXT: Final = r"\A[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*\Z"  # tab, newline, CR allowed
_PATTERN_WORDS: Final = {
    repr(NO_CONTROL): "without control characters (NUL, C0, DEL)",
    repr(TEXT): "without control characters other than tab, newline and CR"}
OUT_OF_RANGE: Final = "an integer is out of range (more than 64 bits)"
NESTING_MAX: Final = 100  # levels of objects and lists in free content
ITEMS_MAX: Final = 100_000  # items (events) in one body
CONTAINERS_MAX: Final = 1_000_000
"""JSON objects and arrays a body may hold to be parsed (`too_many_containers`): a body
the gateway reads on the loop serving every stream (a request, an upstream's answer, an
MCP message), a webhook body or Kafka message, a line of a file. Each becomes a Python
object of 60-200 bytes, however few its bytes: 30 MB of `{},` (10 million) took the
daemon from 300 MB to 1,080 and stopped its loop for 2 s. A million is 60-200 MB and a
tenth of a second at worst, and more than any prompt holds (a 2M-token context of JSON
has a few hundred thousand)."""
TOO_DEEP: Final = f"nested deeper than {NESTING_MAX} levels of objects and lists"
_NESTED_FIELDS: Final = ("input_messages", "output_messages", "params", "attributes")
_nested: Final = operator.attrgetter(*_NESTED_FIELDS)

_STRING_CHARS: Final = {"event_id": ID_CHARS, "trace_id": TRACE_ID_CHARS,
                        "span_id": TRACE_ID_CHARS, "parent_span_id": TRACE_ID_CHARS,
                        "endpoint": URL_CHARS, "upstream": URL_CHARS,
                        "error_message": ERROR_MESSAGE_CHARS}
_MAP_ENTRIES: Final = {"metadata": METADATA_ENTRIES, "attributes": ATTRIBUTE_ENTRIES,
                       "params": PARAM_ENTRIES, "redactions": PARAM_ENTRIES}
_HINTS: Final = {"timestamp": " (timestamp: epoch nanoseconds, 2000-01-01 to now + 1 day)"}


def too_many_containers(body: bytes) -> str | None:
    """Why a JSON body is not to be parsed when it holds more than `CONTAINERS_MAX` objects
    and arrays, counted from its `{` and `[` (in strings too: a bound from above, at the
    speed of a memory scan, before anything is parsed); None when it is within."""
    if body.count(b"{") + body.count(b"[") > CONTAINERS_MAX:
        return f"more than {CONTAINERS_MAX:,} JSON objects and arrays"
    return None


def _text(chars: int, pattern: str | None = NO_CONTROL, min_length: int = 0) -> Any:
    return Annotated[str, msgspec.Meta(min_length=min_length, max_length=chars,
                                       pattern=pattern)]


def _int_bounds(name: str, now_ns: int) -> msgspec.Meta:
    if name == "timestamp":
        return msgspec.Meta(ge=TIMESTAMP_MIN, le=now_ns + TIMESTAMP_AHEAD)
    if name.endswith("_tokens"):
        return msgspec.Meta(ge=0, le=TOKENS_MAX)
    if name in _COUNTS:
        return msgspec.Meta(ge=0, le=UNITS_MAX)
    if name.startswith("ratelimit_"):
        return msgspec.Meta(ge=0, le=RATELIMIT_MAX)
    if name == "status_code":
        return msgspec.Meta(ge=STATUS_MIN, le=STATUS_MAX)
    if name == "attempts":
        return msgspec.Meta(ge=1, le=ATTEMPTS_MAX)
    if name.endswith("_bytes"):
        return msgspec.Meta(ge=0, le=BYTES_MAX)
    raise TypeError(f"Event.{name}: an integer field needs a bound in meterline/bounds.py")


def _float_bounds(name: str) -> msgspec.Meta:
    if name.endswith("_ms"):
        return msgspec.Meta(ge=0, le=DURATION_MAX_MS)
    if name.endswith("_usd"):
        return msgspec.Meta(ge=0, le=COST_MAX_USD)
    if name.endswith("_seconds"):
        return msgspec.Meta(ge=0, le=SECONDS_MAX)
    if name == "sample_weight":
        return msgspec.Meta(gt=0, le=WEIGHT_MAX)
    raise TypeError(f"Event.{name}: a float field needs a bound in meterline/bounds.py")


def _checked_type(name: str, tp: Any, now_ns: int, patterns: bool) -> Any:
    """The constrained form of field `name`'s type (NaN and infinities fail any bound).
    Without `patterns`, the control-character patterns are left to `_named` (see
    `refused`), except `error_message`'s. Free content (messages, attribute and
    parameter values) is skipped (`Raw`)."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        checked = _checked_type(name, inner, now_ns, patterns)
        return checked if checked is msgspec.Raw else checked | None  # Raw takes nil too
    plain = NO_CONTROL if patterns else None
    origin = typing.get_origin(tp)
    if tp is int:
        return Annotated[int, _int_bounds(name, now_ns)]
    if tp is float:
        return Annotated[float, _float_bounds(name)]
    if tp is str:
        if name == "error_message":
            return _text(ERROR_MESSAGE_CHARS, TEXT)
        return _text(_STRING_CHARS.get(name, NAME_CHARS), plain, 1 if name == "event_id" else 0)
    if origin is dict:
        key: Any = _text(KEY_CHARS, None)
        value = args[1]
        if value is str:
            key, value = _text(KEY_CHARS, plain), _text(METADATA_VALUE_CHARS, plain)
        elif value is int:
            value = Annotated[int, msgspec.Meta(ge=0, le=TOKENS_MAX)]
        else:
            value = msgspec.Raw
        return Annotated[dict[key, value],  # type: ignore[valid-type]  # (built at run time)
                         msgspec.Meta(max_length=_MAP_ENTRIES.get(name, ATTRIBUTE_ENTRIES))]
    if origin is list and args[0] is str:
        return Annotated[list[_text(NAME_CHARS, plain)],  # type: ignore[misc]  # (run time)
                         msgspec.Meta(max_length=LIST_ITEMS)]
    if origin is list and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
        return Annotated[list[_checked_struct(args[0])],  # type: ignore[misc]  # (run time)
                         msgspec.Meta(max_length=LIST_ITEMS)]
    if origin is list:
        return msgspec.Raw  # messages: their content is free text
    return tp  # booleans


@functools.cache
def _checked_struct(struct: type[msgspec.Struct]) -> Any:
    """The twin of a struct of names (`Guardrail`): each string a name, always checked for
    control characters (such lists are short and rare)."""
    fields = []
    for f in msgspec.structs.fields(struct):
        text = _text(NAME_CHARS)
        tp = text if f.required else text | None  # (a required name may be a Literal)
        fields.append((f.name, tp) if f.required else (f.name, tp, f.default))
    return msgspec.defstruct(f"Checked{struct.__name__}", fields, kw_only=True,
                             forbid_unknown_fields=True)


def _named(name: str, tp: Any) -> bool:
    """Whether the control-character rule applies to field `name` of type `tp`: strings
    (but `error_message`), lists of strings, maps of strings to strings (metadata)."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)] \
        if isinstance(tp, types.UnionType) else [tp]
    return name != "error_message" and len(inner) == 1 and (
        inner[0] is str or all(a is str for a in typing.get_args(inner[0]) or [None]))


class _Checker:
    """The decoders of the checked twins of `Event`. Rebuilt hourly (the upper
    timestamp bound follows the clock)."""

    def __init__(self) -> None:
        self.built = -_REFRESH_S
        self.current()

    def current(self) -> _Checker:
        now = time.monotonic()
        if now - self.built >= _REFRESH_S:
            self._build(time.time_ns())
            self.built = now
        return self

    def _build(self, now_ns: int) -> None:
        hints = typing.get_type_hints(Event)
        names = [f.name for f in msgspec.structs.fields(Event)]

        def twin(kind: str, which: Callable[[str], bool], patterns: bool) -> Any:
            fields = [(n, _checked_type(n, hints[n], now_ns, patterns), None)
                      for n in names if which(n)]
            return msgspec.defstruct(  # messages are left out: not checked
                kind, [f for f in fields if f[1] is not msgspec.Raw], kw_only=True,
                gc=False, tag_field="schema_version", tag=SCHEMA_VERSION)

        def named(n: str) -> bool:
            return _named(n, hints[n])

        def other(n: str) -> bool:
            return not _named(n, hints[n])

        # Checking a batch: its numbers and maps in one decode, its names (strings the
        # control-character rule covers) in another, whose JSON form holds a backslash
        # or DEL when one of them holds a control character (see `refused`).
        # (types made at run time, which a type checker cannot follow)
        self.numbers = msgspec.msgpack.Decoder(list[twin("Numbers", other, False)])  # type: ignore[misc]
        self.names = msgspec.msgpack.Decoder(list[twin("Names", named, False)])  # type: ignore[misc]
        exact = twin("Checked", lambda n: True, True)
        self.exact = msgspec.msgpack.Decoder(list[exact])  # type: ignore[valid-type]
        self.one = msgspec.msgpack.Decoder(exact)


_checker = _Checker()
_encode = msgspec.msgpack.Encoder().encode
_json = msgspec.json.Encoder().encode


def refused(events: list[Event]) -> dict[int, str]:
    """The events that are out of bounds, by position, with the reason of each.

    When all is well: one encode of the batch, one decode checking bounds and lengths,
    and one decode of its names, whose JSON form is searched (memchr) for a backslash or
    DEL: only then are the control-character patterns run (a regex costs 0.3 µs a
    string). Event by event only when the batch fails."""
    checker = _checker.current()
    try:
        data = pack(events)
        checker.numbers.decode(data)
        named = _json(checker.names.decode(data))
        if b"\\" in named or b"\x7f" in named:
            checker.exact.decode(data)
    except (OverflowError, msgspec.ValidationError, RecursionError):
        pass
    else:
        if not deeper_than([v for values in map(_nested, events) for v in values],
                           NESTING_MAX):  # (the free content walked: under 1 µs an event)
            return {}
    bad = {}
    for index, event in enumerate(events):
        if (reason := why(event, checker)) is not None:
            bad[index] = reason
    return bad


def why(event: Event, checker: _Checker | None = None) -> str | None:
    """Why an event is out of bounds, or None when it is within them."""
    checker = checker or _checker.current()
    if deep := _too_deep(event):
        return deep
    try:
        checker.one.decode(_encode(event))
    except OverflowError:
        return OUT_OF_RANGE
    except msgspec.ValidationError as e:
        return explain(e)
    return None


def explain(error: msgspec.ValidationError) -> str:
    """msgspec's message, with the control-character patterns said in words."""
    text = str(error)
    for pattern, words in _PATTERN_WORDS.items():
        text = text.replace(f"matching regex {pattern}", words)
    field = _FIELD.search(text)
    return text + (_HINTS.get(field[1], "") if field else "")


_FIELD: Final = re.compile(r"\$\.(\w+)")
_DEFAULTS: Final = {"event_id": uuid7, "timestamp": time.time_ns, "sample_weight": lambda: 1.0}


def _too_deep(event: Event) -> str | None:
    """Why the event's free content nests too deeply (msgspec's way of saying where),
    or None."""
    for name, value in zip(_NESTED_FIELDS, _nested(event), strict=True):
        if deeper_than([value], NESTING_MAX):
            return f"{TOO_DEEP} - at `$.{name}`"
    return None


def deeper_than(values: Iterable[Any], limit: int) -> bool:
    """Whether objects and lists nest deeper than `limit` levels in any of `values`,
    walked a level at a time: no recursion, so a value of any depth is measured, and a
    batch's values walked together cost a fifth of a walk per value."""
    level = [v for v in values if type(v) is dict or type(v) is list]
    for _ in range(limit):
        if not level:
            return False
        deeper = []
        for item in level:  # (exact types, as decoders make them: twice as fast as isinstance)
            for child in (item.values() if type(item) is dict else item):
                if type(child) is dict or type(child) is list:
                    deeper.append(child)
        level = deeper
    return bool(level)


def repair(events: list[Event]) -> None:
    """Bring events that the daemon built itself (the gateway, from upstream answers)
    within bounds, in place: a value out of bounds is dropped (`event_id`, `timestamp`
    and `sample_weight` get their defaults), so that the call is still recorded."""
    for index in refused(events):
        event = events[index]
        for _ in range(len(Event.__struct_fields__)):
            reason = why(event)
            if reason is None:
                break
            field = _FIELD.search(reason)
            names = [field[1]] if field else _unencodable(event)
            for name in names:
                setattr(event, name, _DEFAULTS[name]() if name in _DEFAULTS else None)


def _unencodable(event: Event) -> list[str]:
    names = []
    for name in Event.__struct_fields__:
        try:
            _encode(getattr(event, name))
        except OverflowError:
            names.append(name)
    return names
