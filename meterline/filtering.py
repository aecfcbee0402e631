"""Otoroshi's data-exporter filters: `include` / `exclude` lists of partial JSON matches.

Patterns are compiled once, at config load, into nested closures, so that matching
an event costs a few attribute lookups and comparisons. They apply to anything
made of mappings: the `Event` struct, its `metadata` / `attributes` maps, or raw
decoded JSON. Keys may be nested objects (`{"metadata": {"team": "a"}}`) or
dotted paths (`"metadata.team"`). `null` and absent fields are the same thing
(the event schema uses `null` for "not reported"); a missing field never matches,
except under `$ne`, `$nin`, `$nor`, `$not`.

Beyond Otoroshi: `$exists: true|false` on a field tests presence, and
`$contains` with a string argument on a string field tests for a substring.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from typing import Any

import msgspec
import re2

from meterline.bounds import deeper_than
from meterline.component import Config
from meterline.fieldpath import MISSING, FieldPath
from meterline.params import quoted

Matcher = Callable[[Any], bool]


def _re2_options(dot_matches_newline: bool) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a refused pattern is reported as a FilterError, once
    options.dot_nl = dot_matches_newline
    return options


_RE2_OPTIONS = _re2_options(False)  # `.` as in Python's `re`
_WILDCARD = _re2_options(True)  # `*` stands for anything, newlines included


class FilterError(ValueError):
    pass


def _is_object(value: Any) -> bool:
    return isinstance(value, dict | msgspec.Struct)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: `true` is not `1`."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


MAX_PATTERN_DEPTH = 32  # levels of objects and lists in one pattern (real ones use 2-6)


def compile_pattern(pattern: Any, where: str = "") -> Matcher:
    """Compile one include/exclude pattern (a JSON object) into a matcher."""
    if not isinstance(pattern, dict):
        raise FilterError(f"{where or 'pattern'}: expected an object, got {quoted(pattern)}")
    if deeper_than([pattern], MAX_PATTERN_DEPTH):
        # (compiling recurses, as matching does: a tap's filter may come from anyone with
        # the admin token, and a deep one would raise RecursionError rather than this)
        raise FilterError(f"{where or 'pattern'}: nested deeper than {MAX_PATTERN_DEPTH} "
                          "levels of objects and lists")
    return _compile(pattern, where)


def _compile(spec: Any, where: str) -> Matcher:
    """A matcher of one value against `spec`: scalar, array, nested pattern or operator."""
    if isinstance(spec, dict):
        dollar = [k for k in spec if k.startswith("$")]
        if dollar:
            if len(spec) != 1:
                hint = ""
                if len(dollar) < len(spec):  # field keys beside an operator
                    fields = {k: v for k, v in spec.items() if not k.startswith("$")}
                    parts = [json.dumps(fields), *(json.dumps({k: spec[k]}) for k in dollar)]
                    hint = (" (Otoroshi's syntax does not mix field keys with an operator in "
                            f"one object; write {{\"$and\": [{', '.join(parts)}]}})")
                raise FilterError(f"{where or 'pattern'}: an operator object holds exactly one "
                                  f"$ key, got {sorted(spec)}{hint}")
            op = dollar[0]
            return _operator(op, spec[op], f"{where}.{op}" if where else op)
        checks = [(FieldPath.json(key).lookup,
                   _compile(sub, f"{where}.{key}" if where else key)) for key, sub in spec.items()]

        if len(checks) == 1:  # the usual pattern, one field: no generator per event
            [(lookup, check)] = checks
            return lambda value: _is_object(value) and check(lookup(value))

        def nested(value: Any) -> bool:
            if not _is_object(value):
                return False
            return all(check(lookup(value)) for lookup, check in checks)

        return nested
    if spec is None:
        return lambda value: value is MISSING
    if isinstance(spec, list):
        return lambda value: isinstance(value, list) and len(value) == len(spec) and all(
            _same(a, b) for a, b in zip(value, spec, strict=True))
    return lambda value: value is not MISSING and _same(value, spec)


def _number(arg: Any, where: str) -> float:
    if not _is_number(arg):
        raise FilterError(f"{where}: expected a number, got {quoted(arg)}")
    return arg


def _bounds(arg: Any, where: str) -> tuple[float, float]:
    if not isinstance(arg, dict) or set(arg) != {"min", "max"}:
        raise FilterError(f"{where}: expected {{min: N, max: N}}, got {quoted(arg)}")
    return _number(arg["min"], f"{where}.min"), _number(arg["max"], f"{where}.max")


def _values(arg: Any, where: str) -> list[Any]:
    if not isinstance(arg, list):
        raise FilterError(f"{where}: expected a list, got {quoted(arg)}")
    return arg


def _regex(arg: Any, where: str) -> Any:
    """A `$regex` compiled by RE2, whose matching time is linear in the input: a filter (in
    `pipeline.yaml` or a `tap` anyone with the admin token opens) cannot stall the daemon
    with a pattern that backtracks, such as `(a+)+b`. Lookarounds and backreferences, which
    only a backtracking engine offers, are refused with RE2's reason."""
    if not isinstance(arg, str):
        raise FilterError(f"{where}: expected a string, got {quoted(arg)}")
    try:
        return re2.compile(arg, _RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        if len(reason) > 120:  # (it may quote the pattern again)
            reason = reason[:120] + "..."
        raise FilterError(f"{where}: invalid regular expression {quoted(arg)}: {reason} "
                          "(RE2 syntax: no lookarounds or backreferences)") from e


_REMEMBERED = 4096  # answers a pattern remembers, by value
_REMEMBERED_LENGTH = 256  # longer values are matched each time


def _full_match(rx: Any) -> Matcher:
    """Whether a string matches `rx` whole. The fields filters look at take few values
    (endpoints, models, routes), and a call into RE2 through its Python wrapper costs about
    a microsecond per event: so the answer for each short value is remembered (up to
    `_REMEMBERED` of them, then forgotten at once)."""
    known: dict[str, bool] = {}

    def match(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        found = known.get(v)
        if found is None:
            found = rx.fullmatch(v) is not None
            if len(v) <= _REMEMBERED_LENGTH:
                if len(known) >= _REMEMBERED:
                    known.clear()
                known[v] = found
        return found
    return match


def _operator(op: str, arg: Any, where: str) -> Matcher:
    if op == "$eq":
        return _compile(arg, where) if not isinstance(arg, dict) else (
            lambda v: _is_object(v) and msgspec.to_builtins(v) == arg)
    if op == "$ne":
        eq = _operator("$eq", arg, where)
        return lambda v: not eq(v)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        n = _number(arg, where)
        cmp = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}[op]
        return lambda v: _is_number(v) and cmp(v, n)
    if op == "$between":
        lo, hi = _bounds(arg, where)
        return lambda v: _is_number(v) and lo < v < hi
    if op == "$betweene":
        lo, hi = _bounds(arg, where)
        return lambda v: _is_number(v) and lo <= v <= hi
    if op == "$regex":
        return _full_match(_regex(arg, where))
    if op == "$wildcard":
        if not isinstance(arg, str):
            raise FilterError(f"{where}: expected a string, got {quoted(arg)}")
        return _full_match(
            re2.compile(".*".join(re.escape(part) for part in arg.split("*")), _WILDCARD))
    if op == "$in":
        options = _values(arg, where)
        return lambda v: v is not MISSING and any(_same(v, o) for o in options)
    if op == "$nin":
        options = _values(arg, where)
        return lambda v: v is MISSING or not any(_same(v, o) for o in options)
    if op == "$contains":
        if isinstance(arg, dict):
            if set(arg) != {"key", "value"}:
                raise FilterError(f"{where}: expected a value or {{key, value}}, got {quoted(arg)}")
            key, expected = arg["key"], arg["value"]
            if not isinstance(key, str):
                raise FilterError(f"{where}.key: expected a key name, got {quoted(key)}")
            lookup = FieldPath.json(key).lookup
            return lambda v: _is_object(v) and _same(lookup(v), expected)
        if isinstance(arg, str):
            return lambda v: (isinstance(v, str) and arg in v) or (
                isinstance(v, list) and any(_same(x, arg) for x in v))
        return lambda v: isinstance(v, list) and any(_same(x, arg) for x in v)
    if op == "$all":
        wanted = _values(arg, where)
        return lambda v: isinstance(v, list) and all(any(_same(x, w) for x in v) for w in wanted)
    if op == "$size":
        if not isinstance(arg, int) or isinstance(arg, bool) or arg < 0:
            raise FilterError(f"{where}: expected a non-negative integer, got {quoted(arg)}")
        return lambda v: isinstance(v, list) and len(v) == arg
    if op == "$exists":
        if isinstance(arg, bool):
            return lambda v: (v is not MISSING) == arg
        if not isinstance(arg, str):
            raise FilterError(f"{where}: expected a key name (or true/false), got {quoted(arg)}")
        present = FieldPath.json(arg).lookup
        return lambda v: _is_object(v) and present(v) is not MISSING
    if op in ("$and", "$or", "$nor"):
        subs = [_compile(s, f"{where}[{i}]") for i, s in enumerate(_values(arg, where))]
        if op == "$and":
            return lambda v: all(s(v) for s in subs)
        if op == "$or":
            return lambda v: any(s(v) for s in subs)
        return lambda v: not any(s(v) for s in subs)
    if op == "$not":
        if not (isinstance(arg, dict) and len(arg) == 1 and next(iter(arg)).startswith("$")):
            raise FilterError(f"{where}: expected an operator object such as {{$regex: ...}}, "
                              f"got {quoted(arg)}")
        inner = _compile(arg, where)
        return lambda v: not inner(v)
    raise FilterError(f"{where}: unknown operator {op} (expected one of {', '.join(OPERATORS)})")


OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$between", "$betweene", "$regex",
             "$wildcard", "$in", "$nin", "$contains", "$all", "$size", "$exists", "$and", "$or",
             "$nor", "$not")


class Pattern:
    """One compiled include/exclude pattern; compares equal by its source (for reload)."""

    __slots__ = ("matches", "source")

    def __init__(self, source: Any) -> None:
        self.source = source
        self.matches = compile_pattern(source)

    @classmethod
    def from_config(cls, value: Any) -> Pattern:
        return cls(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.source == self.source

    def __hash__(self) -> int:
        return hash(repr(self.source))

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"


class Filter(Config):
    """`{include: [...], exclude: [...]}`: kept when (no include or one include
    matches) and no exclude matches."""

    include: list[Pattern] = msgspec.field(default_factory=list)  # kept if one matches
    exclude: list[Pattern] = msgspec.field(default_factory=list)  # dropped if one matches

    @property
    def empty(self) -> bool:
        return not self.include and not self.exclude

    def keeps(self, obj: Any) -> bool:
        if self.include and not any(p.matches(obj) for p in self.include):
            return False
        return not any(p.matches(obj) for p in self.exclude)

    def apply(self, items: list[Any]) -> list[Any]:
        if self.empty:
            return items
        keeps = self.keeps
        return [item for item in items if keeps(item)]
