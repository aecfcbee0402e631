"""Exponential backoff, written once: the delivery loop's retries (with jitter, after its
`retry` block) and the waits of components that reconnect (the Kafka receiver); and the
wait a server asks for (`Retry-After`), which the delivery loop honours when longer."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Iterator


def exponential(initial: float, maximum: float, multiplier: float = 2.0,
                randomization_factor: float = 0.0) -> Iterator[float]:
    """Delays in seconds: `initial`, then each `multiplier` times the last, capped at
    `maximum` (the first is not capped); each spread at random by +-`randomization_factor`
    of itself (0: exactly these)."""
    interval = initial
    while True:
        if randomization_factor:
            spread = interval * randomization_factor
            yield random.uniform(interval - spread, interval + spread)
        else:
            yield interval
        interval = min(interval * multiplier, maximum)


def retry_after(header: str | None, now: float | None = None) -> float | None:
    """A server's `Retry-After` (RFC 9110: seconds, or an HTTP date) as seconds from now,
    for `RetryableError.retry_after`; None when absent or unreadable."""
    if not header:
        return None
    text = header.strip()
    if text.isascii() and text.isdigit():  # (`isdigit` is true of '²', which float refuses)
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
