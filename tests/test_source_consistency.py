"""One call, every source: the FinOps figures of an LLM call (tokens, cost, errors, latency)
do not depend on which source reported it.

For a handful of canonical calls, each source's payload is built as that source writes it,
and decoded through meterline's own decoders, then priced by the `cost` processor:

- the gateway: the provider's answer (built with the openai and anthropic SDKs' own types)
  read by the gateway's shapes; the gateway measures duration and time to first token
  itself, in milliseconds, so its timings are the reference;
- LiteLLM 1.100.5: its `StandardLoggingPayload` (the payload captured from the real proxy,
  tests/fixtures/litellm-*-payload.json), with the `usage` LiteLLM 1.100.5 makes of the
  provider's answer (`AnthropicConfig.calculate_usage`, `VertexGeminiConfig._calculate_usage`,
  run on these answers; its `prompt_tokens` counts cache reads and writes);
- an OpenTelemetry GenAI span (`gen_ai.usage.*`, whose input and output totals include the
  cache and reasoning counts);
- Otoroshi's `LLMUsageAudit` (the real event in ../shared/fixtures), whose `usage` its
  provider clients fill in: OpenAI's `prompt_tokens` / `completion_tokens` /
  `completion_tokens_details.reasoning_tokens`, Anthropic's own `input_tokens` /
  `output_tokens`, and `-1` for a count the provider did not send.

What a source does not carry is stated where it is compared (docs/receivers.md, "The same
call from every source", lists it):

| | gateway | LiteLLM | OTLP span | Otoroshi |
|---|---|---|---|---|
| cache reads / writes | yes | yes | yes | no: Anthropic's input is then its uncached part |
| time to first token | yes | yes | no | no |
| HTTP status of a failure | yes | yes | no | no |
| reported cost | no (estimated) | `response_cost` | no | `costs.total_cost` |
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Message, TextBlock
from anthropic.types import Usage as AnthropicUsage
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from meterline.config import convert
from meterline.event import Event
from meterline.exporters.otlp.encode import any_value
from meterline.gateway.shapes import read_error, shape_for
from meterline.genai import provider_name
from meterline.processors.cost import CostConfig, CostProcessor
from meterline.receivers.decoders import decode_item
from meterline.receivers.decoders.otlp import decode_spans
from tests.helpers import FIXTURES, make_context
from tests.test_otlp_decode import request

START_S = 1_780_000_000.25  # the call's start, epoch seconds
START_NS = 1_780_000_000_250_000_000
LITELLM_STREAM = json.loads((FIXTURES / "litellm-stream-payload.json").read_text())
LITELLM_FAILURE = json.loads((FIXTURES / "litellm-failure-429-payload.json").read_text())
LITELLM_CACHE_HIT = json.loads((FIXTURES / "litellm-cache-hit-payload.json").read_text())
OTOROSHI = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())


@dataclass(frozen=True)
class Call:
    """A canonical call: what the provider answered, and when."""

    provider: str  # as each source names it (LiteLLM's provider, Otoroshi's provider_kind)
    path: str  # the gateway's path to the provider's API
    model: str
    request: dict[str, Any]  # the request body
    response: dict[str, Any]  # the provider's answer (or its error body)
    litellm_usage: dict[str, Any]  # LiteLLM 1.100.5's usage of that answer
    otel_usage: dict[str, int]  # the span's `gen_ai.usage.*`, as the conventions count
    otoroshi_usage: dict[str, int]  # Otoroshi's usage of that answer
    duration_ms: float = 1800.0
    ttft_ms: float | None = None
    status: int = 200


def _openai(model: str, prompt: int, cached: int, completion: int, reasoning: int) -> Call:
    usage = CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached, audio_tokens=0),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))
    answer = ChatCompletion(
        id="chatcmpl-1", object="chat.completion", created=1_780_000_000,
        model=f"{model}-2025-04-16",
        choices=[{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": "Paris."}}], usage=usage)
    return Call(
        provider="openai", path="/v1/chat/completions", model=model,
        request={"model": model, "messages": [{"role": "user", "content": "Capital of France?"}]},
        response=answer.model_dump(mode="json"),
        litellm_usage=usage.model_dump(mode="json"),  # OpenAI's usage, passed through
        otel_usage={"input_tokens": prompt, "cache_read.input_tokens": cached,
                    "output_tokens": completion, "reasoning.output_tokens": reasoning},
        otoroshi_usage={"prompt_tokens": prompt, "generation_tokens": completion,
                        "reasoning_tokens": reasoning})


OPENAI_CACHED = _openai("o4-mini", prompt=2000, cached=1536, completion=500, reasoning=320)

ANTHROPIC_CACHED = Call(
    provider="anthropic", path="/v1/messages", model="claude-sonnet-4-20250514",
    request={"model": "claude-sonnet-4-20250514", "max_tokens": 1024,
             "messages": [{"role": "user", "content": "Summarise the contract."}]},
    response=Message(
        id="msg_1", type="message", role="assistant", model="claude-sonnet-4-20250514",
        content=[TextBlock(type="text", text="It is a lease.")], stop_reason="end_turn",
        stop_sequence=None,
        usage=AnthropicUsage(input_tokens=50, output_tokens=400, cache_read_input_tokens=3000,
                             cache_creation_input_tokens=1200)).model_dump(mode="json"),
    # AnthropicConfig.calculate_usage (LiteLLM 1.100.5) of that usage
    litellm_usage={
        "completion_tokens": 400, "prompt_tokens": 4250, "total_tokens": 4650,
        "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 400},
        "prompt_tokens_details": {"cache_write_tokens": 1200, "cached_tokens": 3000,
                                  "text_tokens": 50, "cache_creation_tokens": 1200},
        "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 3000},
    otel_usage={"input_tokens": 4250, "cache_read.input_tokens": 3000,
                "cache_creation.input_tokens": 1200, "output_tokens": 400},
    # Otoroshi's Anthropic client: `usage.input_tokens`, `usage.output_tokens`, and -1 for
    # the reasoning tokens Anthropic does not report
    otoroshi_usage={"prompt_tokens": 50, "generation_tokens": 400, "reasoning_tokens": -1})

GEMINI_THINKING = Call(
    provider="gemini", path="/v1beta/models/gemini-2.5-flash:generateContent",
    model="gemini-2.5-flash",
    request={"contents": [{"role": "user", "parts": [{"text": "Plan a trip."}]}]},
    response={"candidates": [{"content": {"role": "model", "parts": [{"text": "Go to Rome."}]},
                              "finishReason": "STOP"}],
              "usageMetadata": {"promptTokenCount": 1200, "cachedContentTokenCount": 800,
                                "candidatesTokenCount": 150, "thoughtsTokenCount": 250,
                                "totalTokenCount": 1600},
              "modelVersion": "gemini-2.5-flash"},
    # VertexGeminiConfig._calculate_usage (LiteLLM 1.100.5) of that answer
    litellm_usage={
        "completion_tokens": 400, "prompt_tokens": 1200, "total_tokens": 1600,
        "completion_tokens_details": {"reasoning_tokens": 250, "text_tokens": 150},
        "prompt_tokens_details": {"cached_tokens": 800}, "cache_read_input_tokens": 800},
    otel_usage={"input_tokens": 1200, "cache_read.input_tokens": 800, "output_tokens": 400,
                "reasoning.output_tokens": 250},
    # Otoroshi's Gemini client through Gemini's OpenAI-compatible API: no cached count
    otoroshi_usage={"prompt_tokens": 1200, "generation_tokens": 400, "reasoning_tokens": 250})

RATE_LIMITED = Call(
    provider="openai", path="/v1/chat/completions", model="gpt-4o-mini", status=429,
    duration_ms=120.0, request={"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "this one is limited"}]},
    response={"error": {"message": "Rate limit reached for gpt-4o-mini on requests per min "
                                   "(RPM): Limit 3, Used 3, Requested 1.",
                        "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
    litellm_usage={}, otel_usage={}, otoroshi_usage={})


_PLAIN = _openai("gpt-4o-mini", prompt=120, cached=0, completion=35, reasoning=0)
STREAMED = replace(_PLAIN, duration_ms=1500.0, ttft_ms=400.0,
                   request={**_PLAIN.request, "stream": True})

CALLS = {"openai-cached": OPENAI_CACHED, "anthropic-cached": ANTHROPIC_CACHED,
         "gemini-thinking": GEMINI_THINKING}


# --- each source's payload, decoded --------------------------------------------------------

def via_gateway(call: Call) -> Event:
    """The gateway's event: its shape reads the request and the provider's answer."""
    event = Event(source="gateway", provider=provider_name(call.provider), endpoint=call.path,
                  status_code=call.status, duration_ms=call.duration_ms, ttft_ms=call.ttft_ms)
    shape = shape_for(call.path)
    assert shape is not None
    shape.read_request(copy.deepcopy(call.request), event, False)
    if call.status >= 400:
        read_error(call.response, event)
    elif event.streaming:
        reader = shape.stream(event, False, False)
        assert reader is not None
        for chunk in _chunks(call):
            reader.feed(chunk)
        reader.finish()
    else:
        shape.read_response(call.response, event, False)
    return event


def _chunks(call: Call) -> list[dict[str, Any]]:
    """The chunks of an OpenAI stream that asked for its usage: the text, then the usage."""
    head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1_780_000_000,
            "model": call.response["model"]}
    chunks = [ChatCompletionChunk(**head, choices=[
                  {"index": 0, "delta": {"role": "assistant", "content": "Paris."},
                   "finish_reason": "stop"}]),
              ChatCompletionChunk(**head, choices=[], usage=call.response["usage"])]
    return [c.model_dump(mode="json") for c in chunks]


def via_litellm(call: Call, **fields: Any) -> Event:
    if call.status >= 400:  # the payload of the real proxy's call that its upstream refused
        return decode_item(copy.deepcopy(LITELLM_FAILURE))
    payload = copy.deepcopy(LITELLM_STREAM)
    streamed = call.ttft_ms is not None
    end = START_S + call.duration_ms / 1000
    payload.update(
        model=f"{call.provider}/{call.model}", custom_llm_provider=call.provider,
        model_group=call.model, stream=streamed or None,
        model_parameters={**payload["model_parameters"], "stream": streamed},
        prompt_tokens=call.litellm_usage["prompt_tokens"],
        completion_tokens=call.litellm_usage["completion_tokens"],
        total_tokens=call.litellm_usage["total_tokens"],
        startTime=START_S, endTime=end,
        completionStartTime=START_S + call.ttft_ms / 1000 if streamed else end, **fields)
    payload["response"] = {**payload["response"], "model": call.model,
                           "usage": call.litellm_usage}
    return decode_item(payload)


def via_otlp(call: Call) -> Event:
    """A GenAI client span, as the conventions name its attributes; a failed call's span has
    an error status and `error.type` (the OpenTelemetry OpenAI instrumentation's: the
    exception's class)."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider_name(call.provider),
        "gen_ai.request.model": call.model,
        **{f"gen_ai.usage.{k}": v for k, v in call.otel_usage.items()}}
    if call.ttft_ms is not None:
        attrs["gen_ai.request.stream"] = True
    status = None
    if call.status >= 400:
        attrs["error.type"] = "RateLimitError"
        status = Status(code=Status.STATUS_CODE_ERROR, message=call.response["error"]["message"])
    span = Span(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
                span_id=bytes.fromhex("a1b2c3d4e5f60718"), name=f"chat {call.model}",
                kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=START_NS,
                end_time_unix_nano=START_NS + round(call.duration_ms * 1e6), status=status,
                attributes=[{"key": k, "value": any_value(v)} for k, v in attrs.items()])
    decoded = decode_spans(request(span))
    assert not decoded.rejected, decoded.rejected
    [event] = decoded.events
    return event


def via_otoroshi(call: Call, **fields: Any) -> Event:
    """An `LLMUsageAudit` of the call: the usage slug of its provider client, merged in; a
    failed call's event has the provider's error body as `error`, and no slug."""
    item = copy.deepcopy(OTOROSHI)
    if call.status >= 400:
        for name in ("usage", "duration", "model", "rate_limit", "provider"):
            del item[name]
        item.update(error=call.response, output=None)
        return decode_item(item)
    streamed = call.ttft_ms is not None
    item.update(provider_kind=call.provider, model=call.model, duration=call.duration_ms,
                usage=call.otoroshi_usage,
                consumed_using=f"chat/completion/{'streaming' if streamed else 'blocking'}",
                **{"@timestamp": START_S * 1000 + call.duration_ms}, **fields)
    item["output"]["metadata"]["usage"] = call.otoroshi_usage
    return decode_item(item)


def decoded(call: Call) -> dict[str, Event]:
    return {"gateway": via_gateway(call), "litellm": via_litellm(call), "otlp": via_otlp(call),
            "otoroshi": via_otoroshi(call)}


@pytest.fixture(scope="module")
def cost(tmp_path_factory: pytest.TempPathFactory) -> CostProcessor:
    return CostProcessor(convert({}, CostConfig), make_context(
        Path(tmp_path_factory.mktemp("cost")), "cost"))


def priced(cost: CostProcessor, events: dict[str, Event]) -> dict[str, Event]:
    cost.process(list(events.values()))
    return events


def tokens(e: Event) -> tuple[int | None, ...]:
    return (e.input_tokens, e.cache_read_tokens, e.cache_creation_tokens, e.output_tokens,
            e.reasoning_tokens)


def bill(e: Event) -> tuple[Any, ...]:
    """What the money depends on: the price entry chosen, and the estimate it gives."""
    return (e.provider, e.pricing_ref, e.cost_usd and round(e.cost_usd, 12))


# --- tokens and cost ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["openai-cached", "anthropic-cached", "gemini-thinking"])
def test_gateway_litellm_and_otlp_report_the_same_tokens_and_cost(
        cost: CostProcessor, name: str) -> None:
    events = priced(cost, decoded(CALLS[name]))
    reference = events["gateway"]
    assert reference.cost_usd is not None and reference.input_tokens is not None
    for source in ("litellm", "otlp"):
        assert tokens(events[source])[:4] == tokens(reference)[:4], source
        assert bill(events[source]) == bill(reference), source
    assert events["otlp"].reasoning_tokens == reference.reasoning_tokens


@pytest.mark.parametrize("name", ["openai-cached", "gemini-thinking"])
def test_litellm_reports_the_providers_reasoning_tokens(name: str) -> None:
    call = CALLS[name]
    assert via_litellm(call).reasoning_tokens == via_gateway(call).reasoning_tokens


def test_litellm_counts_anthropic_reasoning_tokens_itself() -> None:
    # Anthropic reports no reasoning count (thinking is inside `output_tokens`): LiteLLM
    # counts the thinking text itself (0 without thinking), the gateway leaves it null.
    # The cost is the same (both are priced at Anthropic's output rate).
    assert (via_litellm(ANTHROPIC_CACHED).reasoning_tokens,
            via_gateway(ANTHROPIC_CACHED).reasoning_tokens) == (0, None)


def test_an_openai_call_through_otoroshi_is_priced_as_if_nothing_was_cached(
        cost: CostProcessor) -> None:
    # A limit of the format: Otoroshi's usage has no cached-token count, so the cached
    # part of OpenAI's `prompt_tokens` (which counts it) is priced at the input rate.
    events = priced(cost, decoded(OPENAI_CACHED))
    otoroshi, gateway = events["otoroshi"], events["gateway"]
    assert (otoroshi.input_tokens, otoroshi.output_tokens, otoroshi.reasoning_tokens) == (
        gateway.input_tokens, gateway.output_tokens, gateway.reasoning_tokens)
    assert (otoroshi.cache_read_tokens, gateway.cache_read_tokens) == (None, 1536)
    assert otoroshi.pricing_ref == gateway.pricing_ref
    assert otoroshi.cost_input_usd == pytest.approx(2000 * 1.1e-6)
    assert gateway.cost_input_usd == pytest.approx(464 * 1.1e-6 + 1536 * 0.275e-6)


def test_an_anthropic_call_through_otoroshi_counts_only_its_uncached_input(
        cost: CostProcessor) -> None:
    # A limit of the format: Otoroshi's Anthropic client reports Anthropic's own
    # `input_tokens`, which excludes cache reads and writes, and no cache counts.
    events = priced(cost, decoded(ANTHROPIC_CACHED))
    otoroshi, gateway = events["otoroshi"], events["gateway"]
    assert tokens(gateway) == (4250, 3000, 1200, 400, None)
    assert tokens(otoroshi) == (50, None, None, 400, None)
    assert otoroshi.pricing_ref == gateway.pricing_ref


def test_a_gemini_call_through_otoroshi_has_no_cached_count(cost: CostProcessor) -> None:
    # A limit of the format, as for OpenAI: the cached part is priced at the input rate.
    events = priced(cost, decoded(GEMINI_THINKING))
    otoroshi, gateway = events["otoroshi"], events["gateway"]
    assert tokens(otoroshi) == (1200, None, None, 400, 250)
    assert tokens(gateway) == (1200, 800, None, 400, 250)
    assert otoroshi.pricing_ref == gateway.pricing_ref


# --- failures, latency, reported cost ---------------------------------------------------

def test_a_rate_limited_call_is_the_same_failure_from_every_source(cost: CostProcessor) -> None:
    events = priced(cost, decoded(RATE_LIMITED))
    for source, e in events.items():
        assert e.error_type == "rate_limit_error", source
        assert (e.input_tokens, e.output_tokens, e.cost_usd) == (None, None, None), source


def test_only_the_gateway_and_litellm_carry_a_failures_http_status() -> None:
    # A limit of the formats: a GenAI span carries `error.type`, not the HTTP status (no
    # `http.response.status_code` on it); Otoroshi's failed event only the error body.
    assert via_gateway(RATE_LIMITED).status_code == via_litellm(RATE_LIMITED).status_code == 429
    assert via_otlp(RATE_LIMITED).status_code is None
    assert via_otoroshi(RATE_LIMITED).status_code is None


def test_otoroshis_failed_call_names_no_model() -> None:
    # A limit of the format: Otoroshi writes a failed call's event without the provider
    # call's slug, so without `model`; the others name the model asked for.
    models = {source: e.request_model for source, e in decoded(RATE_LIMITED).items()}
    assert models == {"gateway": "gpt-4o-mini", "litellm": "gpt-4o-mini",
                      "otlp": "gpt-4o-mini", "otoroshi": None}


def test_a_streamed_call_has_the_same_tokens_and_duration_from_every_source(
        cost: CostProcessor) -> None:
    events = priced(cost, decoded(STREAMED))
    reference = events["gateway"]
    for source, e in events.items():
        assert e.streaming is True, source
        assert e.duration_ms == pytest.approx(1500.0), source
        assert (e.input_tokens, e.output_tokens) == (120, 35), source
        assert bill(e) == bill(reference), source


def test_time_to_first_token_comes_from_the_gateway_and_litellm_only() -> None:
    # A limit of the formats: no GenAI span attribute carries the time to first token (the
    # conventions have it as a metric, `gen_ai.server.time_to_first_token`, in seconds), and
    # Otoroshi's event has none.
    assert via_gateway(STREAMED).ttft_ms == pytest.approx(400.0)
    assert via_litellm(STREAMED).ttft_ms == pytest.approx(400.0)
    assert via_otlp(STREAMED).ttft_ms is None
    assert via_otoroshi(STREAMED).ttft_ms is None


def test_a_reported_cost_is_the_same_usd_from_litellm_and_otoroshi(cost: CostProcessor) -> None:
    costs = {"input_cost": 0.00099, "output_cost": 0.0022, "reasoning_cost": 0.0,
             "total_cost": 0.00319, "currency": "USD"}
    events = priced(cost, {"litellm": via_litellm(OPENAI_CACHED, response_cost=0.00319),
                           "otoroshi": via_otoroshi(OPENAI_CACHED, costs=costs)})
    assert [e.actual_cost_usd for e in events.values()] == [0.00319, 0.00319]


def test_a_cache_hit_costs_nothing_and_saves_the_same_from_litellm_and_otoroshi(
        cost: CostProcessor) -> None:
    # the second of two identical gpt-4o-mini calls, answered from the proxy's cache
    usage = {"prompt_tokens": 3, "generation_tokens": 5, "reasoning_tokens": 0}
    otoroshi = copy.deepcopy(OTOROSHI)
    otoroshi["output"]["metadata"].update(
        usage=usage, cache={"status": "Hit", "key": "k1", "ttl": 86400, "age": 3})
    events = priced(cost, {"litellm": decode_item(copy.deepcopy(LITELLM_CACHE_HIT)),
                           "otoroshi": decode_item(otoroshi)})
    for source, e in events.items():
        assert (e.cache_hit, e.input_tokens, e.output_tokens) == (True, 3, 5), source
        assert (e.cost_usd, e.saved_cost_usd) == (0.0, pytest.approx(3.45e-06)), source
