"""Which Prometheus metrics events make, and how a batch becomes one update per series.

The names are the ones seeds 001 and 002 use (`llm_gateway_requests_total`,
`llm_gateway_request_duration_seconds`...), so their dashboards and PromQL work
unchanged. Every metric carries the configured labels (`provider`, `model`,
`status`, `streaming`, `operation` by default); a few add one label of their own
(`error_type`, `type`, `method`). Each event counts `sample_weight` times, so a
sampled pipeline's totals estimate the whole traffic.

A cache hit (`cache_hit`) is a request (`llm_gateway_requests_total`) counted in
`llm_gateway_cache_hits_total` too, rather than a `cache_hit` label on every metric
(which would double their series). It adds nothing to the estimated spend; what it
saved goes to `llm_gateway_saved_cost_usd_total`.

A batch is grouped by label set first (`group`); then each series is updated once
with the group's sum (`counter_sums`) or all its observations (`observations`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from meterline.event import Event
from meterline.fieldpath import FieldPath
from meterline.genai import (
    OTHER_ROUTING_METHOD,
    ROUTING_ATTRIBUTE,
    ROUTING_METHODS,
    failure,
)

Kind = Literal["counter", "histogram", "untyped"]
Labeler = Callable[[Event], str]

DEFAULT_LABELS: Final = ("provider", "model", "status", "streaming", "operation")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _bool(value: bool | None) -> str:
    return "" if value is None else "true" if value else "false"


# Label name -> how an event gives its value; "" when not reported (Prometheus then
# treats the label as absent). `metadata_<key>` labels are made by `labeler()`.
LABELS: Final[dict[str, Labeler]] = {
    "provider": lambda e: e.provider or "",
    "model": lambda e: e.request_model or e.response_model or "",
    "response_model": lambda e: e.response_model or "",
    "status": lambda e: _text(e.status_code),
    "streaming": lambda e: _bool(e.streaming),
    "operation": lambda e: e.operation or "",
    "source": lambda e: e.source or "",
    "route": lambda e: e.route or "",
    "upstream": lambda e: e.upstream or "",
    "endpoint": lambda e: e.endpoint or "",
    "user": lambda e: e.user_id or "",
    "team": lambda e: e.team or "",
    "organization": lambda e: e.organization or "",
    "api_key_name": lambda e: e.api_key_name or "",
    "api_key_id": lambda e: e.api_key_id or "",
}
METADATA_PREFIX: Final = "metadata_"


def labeler(name: str) -> Labeler:
    """How an event gives the value of label `name`; KeyError for an unknown label."""
    if name.startswith(METADATA_PREFIX) and len(name) > len(METADATA_PREFIX):
        return FieldPath(f"metadata.{name[len(METADATA_PREFIX):]}").getter("")
    return LABELS[name]


# --- what counts -----------------------------------------------------------------------
def error_type(e: Event) -> str:
    """The error category of a failed call, "" for a success."""
    return failure(e.error_type, e.status_code) or ""


def routing_method(e: Event) -> str:
    """How the gateway routed the call (a known method, else `__other__`), "" if unsaid."""
    method = (e.attributes or {}).get(ROUTING_ATTRIBUTE)
    if not method:
        return ""
    return method if isinstance(method, str) and method in ROUTING_METHODS \
        else OTHER_ROUTING_METHOD


def _provider_error(e: Event) -> bool:
    """A failed call that reached a provider: all of them, except the gateway's own
    refusals made before it chose an upstream (no `upstream` on the event)."""
    return bool(error_type(e)) and not (e.source == "gateway" and e.upstream is None)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _usage(e: Event) -> bool:
    return e.input_tokens is not None or e.output_tokens is not None


@dataclass(frozen=True)
class MetricDef:
    """One metric, or one part of it (`llm_gateway_tokens_total` has two: by `type`)."""

    name: str  # counters without the `_total` suffix, as prometheus_client wants them
    kind: Kind
    help: str
    value: Callable[[Event], float | None]  # None: the event does not count here
    extra: tuple[str, Callable[[Event], str]] | None = None  # the metric's own label
    buckets: str | None = None  # histograms: which bucket set (see BUCKET_SETS)


BUCKET_SETS: Final = ("duration", "overhead", "time_to_first_token", "inter_token_latency")

METRICS: Final[tuple[MetricDef, ...]] = (
    MetricDef("llm_gateway_requests", "counter", "LLM calls",
              lambda e: 1.0, ("error_type", error_type)),
    MetricDef("llm_gateway_request_duration_seconds", "histogram",
              "End-to-end duration of LLM calls, as the gateway saw them",
              lambda e: _seconds(e.duration_ms), buckets="duration"),
    MetricDef("llm_gateway_provider_duration_seconds", "histogram",
              "Time spent waiting on the upstream provider",
              lambda e: _seconds(e.provider_duration_ms), buckets="duration"),
    MetricDef("llm_gateway_overhead_duration_seconds", "histogram",
              "Time spent inside the gateway (routing, accounting, response handling)",
              lambda e: _seconds(e.overhead_ms), buckets="overhead"),
    MetricDef("llm_gateway_time_to_first_token_seconds", "histogram",
              "Time to the first token of streamed responses",
              lambda e: _seconds(e.ttft_ms), buckets="time_to_first_token"),
    MetricDef("llm_gateway_inter_token_latency_seconds", "histogram",
              "Mean time between tokens of streamed responses",
              lambda e: _seconds(e.itl_ms), buckets="inter_token_latency"),
    MetricDef("llm_gateway_tokens_prompt", "counter", "Prompt (input) tokens",
              lambda e: float(e.input_tokens or 0) if _usage(e) else None),
    MetricDef("llm_gateway_tokens_completion", "counter", "Completion (output) tokens",
              lambda e: float(e.output_tokens or 0) if _usage(e) else None),
    MetricDef("llm_gateway_tokens", "counter", "Tokens, by type (prompt or completion)",
              lambda e: float(e.input_tokens or 0) if _usage(e) else None,
              ("type", lambda e: "prompt")),
    MetricDef("llm_gateway_tokens", "counter", "Tokens, by type (prompt or completion)",
              lambda e: float(e.output_tokens or 0) if _usage(e) else None,
              ("type", lambda e: "completion")),
    MetricDef("llm_gateway_estimated_cost_usd", "counter",
              "Estimated spend from token usage and prices (USD)",
              lambda e: None if e.cache_hit else e.cost_usd),
    MetricDef("llm_gateway_actual_cost_usd", "untyped",
              "Spend reported by the source (USD), a running total: use increase()",
              lambda e: e.actual_cost_usd),
    MetricDef("llm_gateway_errors", "counter", "Failed LLM calls (gateway and provider errors)",
              lambda e: 1.0 if error_type(e) else None, ("error_type", error_type)),
    MetricDef("llm_gateway_provider_errors", "counter", "Errors returned by upstream providers",
              lambda e: 1.0 if _provider_error(e) else None, ("error_type", error_type)),
    MetricDef("llm_gateway_rate_limit_hits", "counter", "Calls refused by a rate limit (429)",
              lambda e: 1.0 if e.status_code == 429 or e.error_type == "rate_limit_error"
              else None),
    MetricDef("llm_gateway_routing_decisions", "counter", "Routing decisions, by method",
              lambda e: 1.0 if routing_method(e) else None, ("method", routing_method)),
    MetricDef("llm_gateway_fallbacks", "counter", "Calls served by a fallback target",
              lambda e: 1.0 if e.fallback else None),
    MetricDef("llm_gateway_cache_hits", "counter",
              "Calls answered from a cache, without calling the provider",
              lambda e: 1.0 if e.cache_hit else None),
    MetricDef("llm_gateway_saved_cost_usd", "counter",
              "What cache hits would have cost at the provider (USD)",
              lambda e: e.saved_cost_usd if e.cache_hit else None),
)

Key = tuple[str, ...]


def group(events: list[Event], labelers: list[Labeler]) -> dict[Key, list[Event]]:
    """A batch's events by label set (the values of the configured labels)."""
    groups: dict[Key, list[Event]] = {}
    for e in events:
        key = tuple([f(e) for f in labelers])
        found = groups.get(key)
        if found is None:
            groups[key] = [e]
        else:
            found.append(e)
    return groups


def counter_sums(events: list[Event], metric: MetricDef) -> dict[str, float]:
    """A counter's weighted increments over one label set's events, by its own label
    ("" when it has none)."""
    value_of = metric.value
    if metric.extra is None:
        found = [v * e.sample_weight for e in events if (v := value_of(e)) is not None]
        return {"": sum(found)} if found else {}
    sums: dict[str, float] = {}
    own_of = metric.extra[1]
    for e in events:
        value = value_of(e)
        if value is not None:
            own = own_of(e)
            sums[own] = sums.get(own, 0.0) + value * e.sample_weight
    return sums


def observations(events: list[Event], metric: MetricDef) -> list[tuple[float, float]]:
    """A histogram's (value, weight) observations over one label set's events."""
    return [(v, e.sample_weight) for e in events if (v := metric.value(e)) is not None]
