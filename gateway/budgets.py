"""Budget enforcement in the gateway: the hard budgets that are spent, as the proxy checks
them on every request before forwarding it.

The gateway does not compute spend: whatever does (the `finops` extension, every
`budget_refresh`) `publish`es the blocks of the spent budgets to the `BudgetBlocks` of a
gateway receiver (`blocks_of(telemetry, receiver id)`), and the proxy only looks the
request up. A block is a set of terms (`user_id`, `api_key_id`, `provider`, `model`,
`metadata.KEY`: what the gateway knows of a request before forwarding it) that must all
match; blocks are indexed by one of their terms, so a request costs a dictionary look-up
per term it has, whatever the number of budgets or members.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from meterline.event import Event
from meterline.telemetry import Telemetry

Term = tuple[str, str]  # (user_id | api_key_id | provider | model | metadata.KEY, value)
BUDGET_EXCEEDED = "budget_exceeded"  # the error type and code of a refused call


@dataclass(frozen=True)
class Block:
    """A spent hard budget: requests matching every term are refused."""

    budget: str
    terms: frozenset[Term]  # empty: every request
    message: str  # the error message the client gets
    # when the block lifts (epoch seconds): a calendar window's end, or when a rolling
    # window's spend falls back under the limit if nothing more is spent
    until: float

    def seconds_left(self, now: float) -> int:
        """`Retry-After`: until the block lifts."""
        return max(1, round(self.until - now))


def terms_of(event: Event) -> set[Term]:
    """What the gateway knows of a request, as terms."""
    fields = {"user_id": event.user_id, "api_key_id": event.api_key_id,
              "provider": event.provider, "model": event.request_model}
    terms = {(name, value) for name, value in fields.items() if value}
    return terms | {(f"metadata.{k}", v) for k, v in (event.metadata or {}).items()}


class BudgetBlocks:
    """The blocks one gateway enforces, replaced whole by each `publish`."""

    def __init__(self) -> None:
        self._index: dict[Term | None, list[Block]] = {}

    def publish(self, blocks: Iterable[Block]) -> None:
        index: dict[Term | None, list[Block]] = {}
        for block in blocks:
            index.setdefault(min(block.terms, default=None), []).append(block)
        self._index = index  # one assignment: a request sees the old set or the new one

    def check(self, event: Event, now: float | None = None) -> Block | None:
        """The block a request falls in, if any (called on the request path: no I/O)."""
        index = self._index
        if not index:
            return None
        now = time.time() if now is None else now
        terms = terms_of(event)
        for key in (None, *terms):
            for block in index.get(key, ()):
                if block.terms <= terms and now < block.until:
                    return block
        return None


_boards: weakref.WeakKeyDictionary[Telemetry, dict[str, BudgetBlocks]] = \
    weakref.WeakKeyDictionary()


def blocks_of(telemetry: Telemetry, receiver: str) -> BudgetBlocks:
    """The blocks of the gateway receiver `receiver` of the daemon whose telemetry this is:
    the same object for the receiver and for what publishes to it, across reloads of
    either."""
    return _boards.setdefault(telemetry, {}).setdefault(receiver, BudgetBlocks())
