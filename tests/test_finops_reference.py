"""The FinOps answers against a plain-Python reference, over random data and windows cut
anywhere.

A seeded generator makes ten days of events: model calls at any second (and nanosecond),
some exactly on an hour, day or week boundary, of several providers, models, teams, keys,
users and metadata values, organizations, routes and tags, unpriced, sampled, failed or
cancelled, with or without a cost the source reported, guardrail outcomes; and agent runs
(a trace): an `invoke_agent` event or none, model calls naming their own agent or not, tool
calls, MCP requests (with a method, or a session only), a session on some events only,
runs that cross midnight. They are stored through the ClickHouse exporter (chDB), and every
answer of `Reader`, whichever rollups and raw events it reads, must equal what the
reference below computes from the events and the window, following docs/finops.md
literally: spend by every dimension, the `runs` and `tools` reports, growth against the
previous period, variance, every analytics answer, and budgets at a fixed now; the spend
answers while a writer holds hours open too. Latency percentiles (t-digest estimates) are
left out.
"""

from __future__ import annotations

import fnmatch
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from meterline.component import ExportBatch
from meterline.event import Event, Guardrail
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.query import Reader, Window, iso
from meterline.extensions.finops import analytics, budgets, finops
from meterline.extensions.finops.budgets import Budget, BudgetScope
from meterline.gateway.guardrails import GuardrailRule
from tests import clickhouse_data as data
from tests.clickhouse_helpers import clickhouse_exporters

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # (the module's one database)

SECOND = 10**9
START = datetime(2025, 3, 1, tzinfo=UTC)  # a Saturday: weeks (from the epoch) start Thursdays
DAYS = 10
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"),
          ("mistral_ai", "mistral-large")]
KEYS = [("k1", "prod"), ("k2", "staging"), ("k3", "batch"), (None, None)]
AGENTS = ["planner", "writer", "critic"]
TOOLS = ["search", "fetch", "sql"]


# --- the generator ---------------------------------------------------------------------------
class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.first = int(START.timestamp())
        self.last = self.first + DAYS * 86400

    def instant(self) -> int:
        """A time (ns) in the data's days: now and then exactly on an hour, day or week
        boundary, else any second, half of the time at some nanosecond of it."""
        rng = self.rng
        if rng.random() < 0.15:
            grain = rng.choice([3600, 86400, 7 * 86400])
            return rng.choice(range(-(-self.first // grain) * grain, self.last, grain)) * SECOND
        return (rng.randrange(self.first, self.last) * SECOND
                + (rng.randrange(SECOND) if rng.random() < 0.5 else 0))

    def event(self, timestamp: int, **fields: Any) -> Event:
        self.n += 1
        rng = self.rng
        base = {"event_id": f"ev-{self.n:05d}", "timestamp": timestamp, "source": "test",
                "sample_weight": rng.choice([1.0] * 5 + [2.0, 0.5, 4.0]),
                "status_code": rng.choice([200] * 6 + [None, 429, 500, 499]),
                "error_type": rng.choice([None] * 9 + ["timeout", "guardrail_blocked"]),
                "duration_ms": rng.choice([None, round(rng.uniform(1, 90_000), 3)]),
                "guardrails": self.guardrails()}
        return Event(**{**base, **fields})

    def guardrails(self) -> list[Guardrail] | None:
        """Mostly none; else one or two rules that fired, on either side, any action."""
        rng = self.rng
        if rng.random() < 0.75:
            return None
        return [Guardrail(rule=rng.choice(["pii", "injection", "topics"]),
                          stage=rng.choice(["input", "output"]),
                          action=rng.choice(["monitor", "redact", "block"]))
                for _ in range(rng.randint(1, 2))]

    def model_call(self, timestamp: int, **fields: Any) -> Event:
        rng = self.rng
        provider, model = rng.choice(MODELS)
        key_id, key_name = rng.choice(KEYS)
        cost = rng.choice([None, round(rng.uniform(0, 3), 6)])
        cached = rng.random() < 0.1
        metadata = {k: v for k, v in (("customer", rng.choice(["acme", "globex", None])),
                                      ("env", rng.choice(["prod", "dev", None]))) if v}
        return self.event(timestamp, **{
            "provider": provider, "operation": rng.choice(["chat", "chat", "embeddings"]),
            **({"response_model": model} if rng.random() < 0.1 else {"request_model": model}),
            "input_tokens": rng.choice([None, rng.randrange(5000)]),
            "output_tokens": rng.choice([None, rng.randrange(2000)]),
            "cost_usd": 0.0 if cached else cost, "cache_hit": cached or None,
            "saved_cost_usd": cost if cached else None,
            "team": rng.choice(["search", "support", None]),
            "user_id": rng.choice(["u1", "u2", "u3", "u4", None]),
            "api_key_id": key_id, "api_key_name": key_name, "metadata": metadata or None,
            "actual_cost_usd": rng.choice([None, None, round(rng.uniform(0, 3), 6)]),
            "ttft_ms": rng.choice([None, round(rng.uniform(1, 2000), 3)]),
            "organization": rng.choice(["org-a", "org-b", None]),
            "route": rng.choice(["fast", "smart", None]),
            "service_tier": rng.choice(["default", "flex", "priority", None]),
            "tags": rng.choice([None, [], ["a"], ["b"], ["a", "b"], ["c", "a"], ["b", "b"]]),
            **fields})

    def tool_call(self, timestamp: int, **fields: Any) -> Event:
        rng = self.rng
        return self.event(timestamp, **{
            "operation": "execute_tool", "tool_name": rng.choice([*TOOLS, None]),
            "request_bytes": rng.choice([None, rng.randrange(4096)]),
            "response_bytes": rng.choice([None, rng.randrange(65536)]),
            "sample_weight": 1.0, **fields})

    def run(self, trace: str) -> list[Event]:
        """An agent run: its `invoke_agent` event (or none: an agent named by a model call
        only, or no agent at all), model, tool and MCP calls minutes to hours apart, a
        sub-agent's calls and `invoke_agent` now and then (some before the agent's own), a
        session on some events only; a fifth of the runs start in the last minutes of a day."""
        rng = self.rng
        start = self.instant()
        if rng.random() < 0.2:
            start = (start // (86400 * SECOND) + 1) * 86400 * SECOND - rng.randrange(
                1, 900) * SECOND
        t, out = start, []
        for _ in range(rng.randint(1, 6)):
            t += rng.randrange(1, 1800) * SECOND + rng.randrange(SECOND)
            kind = rng.random()
            if kind < 0.55:
                own = rng.choice([None, None, rng.choice(AGENTS)])
                out.append(self.model_call(t, trace_id=trace, agent_name=own))
            elif kind < 0.85:
                out.append(self.tool_call(t, trace_id=trace))
            elif kind < 0.9:  # an MCP tools/call through the gateway: a tool call too
                out.append(self.tool_call(t, trace_id=trace, provider="mcp",
                                          mcp_method="tools/call",
                                          mcp_session_id=rng.choice(["m1", "m2", None])))
            elif kind < 0.93:
                out.append(self.event(t, trace_id=trace, provider="mcp",
                                      operation="mcp_initialize", mcp_method="initialize",
                                      mcp_session_id=rng.choice(["m1", "m3", None])))
            elif kind < 0.95:  # the gateway's MCP GET stream or DELETE: a session, no method
                out.append(self.event(t, trace_id=trace, provider="mcp",
                                      mcp_session_id=rng.choice(["m1", "m2"])))
            else:
                out.append(self.event(t, trace_id=trace, operation="invoke_agent",
                                      agent_name=rng.choice(AGENTS)))  # a sub-agent
        agent = rng.choice([*AGENTS, None])
        if agent:
            at = start + (rng.randrange(1, 120) * SECOND if rng.random() < 0.3 else 0)
            out.append(self.event(
                at, trace_id=trace, operation="invoke_agent", agent_name=agent,
                duration_ms=(t - at) / 1e6 + rng.choice([0, 5000]),
                input_tokens=100, output_tokens=50, cost_usd=0.5))  # (its calls' again)
        session = rng.choice(["s1", "s2", "s3", None])
        for e in rng.sample(out, rng.randint(1, len(out))):
            e.session_id = session
        return [e for e in out if e.timestamp < self.last * SECOND]


def dataset(seed: int = 7) -> list[Event]:
    g = Generator(seed)
    calls = [g.model_call(g.instant(), agent_name=g.rng.choice([None] * 4 + AGENTS),
                          session_id=g.rng.choice([None] * 3 + ["s1", "s4"]))
             for _ in range(600)]
    return calls + [e for i in range(120) for e in g.run(f"t{i:03d}")]


EVENTS = dataset()


def windows(seed: int = 11) -> list[Window]:
    """Ranges ending at any instant (rounded up to its minute, as `--range` is), of 1 hour
    to 10 days; since/until at midnight, at an hour, and mid-minute."""
    rng = random.Random(seed)
    first = int(START.timestamp())
    ending = [Window.parse(f"{n}{unit}", now=datetime.fromtimestamp(
        rng.randrange(first, first + (DAYS + 1) * 86400) + rng.random(), UTC))
        for n, unit in [(1, "h"), (1, "h"), (24, "h"), (1, "d"), (3, "d"), (3, "d"),
                        (7, "d"), (7, "d"), (10, "d")]]
    day, hour = timedelta(days=1), timedelta(hours=1)
    return [*ending, Window(START, START + DAYS * day), Window(START + day, START + 4 * day),
            Window(START + 2 * day + 5 * hour, START + 2 * day + 6 * hour),
            Window(START + 3 * day + 7 * hour, START + 8 * day + 7 * hour),
            Window.parse(since="2025-03-04T10:17:31Z", until="2025-03-06T13:02:07.5Z")]


WINDOWS = windows()
# For the answers that read the same rollups as spend (the module stays well under a
# minute): an hour, 3 and 10 days ending anywhere, whole days, and since/until mid-minute.
FEW_WINDOWS = [WINDOWS[i] for i in (0, 4, 8, 10, 13)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def make_exporter(tmp_path_factory):
    """Exporters on the module's chDB directory (chDB opens one per process)."""
    async with clickhouse_exporters(tmp_path_factory.mktemp("reference"), repair_interval=0,
                                    rollup_metadata=["customer"]) as make:
        yield make


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reader(make_exporter):
    exporter = await make_exporter("reference")
    await exporter.export(ExportBatch("all", EVENTS))
    return exporter.reader


# --- the reference ---------------------------------------------------------------------------
def inside(window: Window) -> list[Event]:
    return data.in_window(EVENTS, window.describe())


def is_model_call(e: Event) -> bool:
    """Not an agent run, tool call or MCP request."""
    return e.operation not in ("invoke_agent", "create_agent", "execute_tool") and not is_mcp(e)


def is_mcp(e: Event) -> bool:
    """An MCP request: an MCP method, session or operation."""
    return bool(e.mcp_method or e.mcp_session_id or (e.operation or "").startswith("mcp_"))


def resolver(events: list[Event], by: str) -> Callable[[Event], str]:
    """An event's agent or session: its own, else its trace's among `events` (those of the
    window): for the agent, the first `invoke_agent` event's, else the first named."""
    if by == "trace":
        return lambda e: e.trace_id or ""
    field = "agent_name" if by == "agent" else "session_id"
    of_trace: dict[str, str] = {}
    ranked = sorted(events, key=lambda e: (e.operation != "invoke_agent", e.timestamp)
                    if by == "agent" else e.timestamp)
    for e in ranked:
        if e.trace_id and getattr(e, field):
            of_trace.setdefault(e.trace_id, getattr(e, field))
    return lambda e: getattr(e, field) or of_trace.get(e.trace_id or "", "")


def run_of(e: Event) -> str:
    """A run: a trace; a call without one is a run of its own."""
    return e.trace_id or e.event_id


def bucketed(events: list[Event], group: Callable[[Event], Any]) -> dict[Any, list[Event]]:
    out: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        out[group(e)].append(e)
    return out


def runs_of(events: list[Event], group: Callable[[Event], str]) -> dict[str, dict[str, Any]]:
    """The `runs` report's figures per group: a run is a trace (a call without one is a run
    of its own); a run's figures in a group are those of its events in that group."""
    return {key: run_figures(list(bucketed(members, run_of).values()))
            for key, members in bucketed(events, group).items()}


def run_figures(runs: list[list[Event]]) -> dict[str, Any]:
    """Runs, their model calls (weighted), tool calls, failed calls and runs, and how long
    they took: from a run's first event's start to the latest end of its events."""
    calls = [e for run in runs for e in run]
    model = data.totals(e for e in calls if is_model_call(e))
    tools = [e for e in calls if e.operation == "execute_tool"]
    timed = [e.duration_ms for e in tools if e.duration_ms is not None]
    starts = [min(e.timestamp for e in run) for run in runs]
    ends = [max(e.timestamp + (e.duration_ms or 0) * 1e6 for e in run) for run in runs]
    return {
        "runs": len(runs), "llm_calls": model["requests"], "cost_usd": model["cost_usd"],
        "input_tokens": model["input_tokens"], "output_tokens": model["output_tokens"],
        "unpriced_llm_calls": model["unpriced_requests"],
        "tool_calls": sum(e.sample_weight for e in tools),
        "avg_tool_latency_ms": sum(timed) / len(timed) if timed else None,
        "errors": sum(e.sample_weight for e in calls if data.is_error(e)),
        "failed_runs": sum(any(map(data.is_error, run)) for run in runs),
        "avg_run_duration_ms": (sum(ends) - sum(starts)) / 1e6 / len(runs) if runs else None,
        "first_seen": second(min(starts)) if runs else None,
        "last_seen": second(max(starts)) if runs else None,
        "agents": sorted({e.agent_name for e in calls if e.agent_name})}


def second(ns: int) -> str:
    return iso(datetime.fromtimestamp(ns // SECOND, UTC))


def tools_of(events: list[Event]) -> dict[str | None, dict[str, Any]]:
    """The `tools` report's figures per tool, and the total (key "TOTAL")."""
    calls = [e for e in events if e.operation == "execute_tool"]
    groups: dict[str | None, list[Event]] = {"TOTAL": calls}
    for e in calls:
        groups.setdefault(e.tool_name or None, []).append(e)
    out = {}
    for key, group in groups.items():
        timed = [e.duration_ms for e in group if e.duration_ms is not None]
        out[key] = {"calls": sum(e.sample_weight for e in group),
                    "errors": sum(e.sample_weight for e in group if data.is_error(e)),
                    "avg_latency_ms": sum(timed) / len(timed) if timed else None,
                    "request_bytes": sum(e.request_bytes or 0 for e in group),
                    "response_bytes": sum(e.response_bytes or 0 for e in group),
                    "runs": len({e.trace_id for e in group if e.trace_id})}
    return out


# --- the comparison --------------------------------------------------------------------------
def close(got: Any, want: Any, field: str) -> bool:
    """Counts and texts exactly; sums to the micro-unit the answers are rounded to; averages
    to their 0.1 ms."""
    if isinstance(want, float | int) and not isinstance(want, bool) and got is not None:
        return math.isclose(got, want, rel_tol=1e-9,
                            abs_tol=0.051 if field.startswith("avg_") else 1.1e-6)
    return bool(got == want)


def differences(where: str, got: dict[Any, dict[str, Any]],
                want: dict[Any, dict[str, Any]]) -> list[str]:
    if got.keys() != want.keys():
        return [f"{where}: groups {sorted(got, key=str)} != {sorted(want, key=str)}"]
    return [f"{where} [{key}] {field}: got {got[key][field]!r}, want {value!r}"
            for key, figures in want.items() for field, value in figures.items()
            if not close(got[key][field], value, field)]


def check(answers: Iterable[tuple[str, dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]],
          ) -> None:
    found = [d for where, got, want in answers for d in differences(where, got, want)]
    assert not found, f"{len(found)} differences:\n" + "\n".join(found[:15])


def where(window: Window) -> str:
    return f"{iso(window.since)}..{iso(window.until)}"


SPEND_DIMENSIONS = ["provider", "model", "team", "api_key", "user", "status", "day", "hour",
                    "metadata.customer", "metadata.env", "tag", "organization", "route",
                    "service_tier"]
SPEND_FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd",
                 "unpriced_requests", "cache_hits", "saved_cost_usd")


def expected(window: Window, by: str, keep: Callable[[Event], bool] = lambda e: True,
             ) -> dict[Any, dict[str, Any]]:
    """What `finops.spend` by `by` must answer over the events `keep` keeps (a filter): per
    group (None: not reported) and in `TOTAL`, the spend figures; by agent, session or trace
    the `runs` report's (an event's agent or session taken from every event of its trace in
    the window, kept or not); by tool the `tools` report's."""
    every = inside(window)
    events = [e for e in every if keep(e)]
    if by == finops.TOOL_DIMENSION:
        return tools_of(events)
    if by in finops.RUN_DIMENSIONS:
        runs = bucketed(events, run_of)
        out = {(k or None): v for k, v in runs_of(events, resolver(every, by)).items()} | {
            "TOTAL": run_figures(list(runs.values()))}
        for figures in out.values():
            if by == "agent":  # (each group is one agent)
                del figures["agents"]
        return out
    groups = {k: data.totals(v) for k, v in groups_of(every, events, by).items()} | {
        "TOTAL": data.totals(events)}
    return {k: {f: v[f] for f in SPEND_FIGURES} for k, v in groups.items()}


def groups_of(every: list[Event], events: list[Event], by: str) -> dict[Any, list[Event]]:
    """`events` by `by` (None: not reported): by tag under each of their tags (once under a
    tag given twice; the untagged under None); by agent or session under their trace's
    among `every` (the window's)."""
    if by == "tag":
        out: dict[Any, list[Event]] = defaultdict(list)
        for e in events:
            for tag in dict.fromkeys(e.tags or [None]):
                out[tag].append(e)
        return out
    of = resolver(every, by) if by in finops.RUN_DIMENSIONS else data.KEYS[by]
    return bucketed(events, lambda e: None if (value := of(e)) in ("", None) else value)


def expected_growth(window: Window, by: str) -> dict[Any, dict[str, float]]:
    """Each group's cost and requests in the window and the one before (model calls only by
    agent or session, each period's runs by their events in it)."""
    out: dict[Any, dict[str, float]] = {}
    for period, prefix in ((window, ""), (window.previous(), "previous_")):
        events = inside(period)
        if by in finops.RUN_DIMENSIONS:
            groups = {k or None: data.totals(v) for k, v in bucketed(
                [e for e in events if is_model_call(e)], resolver(events, by)).items()}
        else:
            groups = data.by(events, by)
        for key, t in groups.items():
            row = out.setdefault(key, dict.fromkeys(
                ("cost_usd", "previous_cost_usd", "requests", "previous_requests"), 0.0))
            row[f"{prefix}cost_usd"], row[f"{prefix}requests"] = t["cost_usd"], t["requests"]
    return out


def compare(reader: Reader, dimensions: Iterable[str]) -> None:
    """`finops.spend` by each dimension over every window against `expected`."""
    def answer(w: Window, by: str) -> dict[Any, dict[str, Any]]:
        report = finops.spend(reader, w, by, top=None)
        return {**{r[by]: r for r in report["rows"]}, "TOTAL": report["total"]}

    check((f"{by} {where(w)}", answer(w, by), expected(w, by))
          for by in dimensions for w in WINDOWS)


# --- the reference: variance, the analytics API, budgets ------------------------------------
def weighted(events: Iterable[Event], field: str = "") -> float:
    """The events' weights summed, or (`field`) their `field` (None: 0) times their weight."""
    return sum(((getattr(e, field) or 0) if field else 1) * e.sample_weight for e in events)


def rate(part: float, whole: float, digits: int = 4) -> float | None:
    return round(part / whole, digits) if whole else None


def average(events: Iterable[Event], field: str = "duration_ms") -> float | None:
    """The mean of `field` over the events that have it (latencies are not weighted)."""
    values = [getattr(e, field) for e in events if getattr(e, field) is not None]
    return sum(values) / len(values) if values else None


def usage_of(events: list[Event], *fields: str) -> dict[str, Any]:
    """`fields` of the events' usage: `data.totals`, the error and success rates, the cost per
    request and per 1K tokens and the average latency."""
    t = data.totals(events)  # (a defaultdict: none of the events, no figure but 0)
    every = t | {
        "error_rate": rate(t["errors"], t["requests"]),
        "success_rate": rate(t["requests"] - t["errors"], t["requests"]),
        "cost_per_request_usd": rate(t["cost_usd"], t["requests"], 6),
        "cost_per_1k_tokens_usd": rate(t["cost_usd"] * 1000, t["total_tokens"], 6),
        "avg_latency_ms": average(events)}
    return {f: every[f] for f in fields}


def variance_of(events: list[Event]) -> dict[str, Any]:
    """The estimate against the reported cost over the requests that have both; those
    reported without an estimate apart; no estimate (None) when none has both."""
    reported = [e for e in events if e.actual_cost_usd is not None]
    both = [e for e in reported if e.cost_usd is not None]
    unestimated = [e for e in reported if e.cost_usd is None]
    estimated, actual = weighted(both, "cost_usd"), weighted(both, "actual_cost_usd")
    compared = [estimated, actual, actual - estimated, rate(actual - estimated, estimated)]
    return {"requests_with_actual": weighted(reported),
            "requests_without_estimate": weighted(unestimated),
            **dict(zip(("estimated_cost_usd", "actual_cost_usd", "variance_usd",
                        "variance_ratio"), compared if both else [None] * 4, strict=True)),
            "actual_cost_without_estimate_usd": weighted(unestimated, "actual_cost_usd")}


def expected_variance(window: Window, by: str) -> dict[Any, dict[str, Any]]:
    """Per group with a reported cost, and in `TOTAL` (model calls only by agent, session or
    trace, which take theirs from the window's events, as the `runs` report)."""
    every = inside(window)
    events = [e for e in every if by not in finops.RUN_DIMENSIONS or is_model_call(e)]
    return {k: variance_of(v) for k, v in groups_of(every, events, by).items()
            if any(e.actual_cost_usd is not None for e in v)} | {"TOTAL": variance_of(events)}


def model_and_provider(e: Event) -> tuple[str | None, str | None]:
    return data.model_of(e) or None, e.provider or None


ROLLING = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
POINT_FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens",
                 "cost_usd", "cache_hits", "saved_cost_usd", "avg_latency_ms")
MODEL_FIGURES = (*POINT_FIGURES, "error_rate", "success_rate")


def expected_models(window: Window) -> dict[Any, dict[str, Any]]:
    """Per model and provider with requests in the window: their figures there, and the
    requests, tokens and cost of the 24h, 7d and 30d up to the window's end."""
    rolling = {label: bucketed(inside(window.ending(length)), model_and_provider)
               for label, length in ROLLING.items()}
    out = {}
    for key, events in bucketed(inside(window), model_and_provider).items():
        out[key] = usage_of(events, *MODEL_FIGURES)
        for label, groups in rolling.items():
            figures = usage_of(groups.get(key, []), "requests", "total_tokens", "cost_usd")
            out[key] |= {f"{label} {f}": value for f, value in figures.items()}
    return out


def expected_timeseries(window: Window, step: int) -> dict[Any, dict[str, Any]]:
    """Every bucket of `step` seconds the window touches, with the figures of its events
    inside the window (zeros and no latency for none)."""
    buckets = bucketed(inside(window), lambda e: e.timestamp // SECOND // step * step)
    first = int(window.since.timestamp()) // step * step
    return {iso(datetime.fromtimestamp(t, UTC)): usage_of(buckets.get(t, []), *POINT_FIGURES)
            for t in range(first, int(window.until.timestamp()), step)}


def expected_providers(window: Window) -> dict[Any, dict[str, Any]]:
    return {p: usage_of(events, *MODEL_FIGURES) | {
        "model_count": len({data.model_of(e) for e in events} - {""})}
        for p, events in bucketed(inside(window), lambda e: e.provider or None).items()}


def expected_performance(window: Window, keep: Callable[[Event], bool],
                         ) -> dict[Any, dict[str, Any]]:
    """Per model and provider, and in `TOTAL`: latency, time to first token, rates, and
    requests and tokens per minute of the window."""
    minutes = window.length / timedelta(minutes=1)

    def performance(events: list[Event]) -> dict[str, Any]:
        t = data.totals(events)
        return {**usage_of(events, "requests", "error_rate", "success_rate", "avg_latency_ms"),
                "avg_ttft_ms": average(events, "ttft_ms"),
                "requests_per_minute": round(t["requests"] / minutes, 4),
                "tokens_per_minute": round(t["total_tokens"] / minutes, 4)}

    events = [e for e in inside(window) if keep(e)]
    return {k: performance(v) for k, v in bucketed(events, model_and_provider).items()} | {
        "TOTAL": performance(events)}


USER_FIGURES = ("requests", "errors", "error_rate", "success_rate", "input_tokens",
                "output_tokens", "total_tokens", "cost_usd", "cost_per_request_usd",
                "cost_per_1k_tokens_usd", "unpriced_requests", "cache_hits", "saved_cost_usd",
                "avg_latency_ms")


def expected_users(window: Window, keep: Callable[[Event], bool]) -> dict[Any, dict[str, Any]]:
    """Per user: usage, and activity: models and providers called, days active (UTC), first
    and last request (to the second), the most tokens of one request, calls blocked."""
    out = {}
    for user, events in bucketed([e for e in inside(window) if keep(e)],
                                 lambda e: e.user_id or None).items():
        days = len({e.timestamp // SECOND // 86400 for e in events})
        out[user] = usage_of(events, *USER_FIGURES) | {
            "unique_models": len({data.model_of(e) for e in events} - {""}),
            "providers": sorted({e.provider for e in events if e.provider}),
            "days_active": days, "avg_requests_per_day": round(weighted(events) / days, 2),
            "first_request": second(min(e.timestamp for e in events)),
            "last_request": second(max(e.timestamp for e in events)),
            "max_tokens_single_request": max((e.input_tokens or 0) + (e.output_tokens or 0)
                                             for e in events),
            "guardrail_violations": weighted(filter(blocked, events))}
    return out


def expected_agents(window: Window) -> dict[Any, dict[str, Any]]:
    """The `runs` report by agent of the events whose run has an agent, and its `TOTAL`."""
    events = inside(window)
    agent = resolver(events, "agent")
    named = [e for e in events if agent(e)]
    out = runs_of(named, agent) | {"TOTAL": run_figures(list(bucketed(named, run_of).values()))}
    for figures in out.values():
        del figures["agents"]
    return out


def expected_mcp(window: Window) -> dict[Any, dict[str, Any]]:
    """MCP requests per method and in `TOTAL`: calls, errors, latency, distinct sessions,
    and in `TOTAL` the connects (`initialize` requests) and their latency."""
    def figures(calls: list[Event]) -> dict[str, Any]:
        return {"errors": weighted(filter(data.is_error, calls)),
                "sessions": len({e.mcp_session_id for e in calls} - {None, ""})}

    calls = [e for e in inside(window) if is_mcp(e)]
    connects = [e for e in calls if e.mcp_method == "initialize"]
    return {method: {"calls": weighted(group), "avg_latency_ms": average(group),
                     **figures(group)}
            for method, group in bucketed(calls, lambda e: e.mcp_method or None).items()} | {
        "TOTAL": {"requests": weighted(calls), "connects": weighted(connects),
                  "avg_connect_latency_ms": average(connects), **figures(calls)}}


def blocked(e: Event) -> bool:
    """A rule that blocks fired on the call, or the gateway's own error says so."""
    return (any(g.action == "block" for g in e.guardrails or ())
            or e.error_type == "guardrail_blocked")


def modified(e: Event) -> bool:
    return any(g.action == "redact" for g in e.guardrails or ()) and not blocked(e)


def flagged(e: Event) -> bool:
    return bool(e.guardrails) or blocked(e)


def guarded(events: list[Event]) -> dict[str, float]:
    return {"blocked": weighted(filter(blocked, events)),
            "modified": weighted(filter(modified, events)),
            "flagged": weighted(filter(flagged, events))}


def rules_of(rules: list[GuardrailRule] | None, model: str | None) -> dict[str, Any]:
    """The rules whose stage (or `both`) and models (wildcards; none: all) apply to `model`."""
    if rules is None:
        return dict.fromkeys(("enabled", "rules_count", "input_rules", "output_rules"))
    inputs, outputs = ({r.name for r in rules if r.stage in (stage, "both") and (
        not r.models or any(fnmatch.fnmatchcase(model or "", m) for m in r.models))}
        for stage in ("input", "output"))
    return {"enabled": bool(inputs | outputs), "rules_count": len(inputs | outputs),
            "input_rules": len(inputs), "output_rules": len(outputs)}


def expected_guardrails(window: Window, provider: str | None,
                        rules: list[GuardrailRule] | None) -> dict[str, dict[Any, Any]]:
    """The platform's figures (`TOTAL`), per model and per user with an outcome, over the
    model calls of `provider` (None: all)."""
    calls = [e for e in inside(window) if is_model_call(e) and provider in (None, e.provider)]
    today = {e.event_id for e in inside(window.ending(min(timedelta(days=1), window.length)))}
    models = {data.model_of(e) for e in calls} - {""}
    total = guarded(calls)
    platform = {
        "total_models": len(models),
        "protected_models": None if rules is None else sum(
            bool(rules_of(rules, m)["rules_count"]) for m in models),
        "total_rules": None if rules is None else len(rules),
        "blocked_today": weighted(e for e in calls if blocked(e) and e.event_id in today),
        "modified_today": weighted(e for e in calls if modified(e) and e.event_id in today),
        "requests": weighted(calls), "blocked": total["blocked"],
        "modified": total["modified"], "block_rate": rate(total["blocked"], weighted(calls))}
    per_model = {}
    for model, group in bucketed(calls, lambda e: data.model_of(e) or None).items():
        figures = guarded(group)
        per_model[model] = rules_of(rules, model) | figures | {
            "total_requests": weighted(group),
            "block_rate": rate(figures["blocked"], weighted(group))}
    per_user = {user: {"requests": weighted(group), **guarded(group)}
                for user, group in bucketed(calls, lambda e: e.user_id or None).items()
                if any(map(flagged, group))}
    for outcomes in per_user.values():
        outcomes["guardrail_violations"] = outcomes.pop("blocked")
    return {"platform": {"TOTAL": platform}, "models": per_model, "users": per_user}


def budget_window(budget: Budget, now: datetime) -> tuple[datetime, datetime]:
    """A calendar day, week (from Monday) or month (UTC), or the rolling window ending at
    the end of now's minute (windows are whole minutes)."""
    if budget.window:
        unit = {"h": "hours", "d": "days"}[budget.window[-1]]
        end = now.replace(second=0, microsecond=0)
        end += timedelta(minutes=1) if end < now else timedelta()
        return end - timedelta(**{unit: int(budget.window[:-1])}), end
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if budget.period == "day":
        return day, day + timedelta(days=1)
    if budget.period == "week":
        return day - timedelta(days=day.weekday()), day + timedelta(days=7 - day.weekday())
    month = day.replace(day=1)
    return month, (month + timedelta(days=32)).replace(day=1)


SCOPED = {"user": lambda e: e.user_id, "team": lambda e: e.team,
          "api_key_id": lambda e: e.api_key_id, "api_key_name": lambda e: e.api_key_name,
          "provider": lambda e: e.provider, "model": data.model_of,
          "api_key": lambda e: e.api_key_id}


def member_of(name: str) -> Callable[[Event], str | None]:
    """A scope key's or `per` member's value of an event (`metadata.KEY` too)."""
    if name.startswith("metadata."):
        return lambda e: (e.metadata or {}).get(name.removeprefix("metadata."))
    return SCOPED[name]


def expected_budgets(budgeted: dict[str, Budget], now: datetime) -> dict[Any, dict[str, Any]]:
    """Per budget (and member: those whose spend reached the lowest threshold, or 1.0): the
    spend of its scope in its window at `now`, against its limit."""
    out = {}
    for name, budget in budgeted.items():
        since, until = budget_window(budget, now)
        scope = budget.scope.describe()
        events = [e for e in inside(Window(since, until))
                  if all(member_of(k)(e) == v for k, v in scope.items())]
        if budget.per is None:
            spends = {None: weighted(events, "cost_usd")}
        else:
            floor = budget.limit_usd * min([*budget.notify_at, 1.0])
            spends = {member: spend for member, group in bucketed(
                events, member_of(budget.per)).items()
                if member and (spend := weighted(group, "cost_usd")) >= floor}
        for member, spend in spends.items():
            used = spend / budget.limit_usd
            reached = max((t for t in budget.notify_at if used >= t), default=None)
            out[name, member] = {
                "period_start": iso(since), "period_end": iso(until), "spend_usd": spend,
                "remaining_usd": max(budget.limit_usd - spend, 0), "utilization": round(used, 4),
                "threshold_reached": reached,
                "status": "exceeded" if used >= 1 else "warning" if reached else "ok"}
    return out


# --- the tests -------------------------------------------------------------------------------
def test_the_data_has_what_the_answers_must_get_right():
    boundaries = [e for e in EVENTS if e.timestamp % (3600 * SECOND) == 0]
    assert {e.timestamp % (7 * 86400 * SECOND) == 0 for e in boundaries} == {True, False}
    days = defaultdict(set)
    for e in EVENTS:
        days[e.trace_id].add(e.timestamp // (86400 * SECOND))
    assert sum(len(d) > 1 for trace, d in days.items() if trace) > 5  # runs across midnight
    assert any(e.cost_usd is None for e in EVENTS) and any(e.sample_weight != 1 for e in EVENTS)
    assert any(e.actual_cost_usd is not None and e.cost_usd is None for e in EVENTS)
    assert any(e.mcp_session_id and not e.mcp_method for e in EVENTS)  # (no model calls)
    assert any(e.tags and len(set(e.tags)) < len(e.tags) for e in EVENTS)  # (counted once)


@in_module_loop
@pytest.mark.parametrize("by", SPEND_DIMENSIONS)
async def test_every_spend_answer_equals_the_reference_over_windows_cut_anywhere(reader, by):
    compare(reader, [by])


@in_module_loop
@pytest.mark.parametrize("by", finops.RUN_DIMENSIONS)
async def test_every_runs_answer_equals_the_reference_over_windows_cut_anywhere(reader, by):
    compare(reader, [by])


@in_module_loop
async def test_every_tools_answer_equals_the_reference_over_windows_cut_anywhere(reader):
    compare(reader, [finops.TOOL_DIMENSION])


@in_module_loop
@pytest.mark.parametrize("by", ["model", "team", "user", "metadata.customer", "metadata.env",
                                "agent", "session"])
async def test_growth_equals_the_reference_of_both_periods(reader, by):
    check((f"growth by {by} {where(w)}",
           {r[by]: r for r in finops.growth(reader, w, by, top=None)["rows"]},
           expected_growth(w, by)) for w in WINDOWS)


@in_module_loop
async def test_every_answer_equals_the_reference_while_a_writer_holds_hours_open(reader):
    """Hours some writer is writing are read from raw events, alongside the rollups."""
    hours = random.Random(3).sample(sorted({e.timestamp // SECOND // 3600 * 3600
                                            for e in EVENTS}), 40)
    repair.open_hours(reader.client, reader.schema, hours, "writing")
    try:
        compare(reader, ["provider", "team", "user", "metadata.customer", "day", "agent",
                         finops.TOOL_DIMENSION])
    finally:
        repair.close_hours(reader.client, reader.schema, hours, "writing")


@in_module_loop
@pytest.mark.parametrize("by", ["provider", "model", "team", "api_key", "user", "status", "day",
                                "metadata.customer", "metadata.env", "tag", "agent", "session",
                                "trace"])
async def test_every_variance_answer_equals_the_reference(reader, by):
    def answer(w: Window) -> dict[Any, dict[str, Any]]:
        report = finops.variance(reader, w, by, top=None)
        return {**{r[by]: r for r in report["rows"]}, "TOTAL": report["total"]}

    check((f"variance by {by} {where(w)}", answer(w), expected_variance(w, by))
          for w in FEW_WINDOWS)


def flat(row: dict[str, Any]) -> dict[str, Any]:
    """A model's row with its rolling figures as `24h requests`..."""
    return row | {f"{label} {f}": value for label, figures in row["rolling"].items()
                  for f, value in figures.items()}


@in_module_loop
async def test_the_models_answer_equals_the_reference(reader):
    check((f"models {where(w)}", {(r["model"], r["provider"]): flat(r) for r in
                                  analytics.models(reader, w)["models"]}, expected_models(w))
          for w in FEW_WINDOWS)


@in_module_loop
@pytest.mark.parametrize(("granularity", "step"), [("hourly", 3600), ("daily", 86400)])
async def test_the_timeseries_answer_equals_the_reference(reader, granularity, step):
    check((f"timeseries {granularity} {where(w)}",
           {p["time"]: p for p in analytics.timeseries(reader, w, granularity)["points"]},
           expected_timeseries(w, step)) for w in FEW_WINDOWS)


@in_module_loop
async def test_the_providers_answer_equals_the_reference(reader):
    check((f"providers {where(w)}", {r["provider"]: r for r in
                                     analytics.providers(reader, w)["providers"]},
           expected_providers(w)) for w in FEW_WINDOWS)


def of_provider(provider: str | None) -> Callable[[Event], bool]:
    return lambda e: provider in (None, e.provider)


@in_module_loop
@pytest.mark.parametrize("group_by", ["model", "provider", "team", "user", "day", "tag",
                                      "metadata.customer", "agent", "session", "trace"])
async def test_the_costs_answer_of_a_provider_equals_the_reference(reader, group_by):
    """Only that provider's events, their agent and session taken from every event of
    their trace."""
    def answer(w: Window) -> dict[Any, dict[str, Any]]:
        report = analytics.costs(reader, w, group_by, provider="openai", limit=1000)
        return {**{r["key"]: r for r in report["costs"]},
                "TOTAL": {"cost_usd": report["total_cost_usd"]}}

    def want(w: Window) -> dict[Any, dict[str, Any]]:
        out = expected(w, group_by, of_provider("openai"))
        return out | {"TOTAL": {"cost_usd": out["TOTAL"]["cost_usd"]}}

    check((f"costs by {group_by} {where(w)}", answer(w), want(w)) for w in FEW_WINDOWS)


@in_module_loop
@pytest.mark.parametrize(("model", "user"), [(None, None), (None, "u2"), ("gpt-4o", "u1")])
async def test_the_usage_answer_equals_the_reference(reader, model, user):
    def answer(w: Window) -> dict[Any, dict[str, Any]]:
        report = analytics.usage_report(reader, w, model_id=model, user_id=user)
        return {**{r["model"]: r for r in report["models"]}, "TOTAL": report["totals"]}

    keep = lambda e: model in (None, data.model_of(e)) and user in (None, e.user_id)  # noqa: E731
    check((f"usage of {model} {user} {where(w)}", answer(w), expected(w, "model", keep))
          for w in FEW_WINDOWS)


@in_module_loop
@pytest.mark.parametrize("model", [None, "gpt-4o"])
async def test_the_performance_answer_equals_the_reference(reader, model):
    def answer(w: Window) -> dict[Any, dict[str, Any]]:
        report = analytics.performance(reader, w, model_id=model)
        return {**{(r["model"], r["provider"]): r for r in report["models"]},
                "TOTAL": report["totals"]}

    keep = lambda e: model in (None, data.model_of(e))  # noqa: E731
    check((f"performance of {model} {where(w)}", answer(w), expected_performance(w, keep))
          for w in FEW_WINDOWS)


@in_module_loop
@pytest.mark.parametrize("provider", [None, "anthropic"])
async def test_the_users_answer_equals_the_reference(reader, provider):
    check((f"users of {provider} {where(w)}", {r["user_id"]: r for r in analytics.users(
        reader, w, provider=provider)["users"]}, expected_users(w, of_provider(provider)))
        for w in FEW_WINDOWS)


@in_module_loop
async def test_the_agents_answer_equals_the_reference(reader):
    def answers(w: Window) -> Iterable[tuple[str, dict[Any, Any], dict[Any, Any]]]:
        report = analytics.agents(reader, w)
        mcp = report["mcp"]
        yield (f"agents {where(w)}", {**{r["agent"]: r for r in report["agents"]},
                                      "TOTAL": report["totals"]}, expected_agents(w))
        yield (f"agents' tools {where(w)}", {**{r["tool"]: r for r in report["tools"]},
                                             "TOTAL": report["tool_totals"]}, tools_of(inside(w)))
        yield (f"mcp {where(w)}", {**{r["method"]: r for r in mcp["methods"]}, "TOTAL": mcp},
               expected_mcp(w))

    check(answer for w in FEW_WINDOWS for answer in answers(w))


RULES = [GuardrailRule(name="pii", action="redact", stage="both", detectors=["email"]),
         GuardrailRule(name="injection", action="block", injection=True, models=["gpt-4o*"]),
         GuardrailRule(name="topics", stage="output", topics=["salary"],
                       models=["claude-*", "mistral-large"])]


@in_module_loop
@pytest.mark.parametrize(("provider", "rules"), [(None, RULES), ("openai", RULES), (None, None)])
async def test_the_guardrails_answer_equals_the_reference(reader, provider, rules):
    def answers(w: Window) -> Iterable[tuple[str, dict[Any, Any], dict[Any, Any]]]:
        report = analytics.guardrails(reader, w, provider=provider, rules=rules)
        got = {"platform": {"TOTAL": report["platform"]},
               "models": {r["model"]: r for r in report["models"]},
               "users": {r["user_id"]: r for r in report["users"]}}
        want = expected_guardrails(w, provider, rules)
        return ((f"guardrails' {part} {where(w)}", got[part], want[part]) for part in got)

    check(answer for w in FEW_WINDOWS for answer in answers(w))


BUDGETS = {
    "all-month": Budget(limit_usd=3000),
    "search-week": Budget(limit_usd=300, period="week", scope=BudgetScope(team="search")),
    "prod-day": Budget(limit_usd=40, period="day", scope=BudgetScope(api_key_name="prod")),
    "k2-24h": Budget(limit_usd=60, window="24h", scope=BudgetScope(api_key_id="k2")),
    "openai-36h": Budget(limit_usd=100, window="36h", scope=BudgetScope(provider="openai")),
    "gpt-4o-month": Budget(limit_usd=500, scope=BudgetScope(model="gpt-4o")),
    "u1-week": Budget(limit_usd=150, period="week", scope=BudgetScope(user="u1")),
    "acme-7d": Budget(limit_usd=300, window="7d",
                      scope=BudgetScope(metadata={"customer": "acme"})),
    "dev-day": Budget(limit_usd=30, period="day", scope=BudgetScope(metadata={"env": "dev"})),
    "u2-support-7d": Budget(limit_usd=50, window="7d",
                            scope=BudgetScope(user="u2", team="support")),
    "per-user-24h": Budget(limit_usd=30, window="24h", per="user", notify_at=[0.5, 1.0]),
    "per-key-month": Budget(limit_usd=800, per="api_key"),
    "per-team-week": Budget(limit_usd=300, period="week", per="team",
                            scope=BudgetScope(provider="anthropic")),
    "per-customer-day": Budget(limit_usd=20, period="day", per="metadata.customer"),
    "per-env-30h": Budget(limit_usd=40, window="30h", per="metadata.env",
                          scope=BudgetScope(team="search")),
}
NOWS = [START + timedelta(days=2, hours=13, minutes=27, seconds=45.5),
        START + timedelta(days=2),  # a Monday's midnight: a day and a week begin
        START + timedelta(days=5, hours=8, minutes=10),
        START + timedelta(days=9, hours=23, minutes=59, seconds=59.9)]


@in_module_loop
@pytest.mark.parametrize("now", NOWS, ids=iso)
async def test_every_budget_equals_the_reference_at_a_fixed_now(reader, now):
    check([(f"budgets at {iso(now)}", {(r["budget"], r["member"]): r for r in budgets.status(
        reader, BUDGETS, now=now)}, expected_budgets(BUDGETS, now))])
