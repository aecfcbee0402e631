"""Prometheus and ClickHouse tell the same story: the same events, fed to the real
`prometheus` exporter (the metric families its scrape encodes) and to the real
`clickhouse` exporter (chDB), give the same figures wherever both give one: the FinOps
answers (`finops.spend` by every dimension both have, the analytics API) against the
series of both families of names, summed over the labels a question does not ask for.

A seeded generator makes two days of traffic from three sources: the gateway's calls
(unsampled), a LiteLLM proxy's (sampled: `sample_weight` 2 or 4, its failures kept at 1, as
`keep_errors` does), and agent runs over OTLP (model calls naming their agent or not, tool
calls, MCP `tools/call`, `initialize` and session-only requests), plus a few events as a
JSON client may send them without the cost processor (an empty `error_type` on a 500, a
cache hit with a cost, a saving on a call that was no cache hit). Calls are of several
providers and models (one without a price), teams, keys and users; every status (200,
400, 429, 499, 500, 503, or an `error_type` only); streamed with a time to first token or
not; cache hits; guardrail outcomes. Some events are sent twice (an at-least-once retry,
and an id repeated within a batch): both exporters count them once. Figures are dyadic
fractions, so every sum is exact in any order; counts must be equal, sums equal to 1e-9
relative. The label sets stay well under `max_series` (nothing folds into `__other__`).

What the two give differently by design is listed in docs/exporters.md ("Against FinOps",
in the `prometheus` section) and left out here where a test says so: the latencies of
sampled calls, MCP connects without a duration, guardrail outcomes (rules fired against
calls), agent runs (events against traces).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.samples import Sample

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.event import Event, Guardrail
from meterline.exporters.clickhouse.metrics import (
    IS_MCP_CONNECT,
    IS_MODEL_CALL,
    IS_TOOL_CALL,
    Figure,
)
from meterline.exporters.clickhouse.query import Condition, Reader, Window, dimension
from meterline.exporters.prometheus.exporter import PrometheusConfig, PrometheusExporter
from meterline.exporters.prometheus.metrics import TRUEFOUNDRY_NAMES
from meterline.exporters.prometheus.series import OTHER
from meterline.extensions.finops import analytics, finops
from tests.clickhouse_helpers import clickhouse_exporters
from tests.helpers import make_context

pytestmark = pytest.mark.asyncio(loop_scope="module")  # (the module's one chDB)

SECOND = 10**9
START = datetime(2025, 3, 3, tzinfo=UTC)
# The events' two days, inside a window whose ends are mid-hour: answers read every rollup
# grain and raw events at its ends.
WINDOW = Window(START - timedelta(minutes=90), START + timedelta(days=2, minutes=17))

GATEWAY, SAMPLED, AGENT_SOURCE, CLIENT = "gateway", "litellm", "otlp", "webhook"
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"),
          ("mistral_ai", "mistral-large"), ("vllm", "in-house-7b")]
UNPRICED = "in-house-7b"  # no price: its calls' cost is null
TEAMS = ["search", "support", None]
USERS = ["u1", "u2", "u3", "u4", None]
KEYS = ["k1", "k2", "k3", None]
AGENTS = ["planner", "writer"]
TOOLS = ["search", "fetch", None]
COSTS = (0.03125, 0.125, 0.25, 0.5, 1.0, 2.5)  # dyadic: sums exact in any order
DURATIONS = (37.125, 100.5, 200.25, 400.75, 800.0, 1600.5, None)
TTFTS = (50.5, 80.25, 120.125, None)
# (status, error_type) as sources report calls: statuses alone, both, an error type alone
OUTCOMES = [(200, None)] * 12 + [
    (400, None), (400, "invalid_request_error"), (429, "rate_limit_error"), (429, None),
    (499, None), (499, "timeout"), (500, "server_error"), (500, None),
    (503, "service_unavailable"), (None, "timeout"), (None, "guardrail_blocked"),
    (200, "guardrail_blocked")]


# --- the generator -------------------------------------------------------------------------
class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0

    def instant(self) -> int:
        rng = self.rng
        return int(START.timestamp()) * SECOND + rng.randrange(2 * 86400 - 7200) * SECOND \
            + rng.randrange(SECOND)

    def event(self, timestamp: int, **fields: Any) -> Event:
        self.n += 1
        return Event(event_id=f"agree-{self.n:04d}", timestamp=timestamp, **fields)

    def model_call(self, timestamp: int, source: str, **fields: Any) -> Event:
        """A model call as the cost processor leaves it: a cost when it has usage and its
        model a price, else none; a cache hit costs 0 and saved its price."""
        rng = self.rng
        provider, model = rng.choice(MODELS)
        status, error = rng.choice(OUTCOMES)
        failed = error is not None or (status or 200) >= 400
        used = not failed or (status == 499 and rng.random() < 0.5)  # a stream cut short
        cached = used and not failed and rng.random() < 0.12
        price = None if model == UNPRICED else rng.choice(COSTS)
        streaming = rng.choice([True, False, None])
        weight = 1.0 if source != SAMPLED or failed else rng.choice([1.0, 2.0, 2.0, 4.0])
        return self.event(timestamp, **{
            "source": source, "provider": provider, "operation": rng.choice(["chat", "chat",
                                                                           "embeddings"]),
            **({"response_model": model} if rng.random() < 0.1 else {"request_model": model}),
            "status_code": status, "error_type": error, "streaming": streaming,
            "input_tokens": rng.randrange(1, 4000) if used else None,
            "output_tokens": rng.randrange(800) if used else None,
            "cost_usd": 0.0 if cached else price if used else None,
            "cache_hit": cached or None, "saved_cost_usd": price if cached else None,
            "actual_cost_usd": (rng.choice([price, 0.125]) if source == SAMPLED and used
                                and rng.random() < 0.5 else None),
            "duration_ms": rng.choice(DURATIONS),
            "ttft_ms": rng.choice(TTFTS) if streaming and not failed else None,
            "team": rng.choice(TEAMS), "user_id": rng.choice(USERS),
            **dict(zip(("api_key_id", "api_key_name"), self.key(), strict=True)),
            "guardrails": self.guardrails(), "sample_weight": weight, **fields})

    def key(self) -> tuple[str | None, str | None]:
        key = self.rng.choice(KEYS)
        return key, key and f"{key}-name"

    def guardrails(self) -> list[Guardrail] | None:
        rng = self.rng
        if rng.random() < 0.8:
            return None
        return [Guardrail(rule=rng.choice(["pii", "injection"]), stage="input",
                          action=rng.choice(["monitor", "redact", "block"]))
                for _ in range(rng.randint(1, 2))]

    def run(self, trace: str) -> list[Event]:
        """An agent run over OTLP: its `invoke_agent` event, model calls naming the agent or
        leaving it to the trace, tool calls, MCP requests."""
        rng = self.rng
        agent = rng.choice(AGENTS)
        t = self.instant()
        common = {"source": AGENT_SOURCE, "trace_id": trace}
        out = [self.event(t, operation="invoke_agent", agent_name=agent,
                          duration_ms=rng.choice(DURATIONS), **common,
                          error_type=rng.choice([None, None, "iteration_limit_reached"]))]
        for _ in range(rng.randint(2, 6)):
            t += rng.randrange(1, 600) * SECOND
            kind = rng.random()
            if kind < 0.45:
                out.append(self.model_call(t, AGENT_SOURCE, trace_id=trace,
                                           agent_name=rng.choice([agent, None])))
            elif kind < 0.75:
                out.append(self.tool_call(t, **common))
            elif kind < 0.85:  # through the gateway's MCP upstream: a tool call too
                out.append(self.tool_call(t, provider="mcp", mcp_method="tools/call",
                                          mcp_session_id=rng.choice(["m1", "m2"]), **common))
            elif kind < 0.95:
                out.append(self.event(t, provider="mcp", operation="mcp_initialize",
                                      mcp_method="initialize", mcp_session_id="m1",
                                      duration_ms=rng.choice(DURATIONS), **common))
            else:  # the gateway's GET stream of a session: no method
                out.append(self.event(t, provider="mcp", mcp_session_id="m2",
                                      status_code=200, **common))
        return out

    def tool_call(self, timestamp: int, **fields: Any) -> Event:
        rng = self.rng
        return self.event(timestamp, operation="execute_tool", tool_name=rng.choice(TOOLS),
                          duration_ms=rng.choice(DURATIONS),
                          error_type=rng.choice([None] * 4 + ["tool_error"]), **fields)

    def from_a_client(self) -> list[Event]:
        """Events as a JSON client may send them, through no cost processor."""
        def call(**fields: Any) -> Event:
            return self.model_call(self.instant(), CLIENT, **{
                "status_code": 200, "error_type": None, "cache_hit": None, **fields})

        return [call(status_code=500, error_type="", input_tokens=None, output_tokens=None,
                     cost_usd=None),
                call(cache_hit=True, cost_usd=0.5, saved_cost_usd=0.25),
                call(cache_hit=False, cost_usd=0.25, saved_cost_usd=0.125),
                call(cost_usd=0.125, saved_cost_usd=0.0625)]


def dataset(seed: int = 17) -> list[Event]:
    g = Generator(seed)
    calls = [g.model_call(g.instant(), g.rng.choice([GATEWAY, SAMPLED])) for _ in range(260)]
    return calls + [e for i in range(40) for e in g.run(f"run-{i:02d}")] + g.from_a_client()


EVENTS = dataset()
# The second batch sends some of the first's events again (a client retrying after a
# timeout), the first repeats an id of its own.
BATCHES = [[*EVENTS[:200], EVENTS[10]], [*EVENTS[200:], *EVENTS[100:140]]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stores(tmp_path_factory) -> Any:
    """The events through both exporters: the samples a Prometheus scrape shows, and the
    reader of the ClickHouse tables."""
    tmp = tmp_path_factory.mktemp("agree")
    prometheus = PrometheusExporter(convert({"labels": PROMETHEUS_LABELS}, PrometheusConfig),
                                    make_context(tmp / "prometheus", "prometheus"))
    async with clickhouse_exporters(tmp, repair_interval=0) as make:
        clickhouse = await make("clickhouse")
        for i, batch in enumerate(BATCHES):
            await prometheus.export(ExportBatch(f"b{i}", batch))
            await clickhouse.export(ExportBatch(f"b{i}", batch))
        # (what a scrape encodes; parsing its 3 MB of text back would take 2 s)
        scrape = [s for family in prometheus.snapshot().collect() for s in family.samples]
        assert not [s for s in scrape if OTHER in s.labels.values()], \
            "the generator's label sets must stay under max_series"
        assert clickhouse.reader is not None
        yield scrape, clickhouse.reader


@pytest.fixture
def scrape(stores) -> list[Sample]:
    return stores[0]


@pytest.fixture
def reader(stores) -> Reader:
    return stores[1]


# --- reading the scrape --------------------------------------------------------------------
# The labels every series carries: the defaults, and the dimensions FinOps groups by.
PROMETHEUS_LABELS = ["provider", "model", "status", "streaming", "operation", "team",
                     "api_key_id", "user", "source"]
# A FinOps dimension's label (the truefoundry families rename some: `model_name`...).
LABEL_OF = {"provider": "provider", "model": "model", "team": "team", "api_key": "api_key_id",
            "user": "user", "status": "status", "tool": "tool_name"}
Labels = dict[str, str]
Match = Callable[[Labels], bool]
KeyOf = Callable[[Labels], Any]


def by_label(by: str) -> KeyOf:
    """A sample's group by FinOps dimension `by`, as FinOps reports it: None for "not
    reported", statuses as numbers."""
    name = LABEL_OF[by]
    renamed = TRUEFOUNDRY_NAMES.get(name, name)

    def key(labels: Labels) -> Any:
        value = labels.get(name, labels.get(renamed, ""))
        return None if value == "" else int(value) if by == "status" else value

    return key


def by_labels(*dimensions: str) -> KeyOf:
    keys = [by_label(by) for by in dimensions]
    return lambda labels: tuple(key(labels) for key in keys)


def in_total(labels: Labels) -> str:
    return "TOTAL"


def has(**wanted: str) -> Match:
    return lambda labels: all(labels.get(k) == v for k, v in wanted.items())


ANY = has()


def failed(labels: Labels) -> bool:
    return labels.get("error_type", "") != ""


def unsampled(labels: Labels) -> bool:
    return labels.get("source") != SAMPLED


@dataclass(frozen=True)
class Series:
    """The samples `name` that `match` keeps, their values times `scale`."""

    name: str
    match: Match = ANY
    scale: float = 1.0

    def summed(self, scrape: list[Sample], key: KeyOf, where: Match) -> dict[Any, float]:
        out: dict[Any, float] = defaultdict(float)
        for s in scrape:
            if s.name == self.name and self.match(s.labels) and where(s.labels):
                out[key(s.labels)] += s.value * self.scale
        return dict(out)


def histogram(figure: str, seconds: str, milliseconds: str) -> dict[str, list[Series]]:
    """A latency's sum (ms) and count, as FinOps names them (`figure`_ms_sum...), under
    both families' names."""
    return {f"{figure}_ms_sum": [Series(f"{seconds}_sum", scale=1000),
                                 Series(f"{milliseconds}_sum")],
            f"{figure}_ms_count": [Series(f"{seconds}_count"), Series(f"{milliseconds}_count")]}


# FinOps figure -> every series that shows it, under both families of names.
SPEND_SERIES: dict[str, list[Series]] = {
    "requests": [Series("llm_gateway_requests_total")],
    "errors": [Series("llm_gateway_errors_total"),
               Series("llm_gateway_requests_total", failed)],
    "input_tokens": [Series("llm_gateway_tokens_prompt_total"),
                     Series("llm_gateway_tokens_total", has(type="prompt")),
                     Series("llm_gateway_input_tokens")],
    "output_tokens": [Series("llm_gateway_tokens_completion_total"),
                      Series("llm_gateway_tokens_total", has(type="completion")),
                      Series("llm_gateway_output_tokens")],
    "cost_usd": [Series("llm_gateway_estimated_cost_usd_total"),
                 Series("llm_gateway_request_cost")],
    "cache_hits": [Series("llm_gateway_cache_hits_total")],
    "saved_cost_usd": [Series("llm_gateway_saved_cost_usd_total")],
}
DURATION = histogram("duration", "llm_gateway_request_duration_seconds",
                     "llm_gateway_request_processing_ms")
LATENCY_SERIES = DURATION | histogram("ttft", "llm_gateway_time_to_first_token_seconds",
                                      "llm_gateway_first_token_latency_ms")


# --- comparing -----------------------------------------------------------------------------
Table = dict[Any, dict[str, Any]]


def same(got: Any, want: Any) -> bool:
    """Counts exactly, sums to 1e-9 relative."""
    if isinstance(want, float) and not want.is_integer():
        return got is not None and math.isclose(got, want, rel_tol=1e-9)
    return bool(got == want)


def versus(where: str, finops_side: Table, scrape: list[Sample], key: KeyOf,
           series: dict[str, list[Series]], only: Match = ANY) -> list[str]:
    """How `finops_side` (group -> figure -> value) differs from every series of each of
    its figures, summed by `key` over the samples `only` keeps (a group without samples of
    a series has 0 there; a group only Prometheus has is a difference)."""
    found = []
    for figure, shown in series.items():
        for s in shown:
            sums = s.summed(scrape, key, only)
            found += [f"{where} [{group}] {figure}: FinOps {row[figure]!r}, {s.name} "
                      f"{sums.get(group, 0.0)!r}" for group, row in finops_side.items()
                      if not same(row[figure], sums.get(group, 0.0))]
            found += [f"{where} [{group}] {figure}: only {s.name} has it ({value!r})"
                      for group, value in sums.items() if group not in finops_side]
    return found


def check(found: list[str]) -> None:
    assert not found, f"{len(found)} differences:\n" + "\n".join(found[:20])


def grouped(rows: Iterable[dict[str, Any]], *names: str) -> Table:
    return {row[names[0]] if len(names) == 1 else tuple(row[n] for n in names): row
            for row in rows}


# --- requests, errors, tokens, cost, cache hits --------------------------------------------
@pytest.mark.parametrize("by", ["provider", "model", "team", "api_key", "user", "status"])
async def test_spend_by_a_dimension_agrees_with_every_series(scrape, reader, by):
    """`finops.spend`'s requests, errors, tokens, cost, cache hits and savings per group and
    in total are the series' sums by that label, under both families' names."""
    report = finops.spend(reader, WINDOW, by, top=None)
    check(versus(f"spend by {by}", grouped(report["rows"], by), scrape, by_label(by),
                 SPEND_SERIES)
          + versus("spend's total", {"TOTAL": report["total"]}, scrape, in_total,
                   SPEND_SERIES))


async def test_the_analytics_answers_agree_with_every_series(scrape, reader):
    """Per provider, per model and provider, per user, and the usage totals."""
    models = analytics.models(reader, WINDOW)["models"]
    providers = analytics.providers(reader, WINDOW)["providers"]
    users = analytics.users(reader, WINDOW, limit=1000)["users"]
    usage = analytics.usage_report(reader, WINDOW)["totals"]
    check(versus("models", grouped(models, "model", "provider"), scrape,
                 by_labels("model", "provider"), SPEND_SERIES)
          + versus("providers", grouped(providers, "provider"), scrape, by_label("provider"),
                   SPEND_SERIES)
          + versus("users", grouped(users, "user_id"), scrape, by_label("user"), SPEND_SERIES)
          + versus("usage", {"TOTAL": usage}, scrape, in_total, SPEND_SERIES))


async def test_the_cost_sources_reported_agrees_with_variance(scrape, reader):
    """`llm_gateway_actual_cost_usd` is every reported cost: variance's, with an estimate
    and without."""
    report = finops.variance(reader, WINDOW, "provider", top=None)

    def reported(row: dict[str, Any]) -> dict[str, Any]:
        return {"actual": (row["actual_cost_usd"] or 0)
                + row["actual_cost_without_estimate_usd"]}

    actual = {"actual": [Series("llm_gateway_actual_cost_usd")]}
    check(versus("variance", {r["provider"]: reported(r) for r in report["rows"]}, scrape,
                 by_label("provider"), actual)
          + versus("variance's total", {"TOTAL": reported(report["total"])}, scrape,
                   in_total, actual))


# --- latencies -----------------------------------------------------------------------------
UNSAMPLED = Condition(f"source != '{SAMPLED}'")
LATENCY_FIGURES = tuple(LATENCY_SERIES)


@pytest.mark.parametrize("by", ["provider", "model", "team", "api_key", "user", "status"])
async def test_latency_sums_and_counts_of_unsampled_calls_agree(scrape, reader, by):
    """The duration and time-to-first-token sums and counts FinOps divides for its averages
    are the histograms' `_sum` and `_count`, of the calls no sampler thinned out: a sampled
    call counts `sample_weight` times in a histogram, once in FinOps's latencies (docs/
    exporters.md, "Against FinOps")."""
    rows, total = reader.select_with_total(WINDOW, by=[dimension(by)], filters=[UNSAMPLED],
                                           figures=LATENCY_FIGURES)
    table = {finops.keys(r, dimension(by))[by]: r for r in rows}
    check(versus(f"latencies by {by}", table, scrape, by_label(by), LATENCY_SERIES, unsampled)
          + versus("latencies' total", {"TOTAL": total}, scrape, in_total,
                   LATENCY_SERIES, unsampled))


async def test_a_sampled_calls_latency_counts_its_weight_in_prometheus_once_in_finops(
        scrape, reader):
    """The difference, as documented: the histogram's count is the weighted requests of the
    timed calls, FinOps's count the calls stored."""
    [row] = reader.select(WINDOW, filters=[Condition(f"source = '{SAMPLED}'")], extra={
        "weighted": Figure("requests", "duration_ms IS NOT NULL"),
        "stored": Figure("duration_ms_count")})
    count = DURATION["duration_ms_count"][0]
    histogram_count = count.summed(scrape, in_total, has(source=SAMPLED))["TOTAL"]
    assert histogram_count == row["weighted"] > row["stored"]


# --- agents, tools, MCP --------------------------------------------------------------------
TOOL_CALLS = {"calls": [Series("llm_gateway_agent_tool_calls_total")]}
TOOL_LATENCY = {"duration_ms_sum": [Series("llm_gateway_agent_tool_latency_ms_sum")],
                "duration_ms_count": [Series("llm_gateway_agent_tool_latency_ms_count")]}


async def test_tool_calls_and_their_latency_agree_by_tool(scrape, reader):
    """The `tools` report's calls (`IS_TOOL_CALL`) per tool and in total are the tool-call
    counter's, and all tool calls are `llm_gateway_requests_total{operation="execute_tool"}`;
    the latency sums and counts behind its averages are the tool-latency histogram's (no
    tool call here is sampled)."""
    report = finops.tools(reader, WINDOW, top=None)
    rows, total = reader.select_with_total(WINDOW, by=[dimension("tool")],
                                           filters=[Condition(IS_TOOL_CALL)],
                                           figures=("duration_ms_sum", "duration_ms_count"))
    timed = {finops.keys(r, dimension("tool"))["tool"]: r for r in rows}
    every_tool_call = {"calls": [Series("llm_gateway_requests_total",
                                        has(operation="execute_tool"))]}
    check(versus("tools", grouped(report["rows"], "tool"), scrape, by_label("tool"),
                 TOOL_CALLS)
          + versus("tools' total", {"TOTAL": report["total"]}, scrape, in_total,
                   TOOL_CALLS | every_tool_call)
          + versus("tools' latencies", timed, scrape, by_label("tool"), TOOL_LATENCY)
          + versus("tools' latencies' total", {"TOTAL": total}, scrape, in_total,
                   TOOL_LATENCY))


# What the agent histograms observe, as ClickHouse figures: MCP connects (`initialize`),
# the model calls that name their agent (`IS_MODEL_CALL`, as `_model_call_in_agent`), agent
# runs' own events. FinOps's answers about agents count runs (traces), a call taking its
# trace's agent, and its guardrails answer counts calls, not rules fired: no series shows
# those figures (docs/exporters.md, "Against FinOps").
AGENT_HISTOGRAMS = {
    "connect": ("llm_gateway_agent_mcp_connect_latency_ms", IS_MCP_CONNECT),
    "agent_llm": ("llm_gateway_agent_llm_latency_ms",
                  f"{IS_MODEL_CALL} AND (agent_name != '' OR agent_id != '')"),
    "agent_run": ("llm_gateway_agent_request_duration_ms", "operation = 'invoke_agent'"),
}


async def test_mcp_connects_agent_calls_and_agent_runs_agree_with_the_agent_histograms(
        scrape, reader):
    """Sums and counts of the durations of MCP connects, of the model calls an agent made and
    of agent runs' own events are the agent histograms'; the MCP answer's connect latency
    is their average. (A histogram observes the calls with a duration only: its count is
    `duration_ms_count`, not the `connects` of `analytics.mcp`, which counts them all.)"""
    [row] = reader.select(WINDOW, extra={
        f"{kind}_{figure}": Figure(figure, condition)
        for kind, (_, condition) in AGENT_HISTOGRAMS.items()
        for figure in ("duration_ms_sum", "duration_ms_count")})
    series = {f"{kind}_{part}": [Series(f"{name}_{part.removeprefix('duration_ms_')}")]
              for kind, (name, _) in AGENT_HISTOGRAMS.items()
              for part in ("duration_ms_sum", "duration_ms_count")}
    mcp = analytics.mcp(reader, WINDOW)
    check(versus("agent histograms", {"TOTAL": row}, scrape, in_total, series))
    assert mcp["avg_connect_latency_ms"] == round(
        row["connect_duration_ms_sum"] / row["connect_duration_ms_count"], 1)
