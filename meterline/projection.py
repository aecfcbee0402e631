"""Otoroshi's data-exporter projections: the shape of the document an exporter sends.

A projection is a JSON object, the blueprint, applied to each event's JSON form (the one
the file exporter writes: `msgspec.to_builtins`) after the exporter's `filtering`; the
result is a new object built key by key, in blueprint order. `../shared/FORMATS.md`
states the semantics, taken from Otoroshi's `Projection.project`:

- `"k": true` copies the top-level field `k` (`null` when absent); `"k": "name"` writes
  it under `name`;
- `"k": {"$value": V}`, `{"$at": "a.b"}`, `{"$atIf": ...}`, `{"$pointer": "/a/b"}`,
  `{"$pointerIf": ...}`, `{"$path": "$.a[0]"}`, `{"$pathIf": ...}`, `{"$header": ...}`,
  `{"$compose": T}` write what the operator selects under `k`;
- `"k": {...}` without an operator is a nested blueprint, applied to the value at `k`
  when the event has `k`, else to the whole event;
- a blueprint that is only `{"$compose": T}` makes the composed template the result, and
  `{}` keeps the event whole; any other entry (`false`, a number...) is ignored.

The blueprint is compiled once, when the config is read, into closures: a per-event
projection is one dict built from getters, with no parsing and no dispatch on the
blueprint. An unknown `$` operator or an operator with the wrong shape is a config error
naming its key path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from meterline.event import JSONL_PIECE, Event, to_jsonl
from meterline.event import jsonl_pieces as event_jsonl_pieces
from meterline.selectors import Getter, SelectorError, dotted, jsonpath, pointer

_encoder = msgspec.json.Encoder()


class ProjectionError(SelectorError):
    """A blueprint that cannot be compiled; the message names the key path."""


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not `1`, in nested values too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _field(key: str) -> Getter:
    """A top-level field of the document; None when absent, or when it is no object."""
    return lambda doc: doc.get(key) if isinstance(doc, dict) else None


def _arguments(arg: Any, keys: tuple[str, ...], where: str) -> list[Any]:
    """An operator's object argument with exactly `keys`, as a list in that order."""
    if not isinstance(arg, dict) or set(arg) != set(keys):
        raise ProjectionError(f"{where}: expected an object with {', '.join(keys)}, "
                              f"got {arg!r}")
    return [arg[k] for k in keys]


def _conditional(select: Callable[[Any, str], Getter], key: str
                 ) -> Callable[[Any, str], Getter]:
    """`$atIf`, `$pointerIf`, `$pathIf`: the value at `path` when the value at the
    predicate's `key` equals its `value`, else null."""
    def compile_(arg: Any, where: str) -> Getter:
        path, predicate = _arguments(arg, ("path", "predicate"), where)
        at, expected = _arguments(predicate, (key, "value"), f"{where}.predicate")
        value = select(path, f"{where}.path")
        test = select(at, f"{where}.predicate.{key}")
        return lambda doc: value(doc) if _json_equal(test(doc), expected) else None
    return compile_


def _header(arg: Any, where: str) -> Getter:
    """From an array of `{key, value}` objects at `path`, the value of the one whose key
    is `name`, compared case-insensitively."""
    path, name = _arguments(arg, ("path", "name"), where)
    if not isinstance(name, str):
        raise ProjectionError(f"{where}.name: expected a header name, got {name!r}")
    headers, wanted = dotted(path, f"{where}.path"), name.lower()

    def get(doc: Any) -> Any:
        found = headers(doc)
        for item in found if isinstance(found, list) else ():
            if isinstance(item, dict) and str(item.get("key", "")).lower() == wanted:
                return item.get("value")
        return None
    return get


_SELECTORS: dict[str, Callable[[Any, str], Getter]] = {
    "$at": dotted, "$pointer": pointer, "$path": jsonpath}
"""The operators that select a value: the ones a `$compose` template may hold."""

_OPERATORS: dict[str, Callable[[Any, str], Getter]] = {
    "$value": lambda arg, where: _fixed(arg),
    **_SELECTORS,
    "$atIf": _conditional(dotted, "at"),
    "$pointerIf": _conditional(pointer, "pointer"),
    "$pathIf": _conditional(jsonpath, "path"),
    "$header": _header,
    "$compose": lambda arg, where: _compose(arg, where),
}


def _operator(spec: dict[str, Any], where: str) -> Getter | None:
    """The getter of an operator object (`{"$at": ...}`); None for a plain object."""
    ops = [k for k in spec if isinstance(k, str) and k.startswith("$")]
    if not ops:
        return None
    if len(spec) != 1:
        raise ProjectionError(f"{where}: an operator object holds exactly one $ key, got "
                              f"{sorted(map(str, spec))}")
    op = ops[0]
    if op not in _OPERATORS:
        raise ProjectionError(f"{where}: unknown operator {op} (expected one of "
                              f"{', '.join(_OPERATORS)})")
    return _OPERATORS[op](spec[op], f"{where}.{op}")


def _compose(template: Any, where: str) -> Getter:
    """A template with every `$at` / `$pointer` / `$path` object replaced by what it
    selects; the rest (strings included) passes through. A part with no selector is a
    constant, built once."""
    if isinstance(template, dict):
        ops = [k for k in template if isinstance(k, str) and k.startswith("$")]
        if ops:
            if len(template) != 1 or ops[0] not in _SELECTORS:
                raise ProjectionError(f"{where}: inside $compose an operator object is one "
                                      f"of {', '.join(_SELECTORS)} alone, got "
                                      f"{sorted(map(str, template))}")
            return _SELECTORS[ops[0]](template[ops[0]], f"{where}.{ops[0]}")
        parts = {k: _compose(v, f"{where}.{k}") for k, v in template.items()}
        if all(getattr(g, "constant", False) for g in parts.values()):
            return _fixed(template)
        return lambda doc: {k: g(doc) for k, g in parts.items()}
    if isinstance(template, list):
        items = [_compose(v, f"{where}[{i}]") for i, v in enumerate(template)]
        if all(getattr(g, "constant", False) for g in items):
            return _fixed(template)
        return lambda doc: [g(doc) for g in items]
    return _fixed(template)


def _fixed(value: Any) -> Getter:
    def get(doc: Any) -> Any:
        return value
    get.constant = True  # type: ignore[attr-defined]
    return get


def compile_blueprint(blueprint: Any, where: str = "projection") -> Getter:
    """A blueprint compiled to the function that projects one document."""
    if not isinstance(blueprint, dict):
        raise ProjectionError(f"{where}: expected an object (a blueprint), got {blueprint!r}")
    if not blueprint:
        return lambda doc: doc
    if "$compose" in blueprint:
        if len(blueprint) != 1:
            raise ProjectionError(f"{where}: $compose makes the whole result, so it is the "
                                  "blueprint's only key (or write it under a key: "
                                  "k: {$compose: ...})")
        return _compose(blueprint["$compose"], f"{where}.$compose")
    entries: list[tuple[str, Getter]] = []
    for key, spec in blueprint.items():
        here = f"{where}.{key}"
        if not isinstance(key, str) or key.startswith("$"):
            raise ProjectionError(f"{here}: a blueprint's keys are field names; the only "
                                  "$ key of a blueprint is $compose, alone")
        if spec is True:
            entries.append((key, _field(key)))
        elif isinstance(spec, str):
            entries.append((spec, _field(key)))
        elif isinstance(spec, dict):
            entries.append((key, _operator(spec, here) or _nested(key, spec, here)))
        # any other entry (false, a number, null, an array) is ignored, as by Otoroshi
    return lambda doc: {name: get(doc) for name, get in entries}


def _nested(key: str, blueprint: dict[str, Any], where: str) -> Getter:
    """A nested blueprint: applied to the value at `key` when the document has it, else
    to the whole document."""
    project = compile_blueprint(blueprint, where)

    def get(doc: Any) -> Any:
        if isinstance(doc, dict) and key in doc:
            return project(doc[key])
        return project(doc)
    return get


class Projection:
    """An exporter's `projection` block, compiled; compares equal by its source (for
    reload)."""

    __slots__ = ("apply", "source", "whole")
    config_type = "projection blueprint"

    def __init__(self, source: Any) -> None:
        self.source = source
        self.apply = compile_blueprint(source)
        self.whole = source == {}  # `{}`: the event as it is, at no cost

    @classmethod
    def from_config(cls, value: Any) -> Projection:
        return cls(value)

    def documents(self, events: list[Event]) -> list[Any]:
        """The events' JSON forms, projected (the events themselves for `{}`: msgspec
        encodes them as their JSON form)."""
        if self.whole:
            return list(events)
        apply = self.apply
        return [apply(doc) for doc in msgspec.to_builtins(events)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Projection) and other.source == self.source

    def __hash__(self) -> int:
        return hash(repr(self.source))

    def __repr__(self) -> str:
        return f"Projection({self.source!r})"


def jsonl_pieces(events: list[Event], projection: Projection | None) -> list[bytes]:
    """`jsonl` in pieces of `JSONL_PIECE` events (see `event.jsonl_pieces`)."""
    if projection is None or projection.whole:
        return list(event_jsonl_pieces(events))
    return [_encoder.encode_lines(projection.documents(events[i:i + JSONL_PIECE]))
            for i in range(0, len(events), JSONL_PIECE)]


def jsonl(events: list[Event], projection: Projection | None) -> bytes:
    """Events as JSON lines, projected when there is a projection (else exactly
    `to_jsonl`, at its cost)."""
    if projection is None or projection.whole:
        return to_jsonl(events)
    return _encoder.encode_lines(projection.documents(events))


def documents(events: list[Event], projection: Projection | None) -> list[Any]:
    """What an exporter that sends JSON documents sends: the events themselves (msgspec
    encodes them as their JSON form) or their projections."""
    return list(events) if projection is None else projection.documents(events)
