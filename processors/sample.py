"""Processor `sample`: less volume, exact totals.

Whether an event is sampled depends only on its trace id (else its event id), so
every instance of meterline, and every pipeline, keeps the same events: a trace
is kept whole or not at all. A W3C trace id is read as OpenTelemetry's
`TraceIdRatioBased` sampler reads it (its low 64 bits against the rate), so
meterline keeps the traces an upstream OpenTelemetry sampler at the same rate
kept; other ids are hashed. Rates nest: what a rate of 0.1 keeps, 0.5 keeps too.

The rate is that of the first rule whose pattern (Otoroshi filter syntax) matches
the event, else `rate`. Errors and events slower than `keep_slower_than` are
always kept, with weight 1.

- mode `event`: unsampled events are dropped; a kept event's `sample_weight` is
  multiplied by 1/p, so sums of weights (and of weighted tokens and costs)
  estimate the totals without bias.
- mode `content`: every event is kept, with its weight unchanged; unsampled ones
  lose `input_messages` and `output_messages`, so counts, tokens and costs stay
  exact while storage shrinks.

With `max_per_second`, the rate is further scaled each second to what last
second's traffic allows (weights follow), and events beyond the limit within a
second are not kept (in `content` mode: lose their content). In `event` mode the
weight those cut events would have carried is not lost: it is owed, and the next
kept events carry it (each second's kept events take on the debt in proportion to
their weight, spread over about one second of traffic), so that weighted totals stay
exact over time even in a burst that the scaled rate did not foresee, the first
second included. This part is per instance: it depends on the traffic each one sees.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Literal

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from meterline.filtering import Pattern
from meterline.genai import failure
from meterline.units import Duration

_SCALE = float(1 << 64)


class Rule(Config):
    match: Pattern  # an Otoroshi filter pattern on the event
    rate: float  # fraction kept (0 to 1) of the events it matches

    def __post_init__(self) -> None:
        _check_rate(self.rate, "rule rate")


def _check_rate(rate: float, what: str) -> None:
    if not 0 <= rate <= 1:
        raise ValueError(f"{what} is a probability between 0 and 1, got {rate}")


class SampleConfig(Config):
    mode: Literal["event", "content"] = "event"  # content: keep every event, drop messages
    rate: float = 1.0  # fraction kept (0 to 1) when no rule matches
    rules: list[Rule] = msgspec.field(default_factory=list)  # first match wins
    keep_errors: bool = True  # failed calls are always kept, with weight 1
    keep_slower_than: Duration | None = None  # calls slower than this are always kept
    max_per_second: float | None = None  # cap on kept events per second (whole daemon)

    def __post_init__(self) -> None:
        _check_rate(self.rate, "rate")
        if self.max_per_second is not None and self.max_per_second <= 0:
            raise ValueError("max_per_second must be positive")


def position(e: Event) -> float:
    """Where the event falls in [0, 1): the same for the same trace everywhere."""
    trace_id = e.trace_id
    if trace_id is not None and len(trace_id) == 32:
        try:
            return int(trace_id[16:], 16) / _SCALE
        except ValueError:
            pass
    key = trace_id or e.event_id
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()) / _SCALE


class RateLimit:
    """Scales the sampling probability to keep at most `limit` events a second."""

    def __init__(self, limit: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.clock = clock
        self.window = -1
        self.factor = 1.0  # this second's scale of the probability
        self.arrived = 0  # events offered this second
        self.kept = 0  # events kept this second
        self.owed = 0.0  # weight of events cut by the limit, not yet carried by kept ones
        self.surcharge = 0.0  # extra weight a kept event takes on, per unit of its weight

    def tick(self) -> None:
        window = int(self.clock())
        if window != self.window:
            seen = float(self.arrived)
            if self.window >= 0:
                # last second's arrivals, if they came again, would be kept at the limit
                seen = self.arrived / max(window - self.window, 1)
                self.factor = min(1.0, self.limit / seen) if seen else 1.0
            # a second's kept events weigh about as much as its arrivals: spread the debt
            # over about one second of them
            self.surcharge = self.owed / seen if seen else 0.0
            self.window, self.arrived, self.kept = window, 0, 0

    def weigh(self, weight: float) -> float:
        """A kept event's weight once it carries its share of what the limit cut."""
        if not self.owed or not self.surcharge:
            return weight
        extra = min(self.owed, weight * self.surcharge)
        self.owed -= extra
        return weight + extra


class SampleProcessor(Processor):
    def __init__(self, config: SampleConfig, context: Context,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = config.mode
        self.rate = config.rate
        self.rules = [(rule.match.matches, rule.rate) for rule in config.rules]
        self.keep_errors = config.keep_errors
        slow = config.keep_slower_than
        self.slow_ms = float(slow) * 1000 if slow is not None else None
        self.limit = (RateLimit(config.max_per_second / context.replicas, clock)
                      if config.max_per_second is not None else None)
        self.id = context.id
        meter = context.meter
        self._sampled_out = meter.create_counter(
            "meterline_sample_sampled_out_events",
            description="Events not sampled: dropped (mode event) or stripped of their "
                        "content (mode content)")
        self._limited = meter.create_counter(
            "meterline_sample_rate_limited_events",
            description="Events over max_per_second, of those counted as sampled out")

    def process(self, events: list[Event]) -> list[Event]:
        limit = self.limit
        if limit is not None:
            limit.tick()
        elif self.rate >= 1 and not self.rules:
            return events
        content_mode = self.mode == "content"
        kept: list[Event] = []
        out = limited = 0
        for e in events:
            if self._always_kept(e):
                kept.append(e)
                continue
            p = self._rate(e)
            if limit is not None:
                limit.arrived += 1
                p *= limit.factor
            sampled = p > 0 and (p >= 1 or position(e) < p)
            if sampled and limit is not None:
                if limit.kept >= limit.limit:
                    sampled = False
                    limited += 1
                    if not content_mode:
                        limit.owed += e.sample_weight / p
                else:
                    limit.kept += 1
            if sampled:
                if not content_mode:
                    weight = e.sample_weight / p if p < 1 else e.sample_weight
                    e.sample_weight = limit.weigh(weight) if limit is not None else weight
                kept.append(e)
                continue
            out += 1
            if content_mode:
                e.input_messages = None
                e.output_messages = None
                kept.append(e)
        if out:
            self._sampled_out.add(out, {"processor": self.id, "mode": self.mode})
        if limited:
            self._limited.add(limited, {"processor": self.id})
        return kept

    def _always_kept(self, e: Event) -> bool:
        if self.keep_errors and failure(e.error_type, e.status_code) is not None:
            return True
        slow = self.slow_ms
        return slow is not None and e.duration_ms is not None and e.duration_ms > slow

    def _rate(self, e: Event) -> float:
        for matches, rate in self.rules:
            if matches(e):
                return rate
        return self.rate


factory = Factory(kind="processor", type="sample", config=SampleConfig, create=SampleProcessor)
