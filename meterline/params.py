"""Query parameters of the admin API (its own paths and the components'): read one way, and
refused with a `ValueError` that names the parameter and what it takes, which the handler
answers as a 400."""

from __future__ import annotations


def whole_number(name: str, text: str, low: int, high: int) -> int:
    """`text` as a whole number from `low` to `high`. ASCII digits only, and no more of them
    than `high` has (leading zeros aside): `str.isdigit` is true of '²', which `int()`
    refuses, and `int()` refuses more than 4,300 digits; either was a 500, or a 400 whose
    message named no parameter."""
    digits = text.lstrip("0")
    if (not (text.isascii() and text.isdigit()) or len(digits) > len(str(high))
            or not low <= int(digits or 0) <= high):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {text!r}")
    return int(digits or 0)
