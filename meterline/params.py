"""Query parameters of the admin API (its own paths and the components'): read one way, and
refused with a `ValueError` that names the parameter and what it takes, which the handler
answers as a 400. A message quotes what it refuses (`quoted`), cut short: a query string
may be 8 KB, which the answer need not send back."""

from __future__ import annotations


def whole_number(name: str, text: str, low: int, high: int) -> int:
    """`text` as a whole number from `low` to `high`. ASCII digits only, and no more of them
    than `high` has (leading zeros aside): `str.isdigit` is true of '²', which `int()`
    refuses, and `int()` refuses more than 4,300 digits; either was a 500, or a 400 whose
    message named no parameter."""
    digits = text.lstrip("0")
    if (not (text.isascii() and text.isdigit()) or len(digits) > len(str(high))
            or not low <= int(digits or 0) <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, "
                         f"got {quoted(text)}")
    return int(digits or 0)


def quoted(value: object, limit: int = 64) -> str:
    """`value` quoted for a message (its repr): at most its first `limit` characters, and
    its length if longer."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown):,} in all)"
