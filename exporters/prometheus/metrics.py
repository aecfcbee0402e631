"""Which Prometheus metrics events make, and how a batch becomes one update per series.

Two sets of names (`families` in the config), both exposed by default:

- `standard`: the names seeds 001 and 002 use (`llm_gateway_requests_total`,
  `llm_gateway_request_duration_seconds`...), so their dashboards and PromQL work
  unchanged;
- `truefoundry`: the names of TrueFoundry's AI gateway (seed 004):
  `llm_gateway_input_tokens`, `llm_gateway_request_processing_ms`..., the policy
  counters (`llm_gateway_rate_limit_requests_total`...) and the agent and MCP metrics
  (`llm_gateway_agent_tool_calls_total`...). There the configured labels `model`,
  `user` and `organization` are named `model_name`, `username` and `tenant_name`, as
  that gateway names them.

Where the two sets count the same thing (tokens, spend, latencies, failures), the
series are stored once (a `MetricDef`) and exposed under both names (`View`s; the
`_ms` histograms scale the stored seconds), so the second set costs nothing per
event. Every metric carries the configured labels (`provider`, `model`, `status`,
`streaming`, `operation` by default); a few add labels of their own (`error_type`,
`type`, `method`, `tool_name`, `rule` and `action`). Each event counts
`sample_weight` times, so a sampled pipeline's totals estimate the whole traffic.

A cache hit (`cache_hit`) is a request (`llm_gateway_requests_total`) counted in
`llm_gateway_cache_hits_total` too, rather than a `cache_hit` label on every metric
(which would double their series). It adds nothing to the estimated spend; what it
saved goes to `llm_gateway_saved_cost_usd_total`.

A batch is grouped by label set first (`group`); then each series is updated once
with the group's sum (`counter_sums`) or all its observations (`observations`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from meterline.event import Event
from meterline.fieldpath import FieldPath
from meterline.genai import (
    GUARDRAIL_BLOCKED,
    NON_MODEL_OPERATIONS,
    OTHER_ROUTING_METHOD,
    ROUTING_ATTRIBUTE,
    failure,
    is_mcp_request,
)
from meterline.genai import ROUTING_METHODS as GATEWAY_ROUTING_METHODS

Kind = Literal["counter", "histogram", "untyped", "gauge"]
Scope = Literal["all", "policy", "agent"]
Labeler = Callable[[Event], str]
Key = tuple[str, ...]
# Own labels' values of one event, with the amount each counts (a guardrail counter
# counts once per rule that fired)
Splitter = Callable[[Event], list[tuple[Key, float]]]

FamilySet = Literal["standard", "truefoundry"]
FAMILY_SETS: Final[tuple[FamilySet, ...]] = ("standard", "truefoundry")
STANDARD: Final[tuple[FamilySet, ...]] = ("standard",)
TRUEFOUNDRY: Final[tuple[FamilySet, ...]] = ("truefoundry",)

DEFAULT_LABELS: Final = ("provider", "model", "status", "streaming", "operation")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _bool(value: bool | None) -> str:
    return "" if value is None else "true" if value else "false"


# Label name -> how an event gives its value; "" when not reported (Prometheus then
# treats the label as absent). Metadata labels are made by `labeler()`.
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
    "agent_name": lambda e: e.agent_name or "",
    "tool_name": lambda e: e.tool_name or "",
}
# A metadata key's label: `llm_gateway_metadata_<key>` (seed 004's name, the one
# exposed); `metadata_<key>`, the name it had before, is accepted in `labels` too.
METADATA_PREFIX: Final = "llm_gateway_metadata_"
OLD_METADATA_PREFIX: Final = "metadata_"
_METADATA_LABEL: Final = re.compile(r"^(?:llm_gateway_)?metadata_([a-zA-Z0-9_]+)$")
# The truefoundry families name these configured labels as that gateway does.
TRUEFOUNDRY_NAMES: Final = {"model": "model_name", "user": "username",
                            "organization": "tenant_name"}


def label_name(name: str) -> str | None:
    """The exposed name of a configured label (a metadata label's seed-004 name), None
    for an unknown one."""
    if name in LABELS:
        return name
    found = _METADATA_LABEL.match(name)
    return METADATA_PREFIX + found.group(1) if found else None


def labeler(name: str) -> Labeler:
    """How an event gives the value of label `name`; KeyError for an unknown label."""
    found = _METADATA_LABEL.match(name)
    if found and name not in LABELS:
        return FieldPath(f"metadata.{found.group(1)}").getter("")
    return LABELS[name]


# --- what counts -----------------------------------------------------------------------
# How the gateway chose the upstream: by the path, the default upstream, or one of a
# semantic router's layers (keyword rules, embeddings similarity, a classifier model).
ROUTING_METHODS: Final = GATEWAY_ROUTING_METHODS | {"heuristic", "semantic", "classifier"}


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
    refusals made before it chose an upstream (no `upstream` on the event) and the calls a
    guardrail blocked (an answer the provider gave, which a rule refused, is no error of
    the provider's)."""
    return (bool(error_type(e)) and e.error_type != GUARDRAIL_BLOCKED
            and not (e.source == "gateway" and e.upstream is None))


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _usage(e: Event) -> bool:
    return e.input_tokens is not None or e.output_tokens is not None


def _policy(name: str) -> Callable[[Event], float | None]:
    return lambda e: 1.0 if e.policies is not None and name in e.policies else None


def _fallback(e: Event) -> float | None:
    return 1.0 if e.fallback or (e.policies is not None and "fallback" in e.policies) else None


def guardrail_outcomes(e: Event) -> list[tuple[Key, float]]:
    """A call the guardrails acted on: once per rule that fired, by rule and action; once,
    with both labels empty, when only `policies` says so."""
    if e.guardrails:
        return [((g.rule, g.action), 1.0) for g in e.guardrails]
    if e.policies is not None and "guardrails" in e.policies:
        return [(("", ""), 1.0)]
    return []


def _model_call_in_agent(e: Event) -> bool:
    """An LLM call an agent made: a model call (not an agent, tool or MCP event) that
    names its agent."""
    return (e.agent_name is not None or e.agent_id is not None) \
        and e.operation not in NON_MODEL_OPERATIONS \
        and not is_mcp_request(e.operation, e.mcp_method, e.mcp_session_id)


_NOT_LETTERS: Final = re.compile(r"[^a-z]")
# error_type spellings, letters only, that say an agent ran out of iterations:
# iteration_limit_reached, IterationLimitError, max_iterations, MaxTurnsExceeded...
ITERATION_LIMIT_WORDS: Final = ("iterationlimit", "maxiteration", "maxturns")


def iteration_limit_reached(e: Event) -> bool:
    """An agent run (`invoke_agent`) that stopped at its iteration limit: its
    `error_type`, lower-cased with everything but letters removed, contains one of
    `ITERATION_LIMIT_WORDS`."""
    if e.operation != "invoke_agent" or not e.error_type:
        return False
    letters = _NOT_LETTERS.sub("", e.error_type.lower())
    return any(word in letters for word in ITERATION_LIMIT_WORDS)


@dataclass(frozen=True)
class MetricDef:
    """One stored metric, or one part of it (`llm_gateway_tokens_total` has two: by
    `type`). `sets`: the sets of families that expose it under its own name (none: it
    is only exposed through a `View`)."""

    name: str  # counters without the `_total` suffix, as prometheus_client wants them
    kind: Kind
    help: str
    value: Callable[[Event], float | None]  # None: the event does not count here
    extra: tuple[str, Callable[[Event], str]] | None = None  # the metric's own label
    buckets: str | None = None  # histograms: which bucket set (see BUCKET_SETS)
    sets: tuple[FamilySet, ...] = STANDARD
    # own labels whose values an event may give several of (`value` is then unused)
    split: tuple[tuple[str, ...], Splitter] | None = None
    bounded: bool = False  # own label values are open-ended: at most max_series series
    # the events it can count: all, or only those `in_scope` keeps (most events are
    # plain model calls: a batch's agent and policy metrics then look at no event)
    scope: Scope = "all"

    @property
    def own_labels(self) -> tuple[str, ...]:
        if self.split is not None:
            return self.split[0]
        return (self.extra[0],) if self.extra is not None else ()


@dataclass(frozen=True)
class View:
    """A stored metric exposed under another name (seed 004's), its values scaled."""

    name: str
    kind: Kind
    help: str
    source: str  # the MetricDef's name
    scale: float = 1.0  # seconds stored, milliseconds exposed: 1000
    sets: tuple[FamilySet, ...] = TRUEFOUNDRY


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
    # --- seed 004: policy activity (`policies`) ---
    MetricDef("llm_gateway_rate_limit_requests", "counter",
              "Calls a rate-limit policy acted on", _policy("rate_limit"), sets=TRUEFOUNDRY,
              scope="policy"),
    MetricDef("llm_gateway_load_balanced_requests", "counter",
              "Calls a load-balancing policy routed", _policy("load_balanced"),
              sets=TRUEFOUNDRY, scope="policy"),
    MetricDef("llm_gateway_fallback_requests", "counter",
              "Calls a fallback policy served from another target", _fallback,
              sets=TRUEFOUNDRY, scope="policy"),
    MetricDef("llm_gateway_budget_requests", "counter", "Calls a budget policy acted on",
              _policy("budget"), sets=TRUEFOUNDRY, scope="policy"),
    MetricDef("llm_gateway_guardrails_requests", "counter",
              "Guardrail rules that fired, by rule and action (monitor, redact, block)",
              lambda e: None, sets=TRUEFOUNDRY,
              split=(("rule", "action"), guardrail_outcomes), bounded=True,
              scope="policy"),
    # --- seed 004: agents and MCP (stored in seconds, exposed in ms by VIEWS) ---
    MetricDef("agent_request_duration", "histogram", "",
              lambda e: _seconds(e.duration_ms) if e.operation == "invoke_agent" else None,
              buckets="duration", sets=(), scope="agent"),
    MetricDef("agent_llm_latency", "histogram", "",
              lambda e: _seconds(e.duration_ms) if _model_call_in_agent(e) else None,
              buckets="duration", sets=(), scope="agent"),
    MetricDef("agent_tool_latency", "histogram", "",
              lambda e: _seconds(e.duration_ms) if e.operation == "execute_tool" else None,
              ("tool_name", lambda e: e.tool_name or ""), buckets="duration", sets=(),
              bounded=True, scope="agent"),
    MetricDef("llm_gateway_agent_tool_calls", "counter", "Tool calls made by agents, by tool",
              lambda e: 1.0 if e.operation == "execute_tool" else None,
              ("tool_name", lambda e: e.tool_name or ""), sets=TRUEFOUNDRY, bounded=True,
              scope="agent"),
    MetricDef("agent_mcp_connect_latency", "histogram", "",
              lambda e: _seconds(e.duration_ms) if e.mcp_method == "initialize" else None,
              buckets="duration", sets=(), scope="agent"),
    MetricDef("llm_gateway_agent_request_iteration_limit_reached", "counter",
              "Agent runs stopped at their iteration limit",
              lambda e: 1.0 if iteration_limit_reached(e) else None, sets=TRUEFOUNDRY,
              scope="agent"),
)

_TOTAL = "a counter, without `_total` so that seed 004's queries find it: use rate()"
VIEWS: Final[tuple[View, ...]] = (
    View("llm_gateway_input_tokens", "untyped", f"Input tokens ({_TOTAL})",
         "llm_gateway_tokens_prompt"),
    View("llm_gateway_output_tokens", "untyped", f"Output tokens ({_TOTAL})",
         "llm_gateway_tokens_completion"),
    View("llm_gateway_request_cost", "untyped", f"Estimated spend, USD ({_TOTAL})",
         "llm_gateway_estimated_cost_usd"),
    View("llm_gateway_request_processing_ms", "histogram",
         "End-to-end duration of LLM calls (ms)", "llm_gateway_request_duration_seconds", 1000),
    View("llm_gateway_first_token_latency_ms", "histogram",
         "Time to the first token of streamed responses (ms)",
         "llm_gateway_time_to_first_token_seconds", 1000),
    View("llm_gateway_inter_token_latency_ms", "histogram",
         "Mean time between tokens of streamed responses (ms)",
         "llm_gateway_inter_token_latency_seconds", 1000),
    View("llm_gateway_request_model_inference_failure", "untyped",
         f"Failed model calls that reached a provider, by error_type ({_TOTAL})",
         "llm_gateway_provider_errors"),
    View("llm_gateway_agent_request_duration_ms", "histogram",
         "Duration of agent runs (invoke_agent, ms)", "agent_request_duration", 1000),
    View("llm_gateway_agent_llm_latency_ms", "histogram",
         "Duration of the LLM calls agents made (ms)", "agent_llm_latency", 1000),
    View("llm_gateway_agent_tool_latency_ms", "histogram",
         "Duration of tool calls (execute_tool, ms), by tool", "agent_tool_latency", 1000),
    View("llm_gateway_agent_mcp_connect_latency_ms", "histogram",
         "Duration of MCP session set-up (initialize, ms)", "agent_mcp_connect_latency", 1000),
)
# Not from events: the daemon's refused reloads (`meterline_config_reloads_total`)
CONFIG_PARSING_FAILURES: Final = "llm_gateway_config_parsing_failures"


def in_scope(events: list[Event], scope: Scope) -> list[Event]:
    """The events a metric of `scope` can count: with policies (or a fallback), or of
    an agent (an agent, tool or MCP event, or a call that names its agent)."""
    if scope == "policy":
        return [e for e in events if e.policies or e.guardrails or e.fallback]
    if scope == "agent":
        return [e for e in events if e.agent_name is not None or e.agent_id is not None
                or e.operation in NON_MODEL_OPERATIONS
                or is_mcp_request(e.operation, e.mcp_method, e.mcp_session_id)]
    return events


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


def counter_sums(events: list[Event], metric: MetricDef) -> dict[Key, float]:
    """A counter's weighted increments over one label set's events, by the values of its
    own labels (`()` when it has none)."""
    if metric.split is not None:
        split = metric.split[1]
        parts: dict[Key, float] = {}
        for e in events:
            for labels, amount in split(e):
                parts[labels] = parts.get(labels, 0.0) + amount * e.sample_weight
        return parts
    value_of = metric.value
    if metric.extra is None:
        found = [v * e.sample_weight for e in events if (v := value_of(e)) is not None]
        return {(): sum(found)} if found else {}
    sums: dict[str, float] = {}
    own_of = metric.extra[1]
    for e in events:
        value = value_of(e)
        if value is not None:
            own = own_of(e)
            sums[own] = sums.get(own, 0.0) + value * e.sample_weight
    return {(own,): amount for own, amount in sums.items()}


def observations(events: list[Event], metric: MetricDef
                 ) -> dict[Key, list[tuple[float, float]]]:
    """A histogram's (value, weight) observations over one label set's events, by the
    values of its own labels."""
    value_of = metric.value
    if metric.extra is None:
        points = [(v, e.sample_weight) for e in events if (v := value_of(e)) is not None]
        return {(): points} if points else {}
    found: dict[Key, list[tuple[float, float]]] = {}
    own_of = metric.extra[1]
    for e in events:
        value = value_of(e)
        if value is not None:
            found.setdefault((own_of(e),), []).append((value, e.sample_weight))
    return found
