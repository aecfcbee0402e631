"""OpenTelemetry GenAI vocabulary: provider names, operations, error categories.

Every source names providers its own way (`azure-openai`, `bedrock`,
`vertex_ai`...); events carry the `gen_ai.provider.name` values, so that one
query groups the same provider whatever reported it.
"""

from __future__ import annotations

from typing import Any, Final

PROVIDER_ALIASES: Final[dict[str, str]] = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "azure-openai": "azure.ai.openai",
    "azure_openai": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "azure-ai-foundry": "azure.ai.inference",
    "bedrock": "aws.bedrock",
    "aws-bedrock": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "google": "gcp.gemini",
    "mistral": "mistral_ai",
    "mistralai": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x_ai",
    "x-ai": "x_ai",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "perplexity": "perplexity",
    "watsonx": "ibm.watsonx.ai",
    "ollama": "ollama",
    "ollama_chat": "ollama",
    "vllm": "vllm",  # self-hosted: LiteLLM's `hosted_vllm/` is a vLLM server
    "hosted_vllm": "vllm",
}

ERROR_TYPES: Final = ("invalid_request_error", "authentication_error", "rate_limit_error",
                      "server_error", "not_found_error", "service_unavailable", "timeout",
                      "tool_error", "unknown")  # tool_error: a tool answered with an error
# The error type of a call a guardrail blocked: the gateway's decision (before the call, or
# on the answer a provider gave), never a provider's error.
GUARDRAIL_BLOCKED: Final = "guardrail_blocked"


def provider_name(raw: str | None) -> str | None:
    """The `gen_ai.provider.name` for a source's own provider name."""
    if not raw or not isinstance(raw, str):  # (foreign JSON: a list, a number...)
        return None
    key = raw.strip().lower()
    return PROVIDER_ALIASES.get(key, key.replace("-", "_"))


# nginx's status for a call the client gave up on (closed the connection before the
# answer ended: a user pressing "stop"). The call did not fail: it was cancelled by its
# caller, so it has no error category, its span no error status, and it counts in no
# error rate; the status itself tells cancellations apart.
CLIENT_CLOSED: Final = 499


def error_type_for_status(status: int | None) -> str | None:
    """The error category of an HTTP status (None for a success, or a call the client
    cancelled: `CLIENT_CLOSED`)."""
    if status is None or status < 400 or status == CLIENT_CLOSED:
        return None
    if status in (401, 403):
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status in (408, 504):
        return "timeout"
    if status in (502, 503):
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_type_for_name(name: str | None) -> str:
    """The error category of an exception or error-code name (`RateLimitError`...)."""
    text = (name if isinstance(name, str) else "").lower().replace("_", "")  # (foreign JSON)
    for needle, category in _ERROR_NAMES:
        if needle in text:
            return category
    return "unknown"


def error_of(body: Any) -> tuple[list[str], str | None]:
    """The names (most telling first) and the message of a provider's error body: OpenAI's
    `{"error": {type, code, message}}`, Anthropic's `{"type": "error", "error": {type,
    message}}`, Ollama's `{"error": "..."}`, a bare `{type|code, message}` stream event, or
    a bare string."""
    if isinstance(body, str):
        return [], body
    if not isinstance(body, dict):
        return [], None
    error = body.get("error")
    if isinstance(error, dict):
        names, message = [error.get("type"), error.get("code")], error.get("message")
    elif isinstance(error, str):
        names, message = [], error
    else:
        names, message = [body.get("code"), body.get("type")], body.get("message")
    return [n for n in names if isinstance(n, str) and n], str(message) if message else None


def error_type_for_names(names: list[str]) -> str:
    """The category of the first name that tells one (OpenAI's 429 is of `type`
    `requests`, which tells nothing, and `code` `rate_limit_exceeded`)."""
    for name in names:
        if (category := error_type_for_name(name)) != "unknown":
            return category
    return "unknown"


def error_type(status: int | None, name: str | None) -> str | None:
    """The category of a failed call from its HTTP status and the error's name in the
    body. The status decides, unless it only says "client error" or "server error" (or
    the call succeeded at HTTP level and failed in-band) and the name says more: an
    Anthropic 529 `overloaded_error` is `service_unavailable`."""
    by_status = error_type_for_status(status)
    if by_status not in (None, "invalid_request_error", "server_error"):
        return by_status
    by_name = error_type_for_name(name)
    return by_name if by_name != "unknown" else by_status or by_name


def failure(error_type: str | None, status: int | None) -> str | None:
    """The error category of a recorded call: the one it carries, else its status's;
    None for a call that did not fail. Every writer that tells failures apart (metrics,
    span status, log severity) asks this, so that they agree. An empty `error_type` (a
    client's JSON may send one) says nothing, as in ClickHouse, which stores an absent
    string as '': the status decides."""
    return error_type or error_type_for_status(status)


_ERROR_NAMES: Final = (
    ("ratelimit", "rate_limit_error"), ("timeout", "timeout"),
    ("auth", "authentication_error"), ("permission", "authentication_error"),
    ("notfound", "not_found_error"), ("unavailable", "service_unavailable"),
    ("overloaded", "service_unavailable"),
    ("badrequest", "invalid_request_error"), ("invalidrequest", "invalid_request_error"),
    ("contextwindow", "invalid_request_error"),
    ("internalserver", "server_error"), ("apierror", "server_error"),
)


# --- attribute names (OpenTelemetry GenAI semantic conventions) -----------------------
# Event field -> the span/log attribute that carries it. Fields with no GenAI name are
# written as `meterline.<field>`; `params` entries as `gen_ai.request.<key>`.
ATTRIBUTES: Final[dict[str, str]] = {
    "operation": "gen_ai.operation.name",
    "provider": "gen_ai.provider.name",
    "request_model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "streaming": "gen_ai.request.stream",
    "finish_reasons": "gen_ai.response.finish_reasons",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cache_read_tokens": "gen_ai.usage.cache_read.input_tokens",
    "cache_creation_tokens": "gen_ai.usage.cache_creation.input_tokens",
    "reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "error_type": "error.type",
    "status_code": "http.response.status_code",
    "session_id": "gen_ai.conversation.id",
    "agent_name": "gen_ai.agent.name",
    "agent_id": "gen_ai.agent.id",
    "tool_name": "gen_ai.tool.name",
    "tool_call_id": "gen_ai.tool.call.id",
    "mcp_method": "mcp.method.name",  # the OpenTelemetry MCP conventions
    "mcp_session_id": "mcp.session.id",
    "input_messages": "gen_ai.input.messages",
    "output_messages": "gen_ai.output.messages",
}
# `params` keys whose GenAI request attribute has another name.
PARAM_ATTRIBUTES: Final[dict[str, str]] = {"n": "choice.count", "stop": "stop_sequences"}
MESSAGE_FIELDS: Final = ("input_messages", "output_messages")
# Operations that are not one call to a model: agent and tool spans.
NON_MODEL_OPERATIONS: Final = frozenset({"execute_tool", "create_agent", "invoke_agent"})


def is_mcp_request(operation: str | None, mcp_method: str | None,
                   mcp_session_id: str | None) -> bool:
    """An MCP request: one with a method, an `mcp_*` operation (OTLP MCP spans), or only a
    session (the gateway's GET stream or DELETE of a session has no method). No model
    call, whatever else it carries. (The ClickHouse exporter's SQL of it: `IS_MCP`.)"""
    return (mcp_method is not None or mcp_session_id is not None
            or (operation or "").startswith("mcp_"))


# MCP requests (the gateway's MCP upstreams, OTLP MCP spans): the operation of each
# method; `tools/call` is a tool call. Methods the MCP specification does not list are
# `mcp_other`, so that a server's own methods add no operation names.
MCP_TOOL_CALL: Final = "tools/call"
_MCP_OPERATIONS: Final = {
    MCP_TOOL_CALL: "execute_tool",
    "initialize": "mcp_initialize", "ping": "mcp_ping",
    "tools/list": "mcp_list", "prompts/list": "mcp_list", "resources/list": "mcp_list",
    "resources/templates/list": "mcp_list", "roots/list": "mcp_list",
    "prompts/get": "mcp_get_prompt", "resources/read": "mcp_read_resource",
    "resources/subscribe": "mcp_subscribe", "resources/unsubscribe": "mcp_subscribe",
    "completion/complete": "mcp_complete", "logging/setLevel": "mcp_set_logging_level",
    "sampling/createMessage": "mcp_sampling", "elicitation/create": "mcp_elicitation",
}
# JSON-RPC and MCP error codes -> error categories; any other code is `unknown`.
_JSONRPC_ERRORS: Final = {
    -32700: "invalid_request_error",  # parse error
    -32600: "invalid_request_error",  # invalid request
    -32601: "not_found_error",  # method not found
    -32602: "invalid_request_error",  # invalid params
    -32603: "server_error",  # internal error
    -32000: "service_unavailable",  # connection closed
    -32001: "timeout",  # request timeout
    -32002: "not_found_error",  # resource not found
    -32020: "invalid_request_error",  # header mismatch
    -32021: "invalid_request_error",  # missing required client capability
    -32022: "invalid_request_error",  # unsupported protocol version
}


def mcp_operation(method: str) -> str:
    """The `operation` of an MCP request, by its JSON-RPC method."""
    return _MCP_OPERATIONS.get(method) or (
        "mcp_notification" if method.startswith("notifications/") else "mcp_other")


def jsonrpc_error_type(code: int | None) -> str:
    """The error category of a JSON-RPC error code."""
    return _JSONRPC_ERRORS.get(code, "unknown") if code is not None else "unknown"


# The event name of the GenAI log record that carries a whole call.
INFERENCE_EVENT: Final = "gen_ai.client.inference.operation.details"
# Set (true) on the span of a call whose duration was not reported: a span must end, so
# it ends where it starts, and this says that its 0 ms is no measure.
DURATION_UNKNOWN: Final = "meterline.duration_unknown"
# Where Anthropic ran a call (`attributes`: its `usage.inference_geo`, `us` or `global`):
# US-only inference is billed more (the price entry's `data_residency`).
INFERENCE_GEO: Final = "anthropic.inference_geo"
# How fast Anthropic ran a call (`attributes`: its `usage.speed`, `fast` or `standard`):
# fast mode is billed at a multiple of the standard rates (the price entry's `speeds`).
SPEED: Final = "anthropic.speed"

# How the upstream was chosen (`attributes`): by the path's prefix or the default
# upstream (the gateway's), or by a router's heuristic, semantic or classifier method
# (seed 001's; other gateways report them). Other values (any source may set the
# attribute) are not methods the metrics know: they count as `OTHER_ROUTING_METHOD`, so
# they add no series.
ROUTING_ATTRIBUTE: Final = "meterline.routing_method"
ROUTING_METHODS: Final = frozenset({"explicit", "default", "heuristic", "semantic",
                                    "classifier"})
OTHER_ROUTING_METHOD: Final = "__other__"

# --- histogram bucket bounds (the GenAI metric conventions' advice) -----------------
# 0.01 s doubling to 81.92 s
DURATION_BUCKETS: Final = tuple(round(0.01 * 2**i, 2) for i in range(14))
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0)
TIME_PER_TOKEN_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                 0.75, 1.0, 2.5)
TOKEN_BUCKETS: Final = tuple(float(4**i) for i in range(14))  # 1, 4, 16 ... 67108864
