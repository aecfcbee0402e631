"""Receiver `otlp`, end to end: an application instrumented with the OpenTelemetry SDK sends
an agent run (`invoke_agent`), its LLM call, its tool call (`execute_tool`) and the MCP
request the tool makes (`tools/call`); each becomes an event joined to the same trace."""

import asyncio

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.helpers import metric_value
from tests.test_otlp_receiver import GENAI, Ports, received, running_receiver

AGENT = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
         "gen_ai.agent.id": "agent-7", "gen_ai.conversation.id": "conv-1",
         "gen_ai.provider.name": "openai"}
TOOL = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get-weather",
        "gen_ai.tool.call.id": "call-42", "gen_ai.tool.type": "extension",
        "gen_ai.tool.call.arguments": '{"city":"Paris"}'}
MCP = {"mcp.method.name": "tools/call", "gen_ai.tool.name": "get-weather",
       "gen_ai.operation.name": "execute_tool", "mcp.session.id": "sess-9",
       "jsonrpc.request.id": "3", "network.transport": "tcp",
       "server.address": "weather.example", "server.port": 8443}


def agent_run():
    """The spans of one agent run, as the SDK finishes them."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "assistant"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("agent-app")
    span = tracer.start_as_current_span
    with span("POST /ask", kind=SpanKind.SERVER), \
            span("invoke_agent planner", attributes=AGENT) as agent:
        with span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=GENAI):
            pass
        with span("execute_tool get-weather", attributes=TOOL), \
                span("tools/call get-weather", kind=SpanKind.CLIENT, attributes=MCP) as mcp:
            mcp.set_attribute("error.type", "-32602")
            mcp.set_attribute("rpc.response.status_code", "-32602")
            mcp.set_status(StatusCode.ERROR, "Invalid params")
    provider.shutdown()
    return memory.get_finished_spans(), agent.get_span_context()


async def test_the_sdk_sends_an_agent_run_whose_agent_tool_and_mcp_spans_become_events(
        tmp_path):
    ports = Ports()
    spans, agent = agent_run()
    trace_id = f"{agent.trace_id:032x}"
    async with running_receiver(ports, tmp_path) as service:
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{ports.grpc}", insecure=True)
        assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
        events = {e["operation"] + (f" {e['mcp_method']}" if "mcp_method" in e else ""): e
                  for e in await received(tmp_path, 4)}
        skipped = metric_value(service.telemetry.registry,
                               "meterline_receiver_refused_events_total", reason="not_llm_call")
    assert sorted(events) == ["chat", "execute_tool", "execute_tool tools/call", "invoke_agent"]
    assert {e["trace_id"] for e in events.values()} == {trace_id}
    assert skipped == 1  # the HTTP handler's span

    run = events["invoke_agent"]
    assert (run["agent_name"], run["agent_id"], run["session_id"], run["provider"]) == (
        "planner", "agent-7", "conv-1", "openai")
    assert events["chat"]["parent_span_id"] == run["span_id"]

    tool = events["execute_tool"]
    assert (tool["tool_name"], tool["tool_call_id"], tool["request_bytes"]) == (
        "get-weather", "call-42", len('{"city":"Paris"}'))
    assert tool["parent_span_id"] == run["span_id"] and tool["duration_ms"] >= 0

    mcp = events["execute_tool tools/call"]
    assert (mcp["tool_name"], mcp["mcp_session_id"]) == ("get-weather", "sess-9")
    assert (mcp["error_type"], mcp["error_message"]) == ("invalid_request_error",
                                                         "Invalid params")
    assert mcp["parent_span_id"] == tool["span_id"]
    assert mcp["attributes"]["server.address"] == "weather.example"
