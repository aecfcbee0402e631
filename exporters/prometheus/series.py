"""The exporter's series: updated once per batch, bounded, expired, and exposed.

Cardinality is bounded by label set (the values of the configured labels): at
most `max_series` of them are tracked. The events of a new label set beyond that
go to one more label set, whose every value is `__other__`, in every metric alike, so
that ratios between metrics stay meaningful; they are counted
(`meterline_prometheus_folded_events_total`). A label set no event has had for
`metric_expiration` frees its place: it is dropped from every metric, or, when
other processes add to the same series (`keep_values`), only from the count of
tracked label sets, its values kept so that, should it come back, its counters go
on from where they were rather than restart below what the shared files hold.
A metric whose own labels are open-ended (`tool_name`, a guardrail's `rule`) holds at
most `max_series` series; beyond, new ones count under `__other__` own labels.

The rate-limit utilization gauges (`RateLimits`) have label sets of their own
(provider and API key): each series holds the latest value reported, and expires
like the others.

Histogram buckets hold weighted counts (see `sample_weight`); they are exposed
rounded to whole numbers, as OpenMetrics requires; `_sum` is exact.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.utils import floatToGoString

from meterline.event import Event
from meterline.exporters.prometheus.metrics import (
    METRICS,
    TRUEFOUNDRY_NAMES,
    VIEWS,
    FamilySet,
    Key,
    Kind,
    Labeler,
    counter_sums,
    group,
    in_scope,
    observations,
)

OTHER: Final = "__other__"
_SWEEP_INTERVAL: Final = 1.0  # at most one expiry sweep a second when full
RATE_LIMIT_UTILIZATION: Final = "llm_gateway_rate_limit_utilization_ratio"
RATE_LIMIT_LABELS: Final = ("provider", "api_key_id", "api_key_name", "limit")


class Family:
    """One stored metric's series: label values (configured, then its own labels) ->
    values. A counter's or gauge's values are `[value]`; a histogram's are its bucket
    counts (not cumulative, the last one `+Inf`) followed by the sum."""

    def __init__(self, name: str, kind: Kind, labels: list[str], own: tuple[str, ...],
                 bounds: tuple[float, ...], bounded: bool = False) -> None:
        self.name, self.kind = name, kind
        self.base_labels = list(labels)  # the configured ones
        self.labels = [*labels, *own]
        self.bounds = bounds
        self.bounded = bounded  # own labels open-ended: series capped (see SeriesStore)
        self.size = len(bounds) + 2 if kind == "histogram" else 1
        self.series: dict[Key, list[float]] = {}

    def values(self, key: Key) -> list[float]:
        found = self.series.get(key)
        if found is None:
            found = self.series[key] = [0.0] * self.size
        return found

    def observe(self, key: Key, points: list[tuple[float, float]]) -> list[float]:
        values = self.values(key)
        bounds = self.bounds
        for value, weight in points:
            values[bisect.bisect_left(bounds, value)] += weight
            values[-1] += value * weight
        return values


class Exposed:
    """How a scrape shows a stored family: its name, type and label names, values
    scaled (a histogram stored in seconds shown in milliseconds)."""

    def __init__(self, family: Family, name: str, kind: Kind, help_: str,
                 renames: dict[str, str] | None = None, scale: float = 1.0) -> None:
        self.family, self.name, self.kind, self.help = family, name, kind, help_
        renames = renames or {}
        self.labels = [renames.get(label, label) for label in family.labels]
        self.scale = scale
        self._le = [floatToGoString(round(b * scale, 9)) for b in family.bounds] + ["+Inf"]

    def expose(self, series: Iterable[tuple[Key, list[float]]]) -> Metric:
        """A prometheus_client metric family of these series."""
        scale = self.scale
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.help, labels=self.labels)
            for key, values in series:
                cumulative, buckets = 0.0, []
                for le, count in zip(self._le, values, strict=False):
                    cumulative += count
                    buckets.append((le, float(round(cumulative))))
                histogram.add_metric(list(key), buckets, values[-1] * scale)
            return histogram
        cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}.get(
            self.kind, UnknownMetricFamily)
        family = cls(self.name, self.help, labels=self.labels)
        for key, values in series:
            family.add_metric(list(key), values[0] * scale)
        return family


def _renames(sets: tuple[FamilySet, ...]) -> dict[str, str] | None:
    """seed 004's label names, for a metric that only the truefoundry set shows."""
    return TRUEFOUNDRY_NAMES if sets and "standard" not in sets else None


class RateLimits:
    """Rate-limit utilization (1 - remaining / limit, of requests and of tokens) per
    provider and API key: the latest value an event reported (by its timestamp)."""

    def __init__(self, max_series: int) -> None:
        self.family = Family(RATE_LIMIT_UTILIZATION, "gauge", list(RATE_LIMIT_LABELS), (), ())
        self.exposed = Exposed(
            self.family, RATE_LIMIT_UTILIZATION, "gauge",
            "Share of a provider's rate limit in use (1 - remaining / limit), by limit "
            "(requests or tokens), as the provider's last answer reported it")
        self.max_series = max_series
        self.latest: dict[Key, int] = {}  # series -> timestamp of the event it shows
        self.seen: dict[Key, float] = {}

    def update(self, events: list[Event], now: float) -> list[tuple[Family, Key, list[float]]]:
        changed: dict[Key, list[float]] = {}
        for e in events:
            if e.ratelimit_requests_limit is None and e.ratelimit_tokens_limit is None:
                continue
            for limit, total, remaining in (
                    ("requests", e.ratelimit_requests_limit, e.ratelimit_requests_remaining),
                    ("tokens", e.ratelimit_tokens_limit, e.ratelimit_tokens_remaining)):
                if not total or remaining is None:
                    continue
                key = (e.provider or "", e.api_key_id or "", e.api_key_name or "", limit)
                if key not in self.seen and len(self.seen) >= self.max_series:
                    continue
                self.seen[key] = now
                if self.latest.get(key, -1) > e.timestamp:
                    continue  # an older answer than the one shown
                self.latest[key] = e.timestamp
                values = self.family.values(key)
                values[0] = min(1.0, max(0.0, 1.0 - remaining / total))
                changed[key] = values
        return [(self.family, key, values) for key, values in changed.items()]

    def drop_expired(self, limit: float, keep_values: bool) -> None:
        for key in [k for k, seen in self.seen.items() if seen < limit]:
            del self.seen[key]
            if not keep_values:
                self.latest.pop(key, None)
                self.family.series.pop(key, None)


class SeriesStore:
    def __init__(self, labels: list[str], labelers: list[Labeler],
                 buckets: dict[str, tuple[float, ...]], max_series: int, expiration: float,
                 keep_values: bool, on_fold: Callable[[int], None],
                 on_expire: Callable[[int], None],
                 sets: tuple[FamilySet, ...] = ("standard", "truefoundry")) -> None:
        self.labelers = labelers
        self.max_series = max_series
        self.expiration = expiration
        self.keep_values = keep_values  # True when other processes add to the same series
        self.on_fold, self.on_expire = on_fold, on_expire
        views = [v for v in VIEWS if set(v.sets) & set(sets)]
        needed = {v.source for v in views}
        # the stored metrics: those a set shows, and those a view shows
        self.metrics = [m for m in METRICS if set(m.sets) & set(sets) or m.name in needed]
        self.families: dict[str, Family] = {}
        self.exposed: list[Exposed] = []
        for metric in self.metrics:
            if metric.name in self.families:
                continue
            bounds = buckets[metric.buckets] if metric.buckets else ()
            family = self.families[metric.name] = Family(
                metric.name, metric.kind, labels, metric.own_labels, bounds, metric.bounded)
            if set(metric.sets) & set(sets):
                self.exposed.append(Exposed(family, metric.name, metric.kind, metric.help,
                                            _renames(metric.sets)))
        for view in views:
            self.exposed.append(Exposed(self.families[view.source], view.name, view.kind,
                                        view.help, _renames(view.sets), view.scale))
        self.scopes = {m.scope for m in self.metrics}
        self.rate_limits = RateLimits(max_series)
        self.families[RATE_LIMIT_UTILIZATION] = self.rate_limits.family
        self.exposed.append(self.rate_limits.exposed)
        self.other: Key = (OTHER,) * len(labels)
        self.seen: dict[Key, float] = {}  # label set -> when an event last had it
        self._swept = 0.0

    def update(self, events: list[Event], now: float | None = None
               ) -> list[tuple[Family, Key, list[float]]]:
        """Apply a batch; the series it changed, with their values."""
        now = time.time() if now is None else now
        changed: list[tuple[Family, Key, list[float]]] = []
        groups = group(events, self.labelers)
        for key in [k for k in groups if k not in self.seen and k != self.other]:
            if self._tracked() >= self.max_series:
                self._sweep(now)
            if self._tracked() >= self.max_series:
                folded = groups.pop(key)
                groups.setdefault(self.other, []).extend(folded)
                self.on_fold(len(folded))
            else:
                self.seen[key] = now
        for key, events_of_key in groups.items():
            self.seen[key] = now
            scoped = {scope: in_scope(events_of_key, scope) for scope in self.scopes}
            for metric in self.metrics:
                family = self.families[metric.name]
                members = scoped[metric.scope]
                if not members:
                    continue
                if metric.kind == "histogram":
                    for own, points in observations(members, metric).items():
                        series = self._series(family, key, own)
                        changed.append((family, series, family.observe(series, points)))
                    continue
                for own, amount in counter_sums(members, metric).items():
                    series = self._series(family, key, own)
                    values = family.values(series)
                    values[0] += amount
                    changed.append((family, series, values))
        changed += self.rate_limits.update(events, now)
        return changed

    def _series(self, family: Family, key: Key, own: Key) -> Key:
        series = (*key, *own) if own else key
        if family.bounded and series not in family.series \
                and len(family.series) >= self.max_series:
            return (*key, *(OTHER,) * len(own))
        return series

    def _tracked(self) -> int:
        return len(self.seen) - (self.other in self.seen)

    def _sweep(self, now: float) -> None:
        if now - self._swept < _SWEEP_INTERVAL:
            return
        self._swept = now
        self.drop_expired(now)

    def drop_expired(self, now: float | None = None) -> None:
        """Forget the label sets no event has had for `expiration` seconds (their values
        too, unless `keep_values`)."""
        limit = (time.time() if now is None else now) - self.expiration
        self.rate_limits.drop_expired(limit, self.keep_values)
        expired = {key for key, seen in self.seen.items() if seen < limit}
        if not expired:
            return
        width = len(self.labelers)
        if not self.keep_values:
            for family in self.families.values():
                if family is self.rate_limits.family:
                    continue
                for series in [s for s in family.series if s[:width] in expired]:
                    del family.series[series]
        for key in expired:
            del self.seen[key]
        self.on_expire(len(expired))

    def collect(self) -> Iterator[Metric]:
        for exposed in self.exposed:
            yield exposed.expose(exposed.family.series.items())
