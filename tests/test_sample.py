"""The sample processor: deterministic, nested, unbiased, always keeping errors."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from meterline.config import convert
from meterline.event import Event, clone
from meterline.processors.sample import SampleConfig, SampleProcessor, position
from tests.helpers import make_context, make_event, metric_value

N = 100_000


def sampler(tmp_path: Path, clock: Any = None, **config: Any
            ) -> tuple[SampleProcessor, CollectorRegistry]:
    context = make_context(tmp_path, "sample")
    extra = {"clock": clock} if clock is not None else {}
    return (SampleProcessor(convert(config, SampleConfig), context, **extra),
            context.telemetry.registry)


def ids_events(n: int = N) -> list[Event]:
    return [Event(event_id=f"evt-{i:08d}", timestamp=i, input_tokens=100) for i in range(n)]


def trace_events(n: int = N) -> list[Event]:
    rng = random.Random(7)
    return [Event(event_id=f"evt-{i:08d}", timestamp=i, trace_id=f"{rng.getrandbits(128):032x}",
                  input_tokens=100) for i in range(n)]


@pytest.mark.parametrize("make", [ids_events, trace_events], ids=["event-ids", "trace-ids"])
def test_kept_share_and_weighted_total_stay_within_four_sigma_of_the_rate(
        tmp_path: Path, make: Any) -> None:
    p, _ = sampler(tmp_path, rate=0.1)
    kept = p.process(make())
    sigma = math.sqrt(N * 0.1 * 0.9)
    assert abs(len(kept) - N * 0.1) < 4 * sigma  # 4 sigma: 380 events of 10,000
    weighted = sum(e.sample_weight for e in kept)
    assert abs(weighted - N) < 4 * sigma * 10
    assert abs(sum(e.input_tokens * e.sample_weight for e in kept) - 100 * N) < 4 * sigma * 1000


def test_two_instances_keep_exactly_the_same_events(tmp_path: Path) -> None:
    events = trace_events(20_000) + ids_events(20_000)
    first, _ = sampler(tmp_path / "a", rate=0.25)
    second, _ = sampler(tmp_path / "b", rate=0.25)
    a = [e.event_id for e in first.process(clone(events))]
    b = [e.event_id for e in second.process(clone(events))]
    assert a == b and 0 < len(a) < len(events)


def test_a_trace_is_kept_whole_or_not_at_all(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path, rate=0.5)
    rng = random.Random(3)
    traces = [f"{rng.getrandbits(128):032x}" for _ in range(200)]
    events = [make_event(i, trace_id=t) for t in traces for i in range(3)]
    kept_traces: dict[str | None, int] = {}
    for e in p.process(events):
        kept_traces[e.trace_id] = kept_traces.get(e.trace_id, 0) + 1
    assert set(kept_traces.values()) == {3}
    assert 0 < len(kept_traces) < 200


def test_lower_rates_keep_a_subset_of_what_higher_rates_keep(tmp_path: Path) -> None:
    events = ids_events(10_000)
    low, _ = sampler(tmp_path, rate=0.1)
    high, _ = sampler(tmp_path, rate=0.5)
    kept_low = {e.event_id for e in low.process(clone(events))}
    kept_high = {e.event_id for e in high.process(clone(events))}
    assert kept_low < kept_high


def test_trace_ids_are_sampled_as_opentelemetry_trace_id_ratio_sampler_does(
        tmp_path: Path) -> None:
    events = trace_events(5000)
    p, _ = sampler(tmp_path, rate=0.3)
    kept = {e.event_id for e in p.process(clone(events))}
    otel = TraceIdRatioBased(0.3)
    expected = {e.event_id for e in events if otel.should_sample(
        None, int(e.trace_id or "", 16), "chat").decision == Decision.RECORD_AND_SAMPLE}
    assert kept == expected


def test_errors_and_slow_events_are_always_kept_with_weight_one(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path, rate=0.0, keep_slower_than="10s")
    events = [make_event(0, status_code=500, error_type="server_error"),
              make_event(1, status_code=429),
              make_event(2, duration_ms=12_000.0),
              make_event(3, duration_ms=800.0)]
    kept = p.process(events)
    assert [e.event_id for e in kept] == ["evt-00000000", "evt-00000001", "evt-00000002"]
    assert {e.sample_weight for e in kept} == {1.0}


def test_a_call_the_client_cancelled_is_sampled_like_a_success(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path, rate=0.0)
    assert p.process([make_event(0, status_code=499)]) == []  # 499: no error to keep


def test_first_matching_rule_sets_the_rate(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path, rate=0.0, rules=[
        {"match": {"provider": "anthropic"}, "rate": 1.0},
        {"match": {"metadata.env": "prod"}, "rate": 0.0}])
    events = [make_event(0, provider="anthropic", metadata={"env": "prod"}),
              make_event(1, provider="openai", metadata={"env": "prod"}),
              make_event(2, provider="openai")]
    assert [e.event_id for e in p.process(events)] == ["evt-00000000"]


def test_content_mode_keeps_every_event_and_strips_the_unsampled_content(
        tmp_path: Path) -> None:
    p, registry = sampler(tmp_path, mode="content", rate=0.5)
    events = [make_event(i, input_messages=[{"role": "user", "content": "hi"}],
                         output_messages=[{"role": "assistant", "content": "yo"}])
              for i in range(1000)]
    kept = p.process(events)
    assert len(kept) == 1000
    assert {e.sample_weight for e in kept} == {1.0}
    stripped = [e for e in kept if e.input_messages is None]
    assert all(e.output_messages is None for e in stripped)
    assert 400 < len(stripped) < 600
    assert metric_value(registry, "meterline_sample_sampled_out_events_total",
                        mode="content") == len(stripped)


def test_event_mode_counts_what_it_drops(tmp_path: Path) -> None:
    p, registry = sampler(tmp_path, rate=0.2)
    kept = p.process(ids_events(5000))
    assert metric_value(registry, "meterline_sample_sampled_out_events_total",
                        mode="event") == 5000 - len(kept)


def test_existing_weights_are_multiplied(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path, rate=0.5)
    kept = p.process([Event(event_id=f"e{i}", sample_weight=4.0) for i in range(100)])
    assert kept and {e.sample_weight for e in kept} == {8.0}


def test_rate_limit_keeps_at_most_the_limit_and_adjusts_weights(tmp_path: Path) -> None:
    now = [1000.0]
    p, registry = sampler(tmp_path, clock=lambda: now[0], max_per_second=100)
    per_second = []
    weighted = 0.0
    for second in range(10):
        now[0] = 1000.0 + second
        kept = []
        for batch in range(10):  # 1,000 events a second in batches of 100
            start = second * 1000 + batch * 100
            kept += p.process([Event(event_id=f"evt-{i}") for i in range(start, start + 100)])
        per_second.append(len(kept))
        weighted += sum(e.sample_weight for e in kept)
    assert max(per_second) <= 100
    assert per_second[0] == 100  # no history yet: the first 100 pass, the rest are cut
    assert metric_value(registry, "meterline_sample_rate_limited_events_total") >= 900
    # the cap loses no weight: what it cut (900 in the first second, some later) is carried
    # by later kept events, so kept weights plus what the last second still owes are
    # exactly what sampling alone estimates: 1,000 for the first second (p = 1), then
    # weight 10 for each event sampled at p = 0.1 ...
    assert p.limit is not None
    sampled_later = sum(position(Event(event_id=f"evt-{i}")) < 0.1 for i in range(1000, 10_000))
    assert weighted + p.limit.owed == pytest.approx(1000 + 10 * sampled_later, abs=1e-6)
    assert p.limit.owed <= 0.01 * 10_000
    # ... which is within 4 sigma of the 10,000 that arrived
    assert abs(weighted - 10_000) < 4 * 10 * math.sqrt(9000 * 0.1 * 0.9)


def test_max_per_second_is_shared_by_the_worker_processes_that_run_the_sampler(
        tmp_path: Path) -> None:
    """Each of 4 workers runs its own sampler: together they keep the daemon's limit."""
    now = [1000.0]
    context = dataclasses.replace(make_context(tmp_path, "sample"), replicas=4)
    p = SampleProcessor(convert({"max_per_second": 100}, SampleConfig), context,
                        clock=lambda: now[0])
    kept = p.process([Event(event_id=f"evt-{i}") for i in range(1000)])
    assert len(kept) == 25


def test_empty_config_keeps_everything_untouched(tmp_path: Path) -> None:
    p, _ = sampler(tmp_path)
    events = ids_events(100)
    assert p.process(events) is events
    assert {e.sample_weight for e in events} == {1.0}


@pytest.mark.parametrize("config", [{"rate": 1.5}, {"rules": [{"match": {}, "rate": -0.1}]},
                                    {"max_per_second": 0}])
def test_bad_rates_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        convert(config, SampleConfig)
