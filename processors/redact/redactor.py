"""Where the strings of an event's fields sit, and the findings in them replaced.

A batch's strings are gathered into one `Strings` for a single detector pass (see
`engine.py`); then only the values with findings are visited again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

from meterline.processors.redact.detectors import Detector
from meterline.processors.redact.engine import DetectorSet, Span

# Keys whose values are ids made by the provider, not content, in the messages (elsewhere,
# in `params` and `attributes`, an `id` may be anything and is scanned): a run of digits
# in one could pass for a card number, and the masked id would no longer link a tool call
# to its result. A `role` or a `type` is scanned: a source may put anything there.
MESSAGE_KEYS = frozenset({"id", "tool_call_id"})

# An inline image or file: base64, not text. (`data:` alone is not enough: an upstream's
# error may be a server-sent event, `data: {"error": ...}`, and `data:text/plain,` is text.)
_BASE64_DATA_URI = re.compile(r"data:[\w.+-]+/[\w.+-]+(?:;[\w.+-]+=[^;,]*)*;base64,").match


class DropField(Exception):
    """A `drop` finding: abandon the field being scanned."""


class DropEvent(Exception):
    """A `drop_event` finding: abandon the event."""


class Strings:
    """The strings inside some values, in order, and where each sits: `containers[i]`
    holds `texts[i]` at `keys[i]` (None: the string is the value itself). Lists side by
    side rather than a tuple per string: a batch makes no garbage for the collector."""

    __slots__ = ("containers", "keys", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.containers: list[Any] = []
        self.keys: list[Any] = []

    def add(self, value: Any, skip: frozenset[str] | None = None,
            names: set[Any] | None = None) -> None:
        """Every string inside `value`, dicts and lists walked to any depth, but the
        values of the keys in `skip` and base64 data URIs; the keys of its dicts added to
        `names`, if given, on the same walk."""
        if isinstance(value, str):
            if not (value.startswith("data:") and _BASE64_DATA_URI(value)):
                self.texts.append(value)
                self.containers.append(None)
                self.keys.append(None)
        elif isinstance(value, (dict, list)):
            _inside(value, self.texts, self.containers, self.keys, skip or frozenset(), names)

    def unchanged(self, strings: range, found: dict[int, list[Span]]) -> bool:
        """Whether those of `strings` with findings are still where they were found."""
        for i in strings:
            container = self.containers[i]
            if i in found and container is not None:
                try:
                    if container[self.keys[i]] is not self.texts[i]:
                        return False
                except (KeyError, IndexError):  # a field or key an earlier one dropped
                    return False
        return True


def _inside(value: dict[Any, Any] | list[Any], texts: list[str], containers: list[Any],
            keys: list[Any], skip: frozenset[str], names: set[Any] | None) -> None:
    """An explicit stack rather than recursion: nesting of any depth is walked (decoders
    bound it; a deep one must not be left in clear, nor raise RecursionError)."""
    stack = [value]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            if names is not None:
                names.update(container)
            items: Any = container.items()
        else:
            items = enumerate(container)
        for key, v in items:
            if isinstance(v, str):
                if key not in skip and not (v.startswith("data:") and _BASE64_DATA_URI(v)):
                    texts.append(v)
                    containers.append(container)
                    keys.append(key)
            elif isinstance(v, (dict, list)) and key not in skip:
                stack.append(v)


class Redactor:
    """Finds and replaces in the strings of fields, tallying findings by detector.
    Identifiers (`identifier=True`) take `id_actions`: `mask` is `hash` there when
    `pseudonyms`, so that a masked identifier keeps telling its values apart."""

    def __init__(self, detectors: list[tuple[Detector, str]], hash_key: bytes,
                 pseudonyms: bool = True) -> None:
        self.detectors = DetectorSet([d for d, _ in detectors])
        self.actions = [a for _, a in detectors]
        self.id_actions = [("hash" if pseudonyms and a == "mask" else a) for a in self.actions]
        self.names = [d.name for d, _ in detectors]
        self.placeholders = [d.placeholder for d, _ in detectors]
        self.hash_key = hash_key

    def redact_value(self, value: Any, counts: dict[str, int],
                     skip: frozenset[str] | None = None, *, identifier: bool = False) -> Any:
        """`value` with its strings redacted (in place inside dicts and lists)."""
        strings = Strings()
        strings.add(value, skip)
        found = self.detectors.find_all(strings.texts)
        return self.replace_value(value, strings, range(len(strings.texts)), found, counts,
                                  identifier=identifier)

    def replace_value(self, value: Any, strings: Strings, indexes: range,
                      found: dict[int, list[Span]], counts: dict[str, int], *,
                      identifier: bool = False) -> Any:
        """`value` with the findings of its strings (those of `strings.texts[i]`, for i
        in `indexes`, are `found[i]`) replaced."""
        for i in indexes:
            findings = found.get(i)
            if findings:
                new = self.replace(strings.texts[i], findings, counts, identifier=identifier)
                container = strings.containers[i]
                if container is None:
                    return new
                container[strings.keys[i]] = new
        return value

    def replace(self, text: str, findings: list[Span], counts: dict[str, int], *,
                identifier: bool = False) -> str:
        """`text` with `findings` replaced."""
        actions = self.id_actions if identifier else self.actions
        parts = []
        last = 0
        for start, end, index in findings:
            action = self._count(index, actions, counts)
            if action == "drop":
                raise DropField
            parts.append(text[last:start])
            if action == "hash":
                parts.append(f"<{self.names[index].upper()}:{self._digest(text[start:end])[:16]}>")
            else:
                parts.append(self.placeholders[index])
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def pseudonym(self, text: str, findings: list[Span], counts: dict[str, int],
                  shape: Callable[[str], str]) -> str:
        """`text`, a correlation key with `findings` (counted), replaced whole by a keyed
        pseudonym of the whole, made into the id's form by `shape` from the hex digest:
        every event carrying that id gets the same one (a trace stays one trace, a
        retried event one event), and the OTLP exporter can still send it as an id, as
        it could not a token in place of the finding. The field cannot be dropped."""
        for _, _, index in findings:
            self._count(index, self.actions, counts)
        return shape(self._digest(text))

    def _count(self, index: int, actions: list[str], counts: dict[str, int]) -> str:
        """The action of detector `index`, its finding counted; `drop_event` raised."""
        name = self.names[index]
        counts[name] = counts.get(name, 0) + 1
        action = actions[index]
        if action == "drop_event":
            raise DropEvent
        return action

    def _digest(self, text: str) -> str:
        return hmac.new(self.hash_key, text.encode(), hashlib.sha256).hexdigest()
