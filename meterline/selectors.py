"""The three ways an Otoroshi projection names a place in a JSON document, compiled once.

A projection (`meterline/projection.py`) selects values of an event's JSON form with a
dotted path (`$at: metadata.team`), a JSON Pointer (`$pointer: /metadata/team`, RFC 6901)
or a JSONPath (`$path: $.input_messages[0].content`). Each is parsed when the config is
read, so a malformed one is a config error naming its key, and compiled to a getter that
costs a few dict lookups per event. Every getter answers `None` where nothing is.

JSONPath is the subset Otoroshi's blueprints use (Jayway's syntax): `$`, `.name`,
`['name']` (and `['a','b']`), `[n]` (negative from the end), `[*]` and `.*`,
`[start:end:step]`, `..name` and `..*` (recursive descent). A definite path (names and
indexes only) gives the value or `None`; any other gives the list of what it matched, as
Jayway does. Filter expressions (`[?(...)]`) and scripts are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

Getter = Callable[[Any], Any]


class SelectorError(ValueError):
    pass


def _step(doc: Any, key: str | int) -> Any:
    """`doc[key]` for an object's name or an array's index; None when there is none."""
    if isinstance(doc, dict):
        return doc.get(key) if isinstance(key, str) else None
    if isinstance(doc, list) and isinstance(key, int) and -len(doc) <= key < len(doc):
        return doc[key]
    return None


Key = tuple[str, int | None]  # a name, and the index it also is when it is a number


def _walk(keys: list[Key]) -> Getter:
    """A getter walking `keys`: a name into an object, its number into an array."""
    def get(doc: Any) -> Any:
        for name, index in keys:
            if isinstance(doc, dict):
                doc = doc.get(name)
            elif isinstance(doc, list) and index is not None and index < len(doc):
                doc = doc[index]
            else:
                return None
            if doc is None:
                return None
        return doc
    return get


def dotted(path: Any, where: str) -> Getter:
    """`a.b.0.c`: names walk objects, a number also indexes an array (`input_messages.0`)."""
    if not isinstance(path, str) or not path:
        raise SelectorError(f"{where}: expected a dotted path such as metadata.team, "
                            f"got {path!r}")
    return _walk([(part, int(part) if part.isascii() and part.isdigit() else None)
                  for part in path.split(".")])


def pointer(text: Any, where: str) -> Getter:
    """A JSON Pointer (RFC 6901): `""` is the whole document, `/a/b~1c/0` walks `a`, `b/c`
    and index 0; `-` (past the end) and an index with a leading zero select nothing."""
    if not isinstance(text, str) or (text and not text.startswith("/")):
        raise SelectorError(f"{where}: expected a JSON Pointer such as /metadata/team, "
                            f"got {text!r}")
    if not text:
        return lambda doc: doc
    keys: list[Key] = []
    for token in text[1:].split("/"):
        name = token.replace("~1", "/").replace("~0", "~")
        number = name.isdigit() and (name == "0" or name[0] != "0")
        keys.append((name, int(name) if number else None))
    return _walk(keys)


# --- JSONPath --------------------------------------------------------------------------

Nodes = Callable[[Any], Iterator[Any]]
_NAME = re.compile(r"[A-Za-z_$@\-][\w$@\-]*")
_QUOTED = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""
_NAMES = re.compile(rf"\s*(?:{_QUOTED})\s*(?:,\s*(?:{_QUOTED})\s*)*")
_INDEXES = re.compile(r"\s*-?\d+\s*(?:,\s*-?\d+\s*)*")
_SLICE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?")


def _children(doc: Any) -> Iterator[Any]:
    if isinstance(doc, dict):
        yield from doc.values()
    elif isinstance(doc, list):
        yield from doc


def _descendants(doc: Any) -> Iterator[Any]:
    """`doc` and everything inside it, depth first, parents before children."""
    yield doc
    for child in _children(doc):
        yield from _descendants(child)


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token.strip()[1:-1])


def _selector(inside: str, where: str) -> tuple[Nodes, bool]:
    """What a bracket selects of one node, and whether that is one definite value."""
    if inside.strip() == "*":
        return _children, False
    if _NAMES.fullmatch(inside):
        names = [_unquote(m.group()) for m in re.finditer(_QUOTED, inside)]
        return _pick(names), len(names) == 1
    if _INDEXES.fullmatch(inside):
        indexes = [int(i) for i in inside.split(",")]
        return _pick(indexes), len(indexes) == 1
    if m := _SLICE.fullmatch(inside):
        start, stop, step = (int(g) if g else None for g in m.groups())
        if step == 0:
            raise SelectorError(f"{where}: a slice's step cannot be 0")
        part = slice(start, stop, step)
        return (lambda doc: iter(doc[part] if isinstance(doc, list) else ())), False
    if inside.lstrip().startswith(("?", "(")):
        raise SelectorError(f"{where}: JSONPath filters and scripts ([?(...)], [(...)]) are "
                            "not supported; select with names, indexes, *, slices or ..")
    raise SelectorError(f"{where}: cannot read [{inside}] (expected 'name', n, *, or a:b)")


def _pick(keys: list[Any]) -> Nodes:
    def pick(doc: Any) -> Iterator[Any]:
        for key in keys:
            value = _step(doc, key)
            if value is not None:
                yield value
    return pick


def _parse(path: str, where: str) -> tuple[list[Nodes], bool]:
    """The steps of a JSONPath, each mapping one node to the nodes it selects."""
    steps: list[Nodes] = []
    definite = True
    i = 1
    select: Nodes
    while i < len(path):
        deep = path.startswith("..", i)
        if path[i] == ".":
            i += 2 if deep else 1
            if path.startswith("*", i):
                select, one, i = _children, False, i + 1
            elif path.startswith("[", i) and deep:
                select, one, i = _bracket(path, i, where)
            elif m := _NAME.match(path, i):
                select, one, i = _pick([m.group()]), True, m.end()
            else:
                raise SelectorError(f"{where}: expected a name after '.' at {i} in {path!r}")
        elif path[i] == "[":
            select, one, i = _bracket(path, i, where)
        else:
            raise SelectorError(f"{where}: unexpected {path[i]!r} at {i} in {path!r}")
        if deep:
            steps.append(_descendants)
        steps.append(select)
        definite = definite and one and not deep
    return steps, definite


def _bracket(path: str, i: int, where: str
             ) -> tuple[Nodes, bool, int]:
    end = _bracket_end(path, i, where)
    select, one = _selector(path[i + 1:end], where)
    return select, one, end + 1


def _bracket_end(path: str, i: int, where: str) -> int:
    """Where the bracket opened at `i` closes, quotes skipped."""
    quote = None
    j = i + 1
    while j < len(path):
        c = path[j]
        if quote:
            if c == "\\":
                j += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "]":
            return j
        j += 1
    raise SelectorError(f"{where}: unclosed [ at {i} in {path!r}")


def jsonpath(path: Any, where: str) -> Getter:
    """A JSONPath getter: the value (or None) for a definite path, else the list of
    matches (empty when nothing matched)."""
    if not isinstance(path, str) or not path.startswith("$"):
        raise SelectorError(f"{where}: expected a JSONPath starting with $, such as "
                            f"$.metadata.team, got {path!r}")
    steps, definite = _parse(path, where)

    def nodes(doc: Any) -> list[Any]:
        current = [doc]
        for step in steps:
            current = [out for node in current for out in step(node)]
        return current

    if definite:
        return lambda doc: next(iter(nodes(doc)), None)
    return nodes
