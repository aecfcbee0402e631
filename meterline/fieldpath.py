"""A field path: how config names a place on an event, parsed once and compiled to getters.

One grammar, used by every component that names a field: an event field (`team`), a key
of one of its maps (`metadata.customer_id`, `attributes.tier`, `params.temperature`).
A path is checked when the config is read, so a typo is an error with its line rather
than a silent no-op, and compiled there to functions that run per event:

- `get(event)`: the value, `None` when absent (labels, redact, Kafka keys and topics);
- `getter(default)`: the same with another default (Prometheus' `metadata_<key>` labels);
- `set(event, value)`, `delete(event)`: writing it (labels' actions, redact);
- `lookup(obj)`: the value on an event *or on decoded JSON* (dicts), `MISSING` when
  absent or `null`, a dotted key walking nested values (filters).

`FieldPath` takes what processors may write (fields, `metadata.KEY`, `attributes.KEY`);
`ReadPath` adds `params.KEY`, which is only read (Kafka keys and topic templates). Filters,
which also run over foreign JSON, use `FieldPath.json(key)`: any key, not checked against
the event schema, read with `lookup` only.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, ClassVar

import msgspec

from meterline.event import FIELDS, Event


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # what `lookup` gives for an absent (or null) value

_REQUIRED = frozenset({"event_id", "timestamp", "sample_weight"})
# Fields that hold a string: the ones a label can be written to.
STRING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(Event)
                          if f.type in (str, str | None))
_EMPTY: dict[str, Any] = {}

Getter = Callable[[Any], Any]
# A getter of a map's key, written per map: `e.metadata` costs less than a call to
# `attrgetter("metadata")`, and this runs per event (Prometheus labels, Kafka keys).
_MAP_GETTERS: dict[str, Callable[[str, Any], Getter]] = {
    "metadata": lambda key, default: lambda e: (e.metadata or _EMPTY).get(key, default),
    "attributes": lambda key, default: lambda e: (e.attributes or _EMPTY).get(key, default),
    "params": lambda key, default: lambda e: (e.params or _EMPTY).get(key, default),
}


def _lookup(key: str) -> Getter:
    """`obj[key]` for dicts and structs, `MISSING` for absent or null; a dotted key is first
    tried whole (a JSON object may hold `"a.b"`), then walks nested values."""
    if not isinstance(key, str):  # YAML may write other keys; only a dict holds them
        return lambda obj: MISSING if not isinstance(obj, dict) or (
            value := obj.get(key)) is None else value
    head, dot, rest = key.partition(".")
    if not dot:
        def get(obj: Any) -> Any:
            if isinstance(obj, dict):
                value = obj.get(key, MISSING)
            elif isinstance(obj, msgspec.Struct):
                value = getattr(obj, key, MISSING)
            else:
                return MISSING
            return MISSING if value is None else value
        return get
    first, then = _lookup(head), _lookup(rest)

    def walk(obj: Any) -> Any:
        if isinstance(obj, dict):
            value = obj.get(key, MISSING)
        elif isinstance(obj, msgspec.Struct):
            value = MISSING  # no struct field has a dot in its name
        else:
            return MISSING
        if value is MISSING:
            return then(first(obj))
        return MISSING if value is None else value
    return walk


class FieldPath:
    """A parsed path (see the module's doc); compares equal by its text."""

    __slots__ = ("get", "key", "kind", "lookup", "text")
    maps: ClassVar[tuple[str, ...]] = ("metadata", "attributes")  # whose keys may be named
    expected: ClassVar[str] = "a field name or metadata.KEY"  # what config must write
    config_type: ClassVar[str] = "field path"

    def __init__(self, text: str) -> None:
        head, dot, key = text.partition(".")
        if dot and head in self.maps:
            if not key:
                raise ValueError(f"'{text}': expected a key after '{head}.'")
            self.kind, self.key = head, key
        elif text in FIELDS:
            self.kind, self.key = "field", text
        else:
            forms = [f"{m}.KEY" for m in self.maps]
            raise ValueError(f"'{text}' is not an event field, "
                             f"{', '.join(forms[:-1])} or {forms[-1]}")
        self.text = text
        self.get: Getter = self.getter(None)
        self.lookup: Getter = _lookup(text)

    @classmethod
    def json(cls, key: str) -> FieldPath:
        """A key of a filter: any (dotted) key of an event or of decoded JSON, unchecked;
        only its `lookup` is meant to be used."""
        path = cls.__new__(cls)
        path.kind, path.key, path.text = "json", key, key
        path.lookup = _lookup(key)
        path.get = lambda obj: None if (v := path.lookup(obj)) is MISSING else v
        return path

    @classmethod
    def from_config(cls, value: Any) -> FieldPath:
        if not isinstance(value, str):
            raise ValueError(f"expected {cls.expected}, got {value!r}")
        return cls(value)

    def getter(self, default: Any) -> Getter:
        """A function giving the value on an event, `default` when absent."""
        name, key = self.kind, self.key
        if name == "field":
            if default is None:
                return attrgetter(key)
            return lambda e: default if (v := getattr(e, key)) is None else v
        return _MAP_GETTERS[name](key, default)

    @property
    def deletable(self) -> bool:
        """Whether it may be emptied: not `event_id`, `timestamp` or `sample_weight`."""
        return self.kind != "field" or self.key not in _REQUIRED

    @property
    def holds_string(self) -> bool:
        """Whether any string can be written here (a metadata value, a string field)."""
        return self.kind != "field" or self.key in STRING_FIELDS

    def set(self, event: Event, value: Any) -> None:
        if self.kind == "field":
            setattr(event, self.key, value)
            return
        if self.kind == "metadata" and value is not None and not isinstance(value, str):
            value = str(value)
        mapping = getattr(event, self.kind)
        if mapping is None:
            setattr(event, self.kind, {self.key: value})
        else:
            mapping[self.key] = value

    def delete(self, event: Event) -> None:
        if self.kind == "field":
            setattr(event, self.key, None)
            return
        mapping = getattr(event, self.kind)
        if mapping is not None:
            mapping.pop(self.key, None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FieldPath) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"


class ReadPath(FieldPath):
    """A path only read (Kafka keys and topic templates): `params.KEY` too."""

    __slots__ = ()
    maps = ("metadata", "attributes", "params")
    expected = "an event field name"
