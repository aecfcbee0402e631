"""The daemon's counters (`meterline.telemetry.Tally`): what a reader collects from them."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from meterline.config import MetricsConfig
from meterline.telemetry import Telemetry
from tests.helpers import metric_value


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels but the instrumentation scope's, value) of each sample named `name`."""
    return [({k: v for k, v in s.labels.items() if not k.startswith("otel_scope_")}, s.value)
            for family in registry.collect() for s in family.samples if s.name == name]


def test_a_counter_reports_its_sum_by_attribute_set_as_a_prometheus_counter() -> None:
    telemetry = Telemetry(MetricsConfig())
    counter = telemetry.meter.create_counter("meterline_test_events", description="d")
    counter.add(3, {"receiver": "webhook"})
    counter.add(4, {"receiver": "webhook"})
    counter.add(5, {"receiver": "otlp"})
    assert metric_value(telemetry.registry, "meterline_test_events_total",
                        receiver="webhook") == 7
    assert metric_value(telemetry.registry, "meterline_test_events_total",
                        receiver="otlp") == 5
    [family] = [f for f in telemetry.registry.collect() if f.name == "meterline_test_events"]
    assert family.type == "counter"


def test_attributes_in_another_order_are_the_same_series() -> None:
    telemetry = Telemetry(MetricsConfig())
    counter = telemetry.meter.create_counter("meterline_test_events")
    counter.add(1, {"processor": "redact", "pipeline": "usage"})
    counter.add(1, {"pipeline": "usage", "processor": "redact"})
    assert samples(telemetry.registry, "meterline_test_events_total") == [
        ({"processor": "redact", "pipeline": "usage"}, 2.0)]


def test_a_counter_created_again_by_name_counts_on_from_its_total() -> None:
    # a component rebuilt by a reload asks for its counters again
    telemetry = Telemetry(MetricsConfig())
    telemetry.meter.create_counter("meterline_test_events").add(2, {"id": "a"})
    telemetry.meter.create_counter("meterline_test_events").add(3, {"id": "a"})
    assert samples(telemetry.registry, "meterline_test_events_total") == [({"id": "a"}, 5.0)]


def test_adds_from_many_threads_are_all_counted() -> None:
    telemetry = Telemetry(MetricsConfig())
    counter = telemetry.meter.create_counter("meterline_test_events")

    def count() -> None:
        for _ in range(20_000):
            counter.add(1, {"exporter": "clickhouse"})

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metric_value(telemetry.registry, "meterline_test_events_total") == 80_000


def test_a_negative_amount_is_ignored_so_the_counter_never_goes_down() -> None:
    telemetry = Telemetry(MetricsConfig())
    counter = telemetry.meter.create_counter("meterline_test_events")
    counter.add(5)
    counter.add(-2)
    assert metric_value(telemetry.registry, "meterline_test_events_total") == 5


def test_a_sequence_attribute_value_is_counted_too() -> None:
    telemetry = Telemetry(MetricsConfig())
    counter = telemetry.meter.create_counter("meterline_test_events")
    counter.add(1, {"tags": ["a", "b"]})
    counter.add(1, {"tags": ["a", "b"]})
    assert metric_value(telemetry.registry, "meterline_test_events_total") == 2
