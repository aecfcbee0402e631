"""A place on an event that a processor's config names: a field (`team`), a
`metadata` key (`metadata.customer_id`) or an `attributes` key (`attributes.tier`).

Written in config as a string and checked when the config is read, so a typo is
an error with its line rather than a silent no-op.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from meterline.event import Event

_MAPS = ("metadata", "attributes")
_REQUIRED = frozenset({"event_id", "timestamp", "sample_weight"})
# Fields that hold a string: the ones a label can be written to.
STRING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(Event)
                          if f.type in (str, str | None))


class FieldPath:
    __slots__ = ("key", "kind", "text")

    def __init__(self, text: str) -> None:
        head, dot, key = text.partition(".")
        if dot and head in _MAPS:
            if not key:
                raise ValueError(f"'{text}': expected a key after '{head}.'")
            self.kind: Literal["field", "metadata", "attributes"] = (
                "metadata" if head == "metadata" else "attributes")
            self.key = key
        elif text in STRING_FIELDS or text in _MAPS or text in Event.__struct_fields__:
            self.kind, self.key = "field", text
        else:
            raise ValueError(f"'{text}' is not an event field, metadata.KEY or attributes.KEY")
        self.text = text

    @classmethod
    def from_config(cls, value: Any) -> FieldPath:
        if not isinstance(value, str):
            raise ValueError(f"expected a field name or metadata.KEY, got {value!r}")
        return cls(value)

    @property
    def deletable(self) -> bool:
        """Whether it may be emptied: not `event_id`, `timestamp` or `sample_weight`."""
        return self.kind != "field" or self.key not in _REQUIRED

    @property
    def holds_string(self) -> bool:
        """Whether any string can be written here (a metadata value, a string field)."""
        return self.kind != "field" or self.key in STRING_FIELDS

    def get(self, event: Event) -> Any:
        if self.kind == "field":
            return getattr(event, self.key)
        mapping = getattr(event, self.kind)
        return None if mapping is None else mapping.get(self.key)

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
        return f"FieldPath({self.text!r})"
