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
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.utils import floatToGoString

from meterline.event import Event
from meterline.exporters.prometheus.metrics import (
    METRICS,
    Key,
    Labeler,
    MetricDef,
    counter_sums,
    group,
    observations,
)

OTHER: Final = "__other__"
_SWEEP_INTERVAL: Final = 1.0  # at most one expiry sweep a second when full


class Family:
    """One metric's series: label values (configured, then its own label) -> values.

    A counter's values are `[total]`; a histogram's are its bucket counts (not
    cumulative, the last one `+Inf`) followed by the sum."""

    def __init__(self, metric: MetricDef, labels: list[str], bounds: tuple[float, ...]) -> None:
        self.name, self.kind, self.help = metric.name, metric.kind, metric.help
        self.base_labels = list(labels)  # the configured ones
        self.labels = [*labels, metric.extra[0]] if metric.extra else list(labels)
        self.bounds = bounds
        self.size = len(bounds) + 2 if metric.kind == "histogram" else 1
        self.series: dict[Key, list[float]] = {}
        self._le = [floatToGoString(b) for b in bounds] + ["+Inf"]

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

    def expose(self, series: Iterable[tuple[Key, list[float]]]) -> Metric:
        """A prometheus_client metric family of these series."""
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.help, labels=self.labels)
            for key, values in series:
                cumulative, buckets = 0.0, []
                for le, count in zip(self._le, values, strict=False):
                    cumulative += count
                    buckets.append((le, float(round(cumulative))))
                histogram.add_metric(list(key), buckets, values[-1])
            return histogram
        cls = CounterMetricFamily if self.kind == "counter" else UnknownMetricFamily
        family = cls(self.name, self.help, labels=self.labels)
        for key, values in series:
            family.add_metric(list(key), values[0])
        return family


class SeriesStore:
    def __init__(self, labels: list[str], labelers: list[Labeler],
                 buckets: dict[str, tuple[float, ...]], max_series: int, expiration: float,
                 keep_values: bool, on_fold: Callable[[int], None],
                 on_expire: Callable[[int], None]) -> None:
        self.labelers = labelers
        self.max_series = max_series
        self.expiration = expiration
        self.keep_values = keep_values  # True when other processes add to the same series
        self.on_fold, self.on_expire = on_fold, on_expire
        self.families: dict[str, Family] = {}
        for metric in METRICS:
            if metric.name not in self.families:
                bounds = buckets[metric.buckets] if metric.buckets else ()
                self.families[metric.name] = Family(metric, labels, bounds)
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
        for key, members in groups.items():
            self.seen[key] = now
            for metric in METRICS:
                family = self.families[metric.name]
                if metric.kind == "histogram":
                    points = observations(members, metric)
                    if points:
                        changed.append((family, key, family.observe(key, points)))
                    continue
                for own, amount in counter_sums(members, metric).items():
                    series = (*key, own) if metric.extra else key
                    values = family.values(series)
                    values[0] += amount
                    changed.append((family, series, values))
        return changed

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
        expired = {key for key, seen in self.seen.items() if seen < limit}
        if not expired:
            return
        width = len(self.labelers)
        if not self.keep_values:
            for family in self.families.values():
                for series in [s for s in family.series if s[:width] in expired]:
                    del family.series[series]
        for key in expired:
            del self.seen[key]
        self.on_expire(len(expired))

    def collect(self) -> Iterator[Metric]:
        for family in self.families.values():
            yield family.expose(family.series.items())
