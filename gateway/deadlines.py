"""One periodic check for every timeout of the gateway.

A timer per request (armed, re-armed when the response head comes, cancelled at
the end) costs more than much of what the gateway does for a request. The
timeouts are seconds long, so one timer ticking every 100 ms checks everything
instead: each watched object keeps its own deadlines (a clock read when it
moves on, no timer) and `check(now)` acts on those that passed. A timeout
therefore fires up to one tick late.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

TICK = 0.1  # seconds


class Watched(Protocol):
    def check(self, now: float) -> None: ...


class Deadlines:
    def __init__(self) -> None:
        self.watched: set[Watched] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for item in list(self.watched):
            item.check(now)
        self._handle = loop.call_later(TICK, self._tick)
