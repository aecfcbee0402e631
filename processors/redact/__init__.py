"""Processor `redact`: PII and secrets out of every string of the event before it
leaves the daemon ("never in clear, in any field").

The detectors (see `detectors.py`) scan, by default, every field of `Event` that holds
strings (read from its definition, so a field added later is covered). Each scanned
field is of one of three kinds:

- free text (`TEXT_FIELDS`: the messages, `error_message`, `finish_reasons`, `params`,
  `attributes`, every string inside them, nested in dicts and lists at any depth):
  a finding takes its detector's action;
- an identifier or label (every other string field but the correlation keys below:
  `user_id`, `session_id`, `api_key_id`, `api_key_name`, `team`, `organization`,
  `metadata` values, the model, route and upstream names...): what FinOps groups by.
  There `mask` becomes `hash` (`identifiers: hash`, the default), so an e-mail
  `user_id` becomes a stable pseudonym (`<EMAIL:3f9a0c1d2b4e5f67>`) and users stay
  apart, rather than all merging into one `<EMAIL>`;
- a correlation key (`CORRELATION_KEYS`: `event_id`, `trace_id`, `span_id`,
  `parent_span_id`): it must stay equal across events (a trace's events, a retried
  event), but sources put any string there (an Otoroshi `@id`, a webhook's
  `trace_id`). A finding replaces the whole value by a keyed pseudonym of the whole,
  shaped as the id is (32 or 16 hex digits, a UUID), so every event carrying that id
  gets the same one, sampling by trace stays whole and the OTLP exporter still sends
  it as an id. Findings of runs of digits (`detectors.DIGIT_RUNS`: cards, phones...)
  do not count there: in an id, such digits are the id's own. `mask`, `hash` and
  `drop` all give the pseudonym (the field cannot go); `drop_event` drops the event. An
  id without findings is left as it is.

The actions:

- `mask`: replaced by a typed placeholder, `<EMAIL>`;
- `hash`: replaced by `<EMAIL:3f9a0c1d2b4e5f67>`, a keyed HMAC-SHA256 of the value,
  so the same value gives the same token across events (and daemons sharing
  `hash_key`) while the value itself cannot be read back;
- `drop`: the whole field that held it is removed from the event (a `metadata` key,
  not the whole of `metadata`);
- `drop_event`: the event is not kept;
- `off`: the detector does not run.

`fields`, a list, narrows the scan to the messages and the paths listed (the messages
are always scanned; a correlation key, as any other field, only if listed); `exclude`
leaves whole fields out of the default, a correlation key too.

`redactions` on the event counts findings by detector. What was found is never
logged; the self-telemetry counts findings by detector and dropped events.
Strings that are base64 data URIs (`data:image/png;base64,...`) inside the messages,
`params` and `attributes` are not scanned.

A batch is scanned at once: the strings of all its events go through one pass of
all the detectors (`engine.py`), and only the events with findings are visited again
(`redactor.py`). The short string fields of an event (correlation keys, identifiers,
`error_message`, `metadata` values, `finish_reasons`) go into that pass as one text
per event, joined by a separator no detector matches across, so that covering them
costs one join per event rather than a text per field.
"""

from __future__ import annotations

import os
import re
import secrets
from bisect import bisect_right
from collections.abc import Callable, Container
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from meterline.fieldpath import FieldPath
from meterline.processors.redact.detectors import BUILTIN, DIGIT_RUNS, NAMES, Detector
from meterline.processors.redact.engine import SEPARATOR, Span
from meterline.processors.redact.named import FIELDS as NAMED_FIELDS
from meterline.processors.redact.named import NamedSecrets
from meterline.processors.redact.redactor import (
    MESSAGE_KEYS,
    DropEvent,
    DropField,
    Redactor,
    Strings,
)

Action = Literal["mask", "hash", "drop", "drop_event", "off"]
ACTIONS: tuple[Action, ...] = ("mask", "hash", "drop", "drop_event", "off")

# --- which fields, and of which kind --------------------------------------------------


def _holds_strings(tp: Any) -> bool:
    """Whether a value of type `tp` can hold a string (a dict's keys do not count here:
    they are scanned apart, see `RedactProcessor._names`)."""
    if tp is str or tp is Any:
        return True
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):  # a guardrail entry
        return any(_holds_strings(f.type) for f in msgspec.structs.fields(tp))
    args = get_args(tp)
    if get_origin(tp) is dict:
        return _holds_strings(args[1])
    return any(_holds_strings(a) for a in args)


def _shape(tp: Any) -> str:
    """`str`, `list` (of strings), `map` (of strings) or `nested` (Any inside)."""
    args = [a for a in get_args(tp) if a is not type(None)] or [tp]
    if args == [str]:
        return "str"
    inner = args[0]
    origin = get_origin(inner)
    if origin is list and get_args(inner) == (str,):
        return "list"
    if origin is dict and get_args(inner) == (str, str):
        return "map"
    return "nested"


_TYPES: Final = {f.name: f.type for f in msgspec.structs.fields(Event)}
STRING_FIELDS: Final = tuple(name for name, tp in _TYPES.items() if _holds_strings(tp))
"""Every field of `Event` that can hold a string, in the order of its definition."""


def _uuid(digest: str) -> str:
    """A UUID, as event ids are made (`uuid7`), of version 8: RFC 9562's for ids made
    otherwise than by its own algorithms (here, a keyed hash)."""
    h = f"{digest[:12]}8{digest[13:16]}{'89ab'[int(digest[16], 16) & 3]}{digest[17:32]}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


CORRELATION_KEYS: Final[dict[str, Callable[[str], str]]] = {
    "event_id": _uuid,  # the deduplication key of every exporter and of the client's retries
    "trace_id": lambda digest: digest[:32],  # the OpenTelemetry trace; sampled by it
    "span_id": lambda digest: digest[:16],  # the OpenTelemetry span of the call
    "parent_span_id": lambda digest: digest[:16],  # the span of the caller: a span_id too
}
"""Fields that must stay equal across events and to what other systems hold (the
client, the trace backend): one with a finding is replaced whole by a pseudonym of the
whole value, shaped by this function of its HMAC's hex digest as such ids are (32 and
16 lowercase hex digits, which the OTLP exporter turns into bytes; a UUID)."""

TEXT_FIELDS: Final = frozenset({"input_messages", "output_messages", "error_message",
                                "finish_reasons", "params", "attributes"})
"""Free text: findings take their detector's action. Every other string field is an
identifier or a label, where `mask` becomes a pseudonym (see `identifiers`)."""

_MESSAGES: Final = ("input_messages", "output_messages")

KEYED_FIELDS: Final = ("metadata", "attributes", "params", *_MESSAGES)
"""Fields whose dicts' keys are the client's too (a metadata key, an attribute name): a
key with a finding is renamed (its pseudonym), or its entry dropped."""
STRUCT_FIELDS: Final = ("guardrails",)
"""Fields holding structs (`Guardrail`), whose strings the walk of dicts and lists does
not see: scanned with the keys, as identifiers (a rule's name is a label)."""


def _check_action(action: str, where: str) -> None:
    """Literal types would say only "Invalid enum value": name the choices."""
    if action not in ACTIONS:
        raise ValueError(f"{where}: unknown action '{action}' (expected {', '.join(ACTIONS)})")


class CustomDetector(Config):
    name: str  # lower_snake_case, counted by this name
    pattern: str  # a Python regular expression
    action: str = "mask"  # what a match becomes: mask, hash, drop... (as built-ins)

    def __post_init__(self) -> None:
        _check_action(self.action, f"custom detector {self.name}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"detector name '{self.name}' must be lower_snake_case")
        if self.name in NAMES:
            raise ValueError(f"'{self.name}' is a built-in detector; choose another name")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid regular expression {self.pattern!r}: {e}") from e


class RedactConfig(Config):
    # action per built-in detector; YAML reads a bare `off` as false, so false is off too
    detectors: dict[str, str | bool] = msgspec.field(default_factory=dict)
    default_action: str = "mask"  # for built-in detectors not listed in `detectors`
    custom: list[CustomDetector] = msgspec.field(default_factory=list)  # your own regexes
    # `all`: every string field, ids included; a list: the messages and those paths
    fields: list[FieldPath] | str = "all"
    exclude: list[FieldPath] = msgspec.field(default_factory=list)  # whole fields, from `all`
    identifiers: str = "hash"  # what `mask` does in identifiers and labels: hash or mask
    hash_key: str | None = None  # HMAC key of `hash`; default: one kept in the data dir

    def __post_init__(self) -> None:
        _check_action(self.default_action, "default_action")
        self.detectors = {name: ("off" if action is False else self.default_action
                                 if action is True else action)
                          for name, action in self.detectors.items()}
        for name, action in self.detectors.items():
            _check_action(str(action), f"detector {name}")
        unknown = set(self.detectors) - set(NAMES)
        if unknown:
            raise ValueError(f"unknown detector {', '.join(sorted(unknown))} "
                             f"(built-in: {', '.join(NAMES)})")
        names = [c.name for c in self.custom]
        if len(set(names)) != len(names):
            raise ValueError("custom detector names must be unique")
        if self.hash_key is not None and len(self.hash_key) < 16:
            raise ValueError("hash_key must be at least 16 characters")
        if isinstance(self.fields, str) and self.fields != "all":
            raise ValueError(f"fields: expected `all` or a list of paths, got {self.fields!r}")
        if self.identifiers not in ("hash", "mask"):
            raise ValueError(f"identifiers: expected hash or mask, got {self.identifiers!r}")
        for path in self.exclude:
            if path.kind != "field":
                raise ValueError(f"exclude: '{path.text}': whole fields only "
                                 "(list the paths to scan in `fields` instead)")
        if self.exclude and not isinstance(self.fields, str):
            raise ValueError("exclude narrows `fields: all`; with a list of fields, "
                             "leave the field out of the list")

    def active(self) -> list[tuple[Detector, str]]:
        """The detectors that run, most specific first: custom ones, then built-ins."""
        chosen: list[tuple[Detector, str]] = [
            (Detector(c.name, (re.compile(c.pattern),)), c.action) for c in self.custom]
        chosen += [(d, str(self.detectors.get(d.name, self.default_action))) for d in BUILTIN]
        return [(d, a) for d, a in chosen if a != "off"]

    def paths(self) -> list[FieldPath]:
        """The paths scanned, without repeats nor paths inside another listed whole."""
        if isinstance(self.fields, str):
            skipped = {p.key for p in self.exclude}
            return [FieldPath(n) for n in STRING_FIELDS if n not in skipped]
        listed = [*map(FieldPath, _MESSAGES), *self.fields]
        wholes = {p.key for p in listed if p.kind == "field"}
        paths: list[FieldPath] = []
        for p in listed:
            if p not in paths and not (p.kind != "field" and p.kind in wholes):
                paths.append(p)
        return paths


class _Path:
    """A path scanned string by string (`Strings`): the messages, `params`, `attributes`,
    `metadata.KEY`, `attributes.KEY`."""

    __slots__ = ("get", "path", "skip", "text")

    def __init__(self, path: FieldPath) -> None:
        self.path = path
        self.get = attrgetter(path.key) if path.kind == "field" else path.get
        self.skip = MESSAGE_KEYS if path.kind == "field" and path.key in _MESSAGES else None
        self.text = path.kind == "attributes" or path.key in TEXT_FIELDS


class RedactProcessor(Processor):
    """A batch at a time (see the module's docstring)."""

    def __init__(self, config: RedactConfig, context: Context) -> None:
        active = config.active()
        paths = config.paths()
        # short string fields, scanned as one text per event: scalars, then lists and maps
        flat = [p.key for p in paths if p.kind == "field" and p.key in _TYPES
                and _shape(_TYPES[p.key]) != "nested"]
        self._scalars = tuple(n for n in flat if _shape(_TYPES[n]) == "str")
        self._containers = tuple((n, _shape(_TYPES[n]) == "map") for n in flat
                                 if _shape(_TYPES[n]) != "str")
        self._get_scalars = attrgetter(*self._scalars) if len(self._scalars) > 1 else (
            (lambda e, get=attrgetter(self._scalars[0]): (get(e),)) if self._scalars
            else (lambda e: ()))
        self._paths = [_Path(p) for p in paths if not (p.kind == "field" and p.key in flat)
                       and (p.kind != "field" or (_holds_strings(_TYPES.get(p.key, Any))
                                                  and p.key not in STRUCT_FIELDS))]
        whole = {p.key for p in paths if p.kind == "field"}
        self._keyed: tuple[str, ...] = tuple(n for n in KEYED_FIELDS if n in whole)
        self._structs: tuple[str, ...] = tuple(n for n in STRUCT_FIELDS if n in whole)
        self._metadata_keyed = "metadata" in self._keyed  # (a flat map: not walked)
        identity = config.identifiers == "hash" and (
            any(n not in TEXT_FIELDS for n in flat) or any(not p.text for p in self._paths)
            or bool(self._keyed or self._structs))
        needs_key = (bool(active) and any(n in CORRELATION_KEYS for n in flat)) or any(
            action == "hash" or (identity and action == "mask") for _, action in active)
        key = (config.hash_key.encode() if config.hash_key is not None
               else _stored_key(context) if needs_key else b"")
        self.redactor = Redactor(active, key, pseudonyms=config.identifiers == "hash")
        self._named = (NamedSecrets([n for n in NAMED_FIELDS if n in whole],
                                    self.redactor.names.index("secret"), TEXT_FIELDS)
                       if "secret" in self.redactor.names else None)
        # (a run of digits in a correlation key is the id's: see `detectors.DIGIT_RUNS`)
        self._id_digits = frozenset(i for i, name in enumerate(self.redactor.names)
                                    if name in DIGIT_RUNS)
        self.fields = [p.path for p in self._paths]  # the paths scanned string by string
        self.flat_fields = flat  # the fields scanned as one text per event
        self.id = context.id
        meter = context.meter
        self._redactions = meter.create_counter(
            "meterline_redact_redactions", description="PII and secrets found, by detector")
        self._dropped = meter.create_counter(
            "meterline_redact_dropped_events",
            description="Events dropped by a drop_event detector")

    def process(self, events: list[Event]) -> list[Event]:
        if not self.redactor.names:
            return events
        if self._named is not None:
            events = self._named_secrets(events, self._named)
        events, bad = self._values(events)
        return self._names(events, bad) if bad else events

    def _named_secrets(self, events: list[Event], named: NamedSecrets) -> list[Event]:
        """The values of `params`, `attributes` and `metadata` under keys that name
        secrets replaced (see `named.py`), when the batch has such a key."""
        rules = named.rules(events)
        if not rules:
            return events
        replace = self.redactor.replace
        return self._redacting(events, None,
                               lambda _, e, counts: named.redact(e, rules, replace, counts))

    def _name_texts(self, events: list[Event], walked: set[Any]) -> list[str]:
        """The distinct dict keys of the scanned fields (`walked`: those the walk of their
        strings met; `metadata`'s, a flat map, here) and the guardrail strings: they go
        into the one detector pass with the values. Gathered on the walk, not on one of
        their own: a second walk of every event's messages cost a fifth of the processor."""
        if self._metadata_keyed:
            for value in map(attrgetter("metadata"), events):
                if value:
                    walked.update(value)
        for name in self._structs:
            for entries in map(attrgetter(name), events):
                for entry in entries or ():
                    walked.update(_struct_strings(entry))
        return [t for t in walked if isinstance(t, str)]

    def _names(self, events: list[Event], bad: dict[str, list[Span]]) -> list[Event]:
        """The events holding a key or guardrail string in `bad` (those with findings)
        visited again: keys renamed (their pseudonym) or their entries dropped, guardrail
        strings replaced as identifiers."""
        keyed = self._keyed
        structs = self._structs
        replace = self.redactor.replace

        def redact(_: int, e: Event, counts: dict[str, int]) -> None:
            for name in keyed:
                value = getattr(e, name)
                if value:
                    _rename_keys(value, bad, replace, counts)
            for name in structs:
                entries = getattr(e, name)
                if entries:
                    setattr(e, name, _redact_structs(entries, bad, replace, counts) or None)

        return self._redacting(events, None, redact)

    def _redacting(self, events: list[Event], only: Container[int] | None,
                   redact: Callable[[int, Event, dict[str, int]], None]) -> list[Event]:
        """`redact(i, e, counts)` on each event (each whose index is in `only`, if given),
        its findings tallied on the event (`redactions`) and in the self-metrics; an event
        it raises `DropEvent` for is left out, its findings still counted."""
        totals: dict[str, int] = {}
        kept: list[Event] = []
        dropped = 0
        for i, e in enumerate(events):
            if only is not None and i not in only:
                kept.append(e)
                continue
            counts: dict[str, int] = {}
            try:
                redact(i, e, counts)
            except DropEvent:
                dropped += 1
                _add(totals, counts)
                continue
            if counts:
                if e.redactions:
                    _add(e.redactions, counts)
                else:
                    e.redactions = counts
                _add(totals, counts)
            kept.append(e)
        for name, c in totals.items():
            self._redactions.add(c, {"processor": self.id, "detector": name})
        if dropped:
            self._dropped.add(dropped, {"processor": self.id})
        return kept

    def _values(self, events: list[Event]) -> tuple[list[Event], dict[str, list[Span]]]:
        """The strings of the scanned fields (see the module's docstring), scanned with
        the names of `_name_texts`; the findings of those are given back, by string, for
        `_names`."""
        # by path, then event: its value and where its strings begin in `strings`
        n = len(events)
        values: list[Any] = []
        starts: list[int] = []
        strings = Strings()
        texts = strings.texts
        walked: set[Any] = set()  # the keys of the dicts of keyed fields
        for scanned in self._paths:
            column = list(map(scanned.get, events))
            if not any(column):  # `params`, `attributes`: mostly absent, skipped in C
                values += column
                starts += [len(texts)] * n
                continue
            skip = scanned.skip
            keys = walked if scanned.path.kind == "field" and scanned.path.key in self._keyed \
                else None
            for value in column:
                values.append(value)
                starts.append(len(texts))
                if value is not None:
                    strings.add(value, skip, keys)
        starts.append(len(texts))
        names = self._name_texts(events, walked) if self._keyed or self._structs else []
        count = len(texts)
        if self.flat_fields:
            texts = texts + self._flat_texts(events)
        base = len(texts)
        found = self.redactor.detectors.find_all(texts + names if names else texts)
        bad = {names[t - base]: found.pop(t) for t in [t for t in found if t >= base]}
        if self._named is not None and walked:
            self._named.nested(strings, count, walked, values, events, found)
        if not found:
            return events, bad
        # by event with findings: where (path k of event i is k * n + i) they are
        hit: dict[int, set[int]] = {}
        for t in found:
            if t < count:
                at = bisect_right(starts, t) - 1
                hit.setdefault(at % n, set()).add(at)
            else:
                hit.setdefault(t - count, set())

        def redact(i: int, e: Event, counts: dict[str, int]) -> None:
            flat_found = found.get(count + i)
            if flat_found:
                self._redact_flat(e, flat_found, counts)
            where = hit[i]
            if where:
                self._redact_paths(e, sorted(where), n, values, starts, strings, found,
                                   counts)

        kept = self._redacting(events, hit, redact)
        return kept, bad

    def _flat_texts(self, events: list[Event]) -> list[str]:
        """By event, its short string fields joined: the non-empty scalars, then each
        list's items and each map's values, a group per field, groups joined in turn
        (`_slots` lists the parts in that order). Joins and maps run in C: no Python
        loop over the fields, nor a text per field for the engine."""
        try:
            columns = [list(map(SEPARATOR.join,
                                map(filter, repeat(None), map(self._get_scalars, events))))]
            for name, is_map in self._containers:
                column = map(attrgetter(name), events)
                columns.append([SEPARATOR.join(v.values()) if v else "" for v in column]
                               if is_map else [SEPARATOR.join(v) if v else "" for v in column])
        except TypeError:  # a processor before set a non-string: it holds no text
            return [SEPARATOR.join([p if isinstance(p, str) else "" for _, _, p in
                                    self._slots(e)]) for e in events]
        if len(columns) == 1:
            return columns[0]
        return list(map(SEPARATOR.join, zip(*columns, strict=True)))

    def _slots(self, e: Event) -> list[tuple[str, Any, Any]]:
        """(field, key or None, value) of each part of the event's text in
        `_flat_texts`, in order; a group with no part is one empty part."""
        empty = ("", None, "")
        slots: list[tuple[str, Any, Any]] = [
            (name, None, value) for name, value in zip(
                self._scalars, self._get_scalars(e), strict=True) if value] or [empty]
        for name, is_map in self._containers:
            value = getattr(e, name)
            slots += ([(name, k, v) for k, v in (value.items() if is_map else enumerate(value))]
                      if value else [empty])
        return slots

    def _redact_flat(self, e: Event, found: list[Span], counts: dict[str, int]) -> None:
        """Findings of the event's joined short fields (`found`, sorted) replaced in each
        field they fall in."""
        redactor = self.redactor
        offset = 0
        k = 0
        for name, key, value in self._slots(e):
            text = value if isinstance(value, str) else ""
            end = offset + len(text)
            mine: list[Span] = []
            while k < len(found) and found[k][0] < end:
                start, stop, detector = found[k]
                if stop > end:  # reaches into the next field (a private key's body): cut
                    mine.append((max(start - offset, 0), len(text), detector))
                    found[k] = (end + len(SEPARATOR), stop, detector)
                    break
                mine.append((max(start - offset, 0), stop - offset, detector))
                k += 1
            offset = end + len(SEPARATOR)
            if not mine:
                continue
            shape = CORRELATION_KEYS.get(name)
            if shape and not (mine := [f for f in mine if f[2] not in self._id_digits]):
                continue
            try:
                new = (redactor.pseudonym(text, mine, counts, shape) if shape else
                       redactor.replace(text, mine, counts, identifier=name not in TEXT_FIELDS))
            except DropField:
                if key is None or not isinstance(getattr(e, name), dict):
                    setattr(e, name, None)
                else:
                    getattr(e, name).pop(key, None)
                continue
            if key is None:
                setattr(e, name, new)
            else:
                container = getattr(e, name)
                if container is not None:
                    container[key] = new
            if k == len(found):
                break

    def _redact_paths(self, e: Event, where: list[int], n: int, values: list[Any],
                      starts: list[int], strings: Strings, found: dict[int, list[Span]],
                      counts: dict[str, int]) -> None:
        """The paths of `e` with findings (`where`: `k * n + i` for path k of event i, in
        order). Paths are disjoint (`RedactConfig.paths`), so none changes another's
        strings; one whose value is not what was scanned is scanned again."""
        redactor = self.redactor
        for at in where:
            scanned = self._paths[at // n]
            value = values[at]
            indexes = range(starts[at], starts[at + 1])
            current = scanned.get(e)
            if current is None:
                continue
            identifier = not scanned.text
            try:
                if current is value and strings.unchanged(indexes, found):
                    new = redactor.replace_value(value, strings, indexes, found, counts,
                                                 identifier=identifier)
                else:
                    new = redactor.redact_value(current, counts, scanned.skip,
                                                identifier=identifier)
            except DropField:
                scanned.path.delete(e)
                continue
            if new is not current:
                scanned.path.set(e, new)


def _add(tally: dict[str, int], counts: dict[str, int]) -> None:
    for name, c in counts.items():
        tally[name] = tally.get(name, 0) + c


def _rename_keys(value: Any, bad: dict[str, list[Span]], replace: Any,
                 counts: dict[str, int]) -> None:
    """Every dict inside `value` with a key in `bad` rebuilt in place, in its order, with
    that key replaced as an identifier would be (its pseudonym), or its entry dropped."""
    stack = [value]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            stack += [v for v in container.values() if isinstance(v, (dict, list))]
            if not any(isinstance(k, str) and k in bad for k in container):
                continue
            items = list(container.items())
            container.clear()
            for k, v in items:
                if isinstance(k, str) and k in bad:
                    try:
                        k = replace(k, bad[k], counts, identifier=True)
                    except DropField:
                        continue
                container[k] = v
        elif isinstance(container, list):
            stack += [v for v in container if isinstance(v, (dict, list))]


def _struct_strings(entry: Any) -> list[str]:
    if not isinstance(entry, msgspec.Struct):
        return []
    return [v for v in msgspec.structs.astuple(entry) if isinstance(v, str)]


def _redact_structs(entries: list[Any], bad: dict[str, list[Span]], replace: Any,
                    counts: dict[str, int]) -> list[Any]:
    """The entries with their strings in `bad` replaced as identifiers; a `drop` finding
    empties an optional field, or drops the entry whose required field held it."""
    kept = []
    for entry in entries:
        if not isinstance(entry, msgspec.Struct):
            kept.append(entry)
            continue
        try:
            for f in msgspec.structs.fields(entry):
                v = getattr(entry, f.name)
                if isinstance(v, str) and v in bad:
                    try:
                        setattr(entry, f.name, replace(v, bad[v], counts, identifier=True))
                    except DropField:
                        if f.required:
                            raise
                        setattr(entry, f.name, f.default)
        except DropField:
            continue
        kept.append(entry)
    return kept


def _stored_key(context: Context) -> bytes:
    """The HMAC key kept under the data directory, created on first use, so that hashes
    and pseudonyms stay the same across restarts without a key in pipeline.yaml. Two
    processes creating it at once (workers) agree: the first link wins, the other reads
    it."""
    path = Path(f"{context.state_path('redact')}.key")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return key


factory = Factory(kind="processor", type="redact", config=RedactConfig, create=RedactProcessor)
