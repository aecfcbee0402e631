"""The daemon's own telemetry, through the OpenTelemetry SDK as the Collector does it.

Metrics are pulled from the admin server's `/metrics` (a Prometheus reader on a
registry of our own, apart from the `prometheus` exporter's) and pushed over OTLP
when `service.telemetry.metrics.otlp_endpoint` is set. The names mirror the
Collector's `otelcol_*` set with a `meterline_` prefix and `events` as the unit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry

from meterline import __version__
from meterline.config import MetricsConfig

QueueFigures = Callable[[], dict[str, float]]


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
        self.meter: Meter = self.provider.get_meter("meterline", __version__)
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
