"""Lenient readers for loosely typed foreign JSON (source payloads, provider bodies):
a wrong type reads as absent rather than failing the whole item."""

from __future__ import annotations

import math
from typing import Any

import msgspec

METADATA_VALUE_CHARS = 128
"""An event's metadata values are at most this long (DESIGN.md)."""


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_float(value: Any) -> float | None:
    """A number, or a string holding one; anything else (booleans too) is None. An integer
    beyond the floats' range is an infinity (which the event bounds refuse)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except OverflowError:  # float(10**400)
        return math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        return None


def as_int(value: Any) -> int | None:
    """An integer as it is (beyond 64 bits too: the event bounds refuse it with the
    reason), a float or a numeric string truncated; NaN and infinities, which no integer
    stands for, are None like any other value that is not a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = as_float(value)
    return None if number is None or not math.isfinite(number) else int(number)


def as_messages(value: Any) -> list[dict[str, Any]] | None:
    """`{role, content}` messages; a bare string is one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        return None
    messages = [m for m in value if isinstance(m, dict)]
    return messages or None


def as_metadata(value: Any) -> dict[str, str] | None:
    """A source's free labels as event metadata: string values, each cut to
    `METADATA_VALUE_CHARS`; a value of another JSON type is its JSON text (`1`, `true`,
    `{"a":1}`); null values are left out. None when there are none."""
    metadata = {str(k): metadata_text(v)[:METADATA_VALUE_CHARS]
                for k, v in as_dict(value).items() if v is not None}
    return metadata or None


def metadata_text(value: Any) -> str:
    """A label value as text: a string as it is, anything else as its JSON."""
    if isinstance(value, str):
        return value
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, ValueError, OverflowError):
        return str(value)
