"""Exponential backoff, written once: the delivery loop's retries (with jitter, after its
`retry` block) and the waits of components that reconnect (the Kafka receiver)."""

from __future__ import annotations

import random
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
