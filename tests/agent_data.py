"""Known agent runs, tool calls, MCP requests and guardrail outcomes, and the rules of a
gateway, with the figures the agents and guardrails answers must give for them.

Every event is 10 to 40 minutes old (clear of the 24h window's edges); costs and
latencies are dyadic fractions, so sums are exact.
"""

from __future__ import annotations

import time

from meterline.event import Event, Guardrail

MINUTE = 60 * 10**9

# The gateway's guardrails (its `guardrails:` option).
RULES = [
    {"name": "no-pii", "detectors": ["email"], "stage": "both", "action": "redact"},
    {"name": "no-injection", "injection": True, "action": "block"},
    {"name": "no-weapons", "topics": ["explosives"], "stage": "both", "action": "block",
     "models": ["gpt-4o*"]},
    {"name": "key-watch", "detectors": ["openai_key"], "stage": "output", "action": "monitor",
     "models": ["claude-*"]},
]


def events(now_ns: int | None = None) -> list[Event]:
    now = now_ns or time.time_ns()
    n = 0

    def event(minutes_ago: float, **fields: object) -> Event:
        nonlocal n
        n += 1
        base: dict[str, object] = {"event_id": f"agent-{n:03d}", "source": "otlp",
                                   "timestamp": now - int(minutes_ago * MINUTE) - n}
        return Event(**{**base, **fields})  # type: ignore[arg-type]

    def llm(minutes_ago: float, cost: float, model: str = "gpt-4o", **fields: object) -> Event:
        return event(minutes_ago, **{
            "provider": "openai", "operation": "chat", "request_model": model,
            "status_code": 200, "input_tokens": 100, "output_tokens": 50, "duration_ms": 500.0,
            "cost_usd": cost, **fields})

    def tool(minutes_ago: float, name: str, ms: float, **fields: object) -> Event:
        return event(minutes_ago, **{
            "operation": "execute_tool", "tool_name": name, "duration_ms": ms,
            "request_bytes": 64, "response_bytes": 256, **fields})

    return [
        # run t1, agent planner (named by its invoke_agent event only), session s1: two
        # model calls (0.25 + 0.5), two tool calls; the agent event's own usage and cost
        # (a source that reports them) must not count again
        event(40, trace_id="t1", operation="invoke_agent", agent_name="planner",
              session_id="s1", duration_ms=4000.0, input_tokens=200, output_tokens=100,
              cost_usd=0.75, attributes={"gen_ai.usage.input_tokens": 200}),
        llm(39.9, 0.25, trace_id="t1"),
        tool(39.5, "search", 100.0, trace_id="t1"),
        tool(39.0, "search", 300.0, trace_id="t1"),
        llm(38.5, 0.5, trace_id="t1"),
        # run t2, agent planner, session s1: one model call (1.0), a failed tool call
        event(30, trace_id="t2", operation="invoke_agent", agent_name="planner",
              session_id="s1", duration_ms=2000.0),
        llm(29.9, 1.0, trace_id="t2"),
        tool(29.5, "fetch", 50.0, trace_id="t2", error_type="tool_error"),
        # run t3: model calls naming their agent (writer), no agent event; session s2
        llm(20, 2.0, trace_id="t3", agent_name="writer", session_id="s2",
            model="claude-sonnet-4"),
        llm(19.5, 2.0, trace_id="t3", agent_name="writer", session_id="s2",
            model="claude-sonnet-4"),
        # MCP through the gateway: two connects (40 and 60 ms), a list, a tool call
        event(15, source="gateway", provider="mcp", operation="mcp_initialize",
              mcp_method="initialize", mcp_session_id="m1", duration_ms=40.0, status_code=200),
        event(14, source="gateway", provider="mcp", operation="mcp_initialize",
              mcp_method="initialize", mcp_session_id="m2", duration_ms=60.0, status_code=200),
        event(13, source="gateway", provider="mcp", operation="mcp_list",
              mcp_method="tools/list", mcp_session_id="m1", duration_ms=10.0, status_code=200),
        tool(12, "search", 200.0, source="gateway", provider="mcp", mcp_method="tools/call",
             mcp_session_id="m1", status_code=200),
        # guardrail outcomes, no agent: gpt-4o blocked twice (one also redacted), redacted
        # once, monitored once; claude redacted once (by LiteLLM)
        llm(10, 0.125, trace_id="g1", user_id="u1", status_code=400,
            error_type="guardrail_blocked", cost_usd=None, input_tokens=None,
            output_tokens=None,
            guardrails=[Guardrail(rule="no-injection", stage="input", action="block",
                                  detector="ignore_instructions")]),
        llm(10, 0.125, trace_id="g2", user_id="u1", status_code=400,
            error_type="guardrail_blocked", cost_usd=None,
            guardrails=[Guardrail(rule="no-pii", stage="input", action="redact",
                                  detector="email"),
                        Guardrail(rule="no-weapons", stage="output", action="block",
                                  detector="explosives")]),
        llm(10, 0.125, trace_id="g3", user_id="u2",
            guardrails=[Guardrail(rule="no-pii", stage="output", action="redact",
                                  detector="email")]),
        llm(10, 0.125, trace_id="g4", user_id="u2",
            guardrails=[Guardrail(rule="secrets", stage="input", action="monitor")]),
        llm(10, 0.125, trace_id="g5", user_id="u3", model="claude-sonnet-4", source="litellm",
            guardrails=[Guardrail(rule="presidio", stage="input", action="redact",
                                  detector="EMAIL_ADDRESS")]),
    ]
