"""OTLP agent, tool and MCP spans to events: GenAI `invoke_agent`, `create_agent` and
`execute_tool` spans, and the OpenTelemetry MCP conventions' spans (`mcp.method.name`)."""

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from meterline.event import Event
from meterline.exporters.otlp.encode import to_logs_request, to_traces_request
from meterline.receivers.decoders.otlp import decode_logs, decode_spans
from tests.helpers import make_event
from tests.test_otlp_decode import START, TRACE, one, request, span

PARENT = "00f067aa0ba902b7"


def decoded(attrs, **kw) -> Event:
    return one(decode_spans(request(span(attrs, **kw))))


def rejected(attrs) -> str:
    result = decode_spans(request(span(attrs)))
    assert not result.events
    [reason] = result.rejected
    return reason


# --- execute_tool ------------------------------------------------------------------------
def test_an_execute_tool_span_becomes_a_tool_call_event():
    event = decoded({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_weather",
                     "gen_ai.tool.call.id": "call_mszuSIzqtI65i1wAUOE8w5H4",
                     "gen_ai.tool.type": "function"},
                    name="execute_tool get_weather", parent_span_id=bytes.fromhex(PARENT))
    assert (event.operation, event.tool_name, event.tool_call_id) == (
        "execute_tool", "get_weather", "call_mszuSIzqtI65i1wAUOE8w5H4")
    assert (event.trace_id, event.parent_span_id) == (TRACE, PARENT)
    assert (event.timestamp, event.duration_ms) == (START, 250.0)
    assert event.attributes == {"gen_ai.tool.type": "function", "service.name": "checkout"}


def test_a_tool_calls_arguments_and_result_are_recorded_as_sizes_not_content():
    event = decoded({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                     "gen_ai.tool.call.arguments": '{"q": "café"}',
                     "gen_ai.tool.call.result": ["a", "b"]})
    assert (event.request_bytes, event.response_bytes) == (len('{"q": "café"}'.encode()),
                                                           len(b'["a","b"]'))
    assert "gen_ai.tool.call.arguments" not in (event.attributes or {})
    assert "gen_ai.tool.call.result" not in (event.attributes or {})


def test_a_failed_tool_call_has_its_error_category_and_message():
    event = decoded({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search",
                     "error.type": "TimeoutError"},
                    status=Status(code=Status.STATUS_CODE_ERROR, message="took too long"))
    assert (event.error_type, event.error_message) == ("timeout", "took too long")


# --- invoke_agent / create_agent -----------------------------------------------------------
def test_an_invoke_agent_span_becomes_an_agent_event_its_usage_kept_aside():
    event = decoded({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "Math Tutor",
                     "gen_ai.agent.id": "asst_5j66UpCpwteGg4YSxUnt7lPY",
                     "gen_ai.conversation.id": "conv_5j66UpCpwteGg4YSxUnt7lPY",
                     "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
                     "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 45},
                    name="invoke_agent Math Tutor")
    assert (event.operation, event.agent_name, event.agent_id) == (
        "invoke_agent", "Math Tutor", "asst_5j66UpCpwteGg4YSxUnt7lPY")
    assert event.session_id == "conv_5j66UpCpwteGg4YSxUnt7lPY"
    assert (event.provider, event.request_model) == ("openai", "gpt-4o")
    # the run's usage is its model calls' (events of their own): not counted twice
    assert (event.input_tokens, event.output_tokens) == (None, None)
    assert (event.attributes["gen_ai.usage.input_tokens"],
            event.attributes["gen_ai.usage.output_tokens"]) == (120, 45)


def test_a_create_agent_span_becomes_an_agent_event():
    event = decoded({"gen_ai.operation.name": "create_agent", "gen_ai.agent.name": "Math Tutor",
                     "gen_ai.system": "az.ai.inference"})
    assert (event.operation, event.agent_name, event.provider) == (
        "create_agent", "Math Tutor", "az.ai.inference")
    assert event.input_tokens is None


def test_an_llm_call_made_by_an_agent_names_the_agent():
    event = decoded({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                     "gen_ai.agent.name": "Math Tutor"})
    assert (event.operation, event.agent_name) == ("chat", "Math Tutor")


# --- MCP ----------------------------------------------------------------------------------
MCP_CALL = {"mcp.method.name": "tools/call", "gen_ai.tool.name": "get-weather",
            "jsonrpc.request.id": "5", "mcp.session.id": "191c4850af6c49e08843a3f6c80e5046",
            "mcp.protocol.version": "2025-06-18", "network.transport": "tcp",
            "server.address": "mcp.example.com", "server.port": 443}


def test_an_mcp_tools_call_span_is_a_tool_call_with_its_method_and_session():
    event = decoded(MCP_CALL, name="tools/call get-weather")
    assert (event.operation, event.tool_name) == ("execute_tool", "get-weather")
    assert (event.mcp_method, event.mcp_session_id) == (
        "tools/call", "191c4850af6c49e08843a3f6c80e5046")
    assert event.attributes == {
        "jsonrpc.request.id": "5", "mcp.protocol.version": "2025-06-18",
        "network.transport": "tcp", "server.address": "mcp.example.com", "server.port": 443,
        "service.name": "checkout"}


@pytest.mark.parametrize(("method", "operation"), [
    ("initialize", "mcp_initialize"), ("tools/list", "mcp_list"), ("prompts/list", "mcp_list"),
    ("resources/list", "mcp_list"), ("prompts/get", "mcp_get_prompt"),
    ("resources/read", "mcp_read_resource"), ("ping", "mcp_ping"),
    ("notifications/initialized", "mcp_notification"),
    ("sampling/createMessage", "mcp_sampling"), ("vendor/custom", "mcp_other")])
def test_other_mcp_methods_have_a_stable_operation(method, operation):
    event = decoded({"mcp.method.name": method})
    assert (event.operation, event.mcp_method) == (operation, method)


def test_an_mcp_method_decides_the_operation_over_a_genai_one():
    event = decoded({"mcp.method.name": "tools/list", "gen_ai.operation.name": "chat"})
    assert event.operation == "mcp_list"


@pytest.mark.parametrize(("code", "category"), [
    ("-32602", "invalid_request_error"), ("-32601", "not_found_error"),
    ("-32603", "server_error"), ("-32001", "timeout"), ("-1", "unknown")])
def test_an_mcp_json_rpc_error_code_gives_the_error_category_and_stays_an_attribute(
        code, category):
    event = decoded({**MCP_CALL, "error.type": code, "rpc.response.status_code": code},
                    status=Status(code=Status.STATUS_CODE_ERROR, message="Invalid params"))
    assert (event.error_type, event.error_message) == (category, "Invalid params")
    assert event.attributes["error.type"] == code


def test_an_older_mcp_span_with_rpc_jsonrpc_error_code_gives_the_error_category():
    event = decoded({**MCP_CALL, "error.type": "tool_error", "rpc.jsonrpc.error_code": -32602})
    assert event.error_type == "invalid_request_error"
    assert event.attributes["error.type"] == "tool_error"


@pytest.mark.parametrize("attribute", ["rpc.response.status_code", "rpc.jsonrpc.error_code"])
@pytest.mark.parametrize("status", [Status(code=Status.STATUS_CODE_ERROR), Status()])
def test_an_mcp_error_code_alone_gives_the_error_category(attribute, status):
    # no error.type: the code, with the span's error status or without it
    event = decoded({**MCP_CALL, attribute: "-32602"}, status=status)
    assert event.error_type == "invalid_request_error"
    assert "error.type" not in event.attributes


def test_a_tool_error_without_a_code_is_a_tool_error():
    event = decoded({**MCP_CALL, "error.type": "tool_error"},
                    status=Status(code=Status.STATUS_CODE_ERROR))
    assert event.error_type == "tool_error"


# --- joining the trace, logs, round trips -------------------------------------------------
def test_an_agent_run_its_llm_call_and_its_tool_call_join_one_trace():
    agent, llm, tool = decode_spans(request(
        span({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner"},
             span_id="0000000000000001"),
        span({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"},
             span_id="0000000000000002", parent_span_id=bytes.fromhex("0000000000000001")),
        span({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"},
             span_id="0000000000000003", parent_span_id=bytes.fromhex("0000000000000001")),
    )).events
    assert {agent.trace_id, llm.trace_id, tool.trace_id} == {TRACE}
    assert llm.parent_span_id == tool.parent_span_id == agent.span_id
    assert [e.operation for e in (agent, llm, tool)] == ["invoke_agent", "chat", "execute_tool"]


def test_an_agent_log_record_becomes_an_event_too():
    event = make_event(1, operation="execute_tool", tool_name="search", request_model=None,
                       input_tokens=None, output_tokens=None)
    [got] = decode_logs(to_logs_request([event])).events
    assert (got.operation, got.tool_name) == ("execute_tool", "search")


def test_what_the_otlp_exporter_writes_for_a_tool_call_comes_back_as_the_same_event():
    event = make_event(1, trace_id=TRACE, span_id="a1b2c3d4e5f60718", operation="execute_tool",
                       tool_name="get-weather", tool_call_id="call-1", mcp_method="tools/call",
                       mcp_session_id="s-1", agent_name="planner", agent_id="a-1",
                       request_bytes=12, response_bytes=340)
    assert one(decode_spans(to_traces_request([event]))) == event


# --- hostile input: refused alone, with the attribute named -------------------------------
@pytest.mark.parametrize(("attribute", "value"), [
    ("gen_ai.agent.name", 42), ("gen_ai.tool.name", ["a", "b"]), ("mcp.method.name", True),
    ("mcp.session.id", {"k": "v"}), ("gen_ai.tool.call.id", 1.5)])
def test_an_agent_or_mcp_name_that_is_not_a_string_is_refused_naming_the_attribute(
        attribute, value):
    reason = rejected({"gen_ai.operation.name": "execute_tool", attribute: value})
    assert attribute in reason and "span 'chat gpt-4o'" in reason


def test_an_oversized_tool_name_is_refused_as_out_of_bounds_beside_a_valid_span():
    result = decode_spans(request(
        span({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "t" * 5000},
             span_id="0000000000000001"),
        span({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "ok"},
             span_id="0000000000000002")))
    assert [e.tool_name for e in result.events] == ["ok"]
    [reason] = result.rejected
    assert reason.startswith("span 'chat gpt-4o': out of bounds (gen_ai.tool.name)")


def test_a_control_character_in_an_mcp_session_id_is_refused():
    reason = rejected({"mcp.method.name": "tools/list", "mcp.session.id": "a\x00b"})
    assert "out of bounds (mcp.session.id)" in reason


def test_tool_arguments_of_any_type_give_a_size_or_none_never_an_error():
    for value in (b"\x00\x01", {"a": [1, 2.5, None]}, True, 3, ""):
        event = decoded({"gen_ai.operation.name": "execute_tool",
                         "gen_ai.tool.call.arguments": value})
        assert event.request_bytes is not None and event.request_bytes >= 0
