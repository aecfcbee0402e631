"""Reading `pipeline.yaml` so that every value remembers where it was written.

PyYAML's composed node tree carries a mark (line, column) for each node; we build
plain Python data from it and keep a side table from key path to line, so that a
config error can name the file, the line and the key. `${env:NAME}` and
`${env:NAME:-default}` are substituted in scalars here, before validation, as the
OpenTelemetry Collector does; `$$` writes a literal `$`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

_MAX_VALUES = 100_000  # a config has hundreds; aliases must not expand to billions
# PyYAML's scanner checks every open `[` and `{` at each token: flows nested n deep cost
# n^2 (5,000 took a second, and a loaded machine 4). A config nests a few.
_MAX_FLOW_DEPTH = 100
_FLOW = re.compile(r"[\[\]{}]")
_ENV = re.compile(r"\$\$|\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_REFERENCE = _ENV
"""`${env:NAME}` (group 1: NAME, group 2: the default) or `$$` (no group): for readers of the
file that must know which values come from the environment (the audit log masks them)."""


class SourceError(Exception):
    """A problem found while reading the file itself (syntax, missing variable)."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file, self.line, self.message = file, line, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")


@dataclass
class Source:
    """Parsed data plus the line of every key and list item in it."""

    file: str
    data: dict[str, Any]
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def load_file(file: str, environ: Mapping[str, str] | None = None) -> Source:
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SourceError(file, None, f"cannot read the file: {e.strerror}") from e
    return load_text(text, file, environ)


def load_text(text: str, file: str = "<string>",
              environ: Mapping[str, str] | None = None) -> Source:
    env = os.environ if environ is None else environ
    if _flow_depth(text) > _MAX_FLOW_DEPTH:
        raise SourceError(file, None, f"invalid YAML: nested too deeply (more than "
                                      f"{_MAX_FLOW_DEPTH} levels of [ and {{)")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise SourceError(file, line, f"invalid YAML: {e.problem}") from e
    except yaml.YAMLError as e:  # a ReaderError: a character YAML does not allow (NUL...)
        raise SourceError(file, None, f"invalid YAML: {e}") from e
    except RecursionError:
        raise SourceError(file, None, "invalid YAML: nested too deeply") from None
    source = Source(file, {})
    if node is None:
        return source
    try:
        data = _Builder(file, env, source.lines).build(node, ())
    except RecursionError:
        raise SourceError(file, None, "nested too deeply") from None
    if not isinstance(data, dict):
        raise SourceError(file, node.start_mark.line + 1, "expected a mapping at the top level")
    source.data = data
    return source


def _flow_depth(text: str) -> int:
    """How deep `[` and `{` nest (brackets in strings and comments counted too: a bound,
    not a parse), counted only when there are enough of them to matter."""
    if text.count("[") + text.count("{") <= _MAX_FLOW_DEPTH:
        return 0
    depth = deepest = 0
    for bracket in _FLOW.findall(text):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


class _Builder:
    def __init__(self, file: str, env: Mapping[str, str], lines: dict[Path_, int]) -> None:
        self.file, self.env, self.lines = file, env, lines
        self.constructor = yaml.SafeLoader("")
        self.built = 0  # values built, aliases expanded ("billion laughs" are refused)
        self.open: set[int] = set()  # the nodes being built: an alias of one is a loop

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.built += 1
        if self.built > _MAX_VALUES:
            raise SourceError(self.file, node.start_mark.line + 1,
                              f"more than {_MAX_VALUES} values once aliases are expanded")
        if id(node) in self.open:
            raise SourceError(self.file, node.start_mark.line + 1,
                              "an alias refers to a node that contains it")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        self.open.add(id(node))
        try:
            return self._collection(node, path)
        finally:
            self.open.discard(id(node))

    def _collection(self, node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, path)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise SourceError(self.file, line, f"keys must be strings, got {key!r}")
                if key in out:
                    raise SourceError(self.file, line, f"duplicate key '{key}'")
                self.lines[(*path, key)] = line
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = item.start_mark.line + 1
                items.append(self.build(item, (*path, i)))
            return items
        raise SourceError(self.file, node.start_mark.line + 1, f"unexpected YAML node {node.id}")

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if "$" not in node.value:
            return self._construct(node, node)
        text = _ENV.sub(lambda m: self._substitute(m, node), node.value)
        if node.style is not None:  # quoted: stays a string
            return text
        resolved = yaml.ScalarNode(
            self.constructor.resolve(yaml.ScalarNode, text, (True, False)), text
        )
        return self._construct(resolved, node)

    def _construct(self, node: yaml.ScalarNode, where: yaml.ScalarNode) -> Any:
        """The scalar's value; a tag that does not fit it (`!!int abc`, `2001-13-45` read as a
        date, `!!binary` that is not base64, `<<` merge keys, unknown tags) is a SourceError."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            message = e.problem or str(e)
        except (ValueError, TypeError, OverflowError) as e:
            message = str(e)
        raise SourceError(self.file, where.start_mark.line + 1,
                          f"invalid value {where.value[:80]!r} ({where.tag}): {message}")

    def _substitute(self, match: re.Match[str], node: yaml.ScalarNode) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in self.env:
            return self.env[name]
        if default is not None:
            return default
        raise SourceError(
            self.file,
            node.start_mark.line + 1,
            f"environment variable {name} is not set (write ${{env:{name}:-default}} "
            "to give a default)",
        )
