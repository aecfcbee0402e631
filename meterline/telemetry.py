"""The daemon's own telemetry, through the OpenTelemetry SDK as the Collector does it.

Metrics are pulled from the admin server's `/metrics` (a Prometheus reader on a
registry of our own, apart from the `prometheus` exporter's) and pushed over OTLP
when `service.telemetry.metrics.otlp_endpoint` is set. The names mirror the
Collector's `otelcol_*` set with a `meterline_` prefix and `events` as the unit.

Counters are tallies (`Tally`): the daemon counts per batch on the loop that serves
clients, and with batches of one event (a gateway call, a single-event POST) the SDK's
own `Counter.add` (about 8 us: a measurement object, attributes hashed for each
reader's view, a lock per aggregation) was an eighth of that loop's work. A tally sums
under one lock and reports its totals when a reader collects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    Observation,
    UpDownCounter,
)
from opentelemetry.metrics import CallbackT as Callback
from opentelemetry.metrics import _Gauge as Gauge  # (the API exports it by that name)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry

from meterline import __version__
from meterline.config import MetricsConfig

QueueFigures = Callable[[], dict[str, float]]
_Attributes = frozenset[tuple[str, Any]]


class Tally(Counter):
    """A monotonic counter whose sums, by attribute set, are kept here and observed by
    the SDK only when a reader collects (an observable counter: the same series, type and
    Prometheus `_total` name as a `Counter`'s). Safe from any thread."""

    def __init__(self, meter: Meter, name: str, unit: str = "", description: str = "") -> None:
        self.name, self.unit, self.description = name, unit, description
        self._sums: dict[_Attributes, float] = {}
        self._lock = threading.Lock()
        meter.create_observable_counter(name, callbacks=[self._observe], unit=unit,
                                        description=description)

    def add(self, amount: float, attributes: Attributes = None,
            context: Context | None = None) -> None:
        if amount < 0:  # as the SDK: a counter never goes down
            return
        try:
            key: _Attributes = frozenset(attributes.items()) if attributes else frozenset()
        except TypeError:  # a sequence value (the daemon's own are scalars)
            key = frozenset((k, tuple(v) if isinstance(v, list) else v)
                            for k, v in (attributes or {}).items())
        with self._lock:
            self._sums[key] = self._sums.get(key, 0) + amount

    def _observe(self, _: CallbackOptions) -> list[Observation]:
        with self._lock:
            sums = list(self._sums.items())
        return [Observation(total, dict(key)) for key, total in sums]


class TallyMeter(Meter):
    """The SDK's meter, but for counters, which are `Tally`s: one per name, as the SDK
    gives the same instrument for the same name (a component rebuilt by a reload counts
    on from its predecessor's totals)."""

    def __init__(self, meter: Meter) -> None:
        super().__init__(meter.name, meter.version, meter.schema_url)
        self._meter = meter
        self._tallies: dict[str, Tally] = {}
        self._lock = threading.Lock()

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Tally:
        with self._lock:
            tally = self._tallies.get(name)
            if tally is None:
                tally = self._tallies[name] = Tally(self._meter, name, unit, description)
            return tally

    def create_up_down_counter(self, name: str, unit: str = "",
                               description: str = "") -> UpDownCounter:
        return self._meter.create_up_down_counter(name, unit, description)

    def create_histogram(self, name: str, unit: str = "", description: str = "", *,
                         explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
                         ) -> Histogram:
        return self._meter.create_histogram(
            name, unit, description,
            explicit_bucket_boundaries_advisory=explicit_bucket_boundaries_advisory)

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> Gauge:
        return self._meter.create_gauge(name, unit, description)

    def create_observable_counter(self, name: str, callbacks: Sequence[Callback] | None = None,
                                  unit: str = "", description: str = "") -> ObservableCounter:
        return self._meter.create_observable_counter(name, callbacks, unit, description)

    def create_observable_gauge(self, name: str, callbacks: Sequence[Callback] | None = None,
                                unit: str = "", description: str = "") -> ObservableGauge:
        return self._meter.create_observable_gauge(name, callbacks, unit, description)

    def create_observable_up_down_counter(
            self, name: str, callbacks: Sequence[Callback] | None = None, unit: str = "",
            description: str = "") -> ObservableUpDownCounter:
        return self._meter.create_observable_up_down_counter(name, callbacks, unit,
                                                             description)


class Telemetry:
    def __init__(self, config: MetricsConfig) -> None:
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [
            PrometheusMetricReader(registry=self.registry, disable_target_info=True)]
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=config.otlp_endpoint, insecure=True),
                export_interval_millis=float(config.interval) * 1000))
        self.provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create({"service.name": "meterline",
                                      "service.version": __version__}))
        self.meter: Meter = TallyMeter(self.provider.get_meter("meterline", __version__))
        m = self.meter
        self.receiver_accepted = m.create_counter(
            "meterline_receiver_accepted_events", description="Events a receiver accepted")
        self.receiver_refused = m.create_counter(
            "meterline_receiver_refused_events",
            description="Events a receiver refused (undecodable, or pushed back)")
        self.processor_incoming = m.create_counter(
            "meterline_processor_incoming_events", description="Events into a processor")
        self.processor_dropped = m.create_counter(
            "meterline_processor_dropped_events", description="Events a processor dropped")
        self.exporter_sent = m.create_counter(
            "meterline_exporter_sent_events", description="Events delivered by an exporter")
        self.exporter_failed = m.create_counter(
            "meterline_exporter_send_failed_events",
            description="Events given up on (permanent error or retries exhausted)")
        self.exporter_retries = m.create_counter(
            "meterline_exporter_retries", description="Failed send attempts that were retried")
        self.exporter_dropped = m.create_counter(
            "meterline_exporter_dropped_events",
            description="Events dropped because the queue was full (when_full: drop_newest)")
        # a budget notification that did not go out (crossings.py): reason gave_up (the
        # delivery gave up: dead-lettered) or not_queued (tried again at the next evaluation)
        self.budget_notifications_failed = m.create_counter(
            "meterline_budget_notifications_failed",
            description="Budget notifications not delivered, by notifier, budget and reason "
                        "(gave_up: the webhook refused it or retries ran out, dead-lettered; "
                        "not_queued: its queue refused it, tried again at the next evaluation)")
        self.exporter_filtered = m.create_counter(
            "meterline_exporter_filtered_events",
            description="Events an exporter's filtering block left out")
        self._config_reloads = m.create_counter(
            "meterline_config_reloads", description="Reloads of pipeline.yaml, by result "
            "(applied; refused: the file is invalid; partial: a component failed to start)")
        # as Prometheus' own prometheus_config_last_reload_*: alert on `== 0`
        self.last_reload_successful = 1.0
        self.last_reload_success_time = time.time()  # the start counts as a success
        m.create_observable_gauge(
            "meterline_config_last_reload_successful",
            callbacks=[lambda _: [Observation(self.last_reload_successful)]],
            description="1 when the last reload of pipeline.yaml was applied, 0 when it was "
                        "refused or applied in part (the audit log says why)")
        m.create_observable_gauge(
            "meterline_config_last_reload_success_timestamp_seconds",
            callbacks=[lambda _: [Observation(self.last_reload_success_time)]],
            description="When the configuration was last applied (start or reload), Unix time")
        self._queues: dict[str, QueueFigures] = {}
        for name, key, description in (
            ("meterline_exporter_queue_size", "events", "Events waiting in an exporter's queue"),
            ("meterline_exporter_queue_capacity", "capacity_events",
             "Events a memory queue holds at most"),
            ("meterline_exporter_queue_bytes", "bytes", "Bytes a persistent queue uses on disk"),
            ("meterline_exporter_queue_capacity_bytes", "capacity_bytes",
             "Bytes a persistent queue may use on disk"),
        ):
            m.create_observable_gauge(name, callbacks=[self._observe(key)],
                                      description=description)

    def config_reloaded(self, result: str) -> None:
        """Count a reload by result (applied, refused, partial) and set the last-reload
        gauges."""
        self._config_reloads.add(1, {"result": result})
        self.last_reload_successful = 1.0 if result == "applied" else 0.0
        if result == "applied":
            self.last_reload_success_time = time.time()

    def watch_queue(self, exporter: str, figures: QueueFigures | None) -> None:
        """Report (or, with None, stop reporting) an exporter's queue figures."""
        if figures is None:
            self._queues.pop(exporter, None)
        else:
            self._queues[exporter] = figures

    def _observe(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for exporter, figures in list(self._queues.items()):
                value = figures().get(key)
                if value is not None:
                    yield Observation(value, {"exporter": exporter})
        return callback

    def shutdown(self) -> None:
        self.provider.shutdown()
