"""The FinOps answers against a plain-Python reference, over random data and windows cut
anywhere.

A seeded generator makes ten days of events: model calls at any second (and nanosecond),
some exactly on an hour, day or week boundary, of several providers, models, teams, keys,
users and metadata values, unpriced, sampled, failed or cancelled; and agent runs (a
trace): an `invoke_agent` event or none, model calls naming their own agent or not, tool
calls, a session on some events only, runs that cross midnight. They are stored through
the ClickHouse exporter (chDB), and every answer of `Reader`, whichever rollups and raw
events it reads, must equal what the reference below computes from the events and the
window, following docs/finops.md literally: spend by every dimension, the `runs` and
`tools` reports, growth against the previous period, and all of them while a writer holds
hours open. Latency percentiles (t-digest estimates) are left out.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from meterline.component import ExportBatch
from meterline.event import Event
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.query import Reader, Window, iso
from meterline.extensions.finops import finops
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
                "error_type": rng.choice([None] * 9 + ["timeout"]),
                "duration_ms": rng.choice([None, round(rng.uniform(1, 90_000), 3)])}
        return Event(**{**base, **fields})

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
                                          mcp_method="tools/call"))
            elif kind < 0.95:
                out.append(self.event(t, trace_id=trace, provider="mcp",
                                      operation="mcp_initialize", mcp_method="initialize"))
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
    operation = e.operation or ""
    return (operation not in ("invoke_agent", "create_agent", "execute_tool")
            and not operation.startswith("mcp_") and not e.mcp_method)


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


def bucketed(events: list[Event], group: Callable[[Event], str]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
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
                    "metadata.customer", "metadata.env"]
SPEND_FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd",
                 "unpriced_requests", "cache_hits", "saved_cost_usd")


def expected(window: Window, by: str) -> dict[Any, dict[str, Any]]:
    """What `finops.spend` by `by` must answer: per group (None: not reported) and in
    `TOTAL`, the spend figures; by agent, session or trace the `runs` report's; by tool the
    `tools` report's."""
    events = inside(window)
    if by == finops.TOOL_DIMENSION:
        return tools_of(events)
    if by in finops.RUN_DIMENSIONS:
        every = bucketed(events, run_of)
        out = {(k or None): v for k, v in runs_of(events, resolver(events, by)).items()} | {
            "TOTAL": run_figures(list(every.values()))}
        for figures in out.values():
            if by == "agent":  # (each group is one agent)
                del figures["agents"]
        return out
    groups = data.by(events, by) | {"TOTAL": data.totals(events)}
    return {k: {f: v[f] for f in SPEND_FIGURES} for k, v in groups.items()}


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


# --- the tests -------------------------------------------------------------------------------
def test_the_data_has_what_the_answers_must_get_right():
    boundaries = [e for e in EVENTS if e.timestamp % (3600 * SECOND) == 0]
    assert {e.timestamp % (7 * 86400 * SECOND) == 0 for e in boundaries} == {True, False}
    days = defaultdict(set)
    for e in EVENTS:
        days[e.trace_id].add(e.timestamp // (86400 * SECOND))
    assert sum(len(d) > 1 for trace, d in days.items() if trace) > 5  # runs across midnight
    assert any(e.cost_usd is None for e in EVENTS) and any(e.sample_weight != 1 for e in EVENTS)


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
