"""LiteLLM's own cost of calls, for tests/test_pricing_reference.py: run by the Python of
LiteLLM's virtual environment (tests/litellm_proxy.py installs it), never imported by
meterline's tests (LiteLLM is not installed beside meterline).

Reads a JSON array of calls on standard input, each `{"model": KEY, "form": F,
"prompt": N, "completion": N, "cache_read": N, "cache_write": N, "reasoning": N,
"audio_in": N, "audio_out": N, "cache_write_1h": N, "service_tier": T,
"data_residency": R, "vertex_location": L, "inference_geo": G, "speed": S}` (KEY a key
of LiteLLM's price map, F the form of its usage object, see `usage`; `cache_write_1h` the
written tokens kept for an hour, T the tier that served the call, R the OpenAI region
that processed it, L the Vertex AI location that served it, G where Anthropic says it ran
the call and S how fast, its usage's `inference_geo` and `speed`, each or null; `prompt`
includes the cached, written and audio tokens, `completion` the reasoning and audio ones,
as LiteLLM's `Usage` counts them), and writes one JSON array back, one answer per call:
the provider LiteLLM routes the model to, the entry its cost calculation reads, the usage
as LiteLLM's logging payload carries it (`response.usage`) and `cost_per_token`'s (input,
output) cost in USD; or the error LiteLLM raised.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import litellm
from litellm.types.utils import (
    CacheCreationTokenDetails,
    CompletionTokensDetailsWrapper,
    PromptTokensDetailsWrapper,
    Usage,
)


def usage(call: dict[str, Any]) -> Usage:
    """The usage LiteLLM makes of a provider's answer, in either of its forms: `anthropic`
    (its Anthropic and Bedrock transformations: the cache reads and writes in
    `prompt_tokens_details` and at the top, `cache_read_input_tokens` and
    `cache_creation_input_tokens`, with the text tokens counted apart, and the writes
    kept for an hour in `cache_creation_token_details`) or `openai` (an
    OpenAI-compatible answer passed on: `prompt_tokens_details` alone, the writes as
    `cache_write_tokens`, as Kimi and OpenRouter report them). `prompt_tokens` counts them
    all; reasoning and audio are in `completion_tokens_details`."""
    prompt, completion = call["prompt"], call["completion"]
    read, written, audio_in = call["cache_read"], call["cache_write"], call["audio_in"]
    reasoning, audio_out = call["reasoning"], call["audio_out"]
    for_an_hour = call.get("cache_write_1h", 0)
    split = CacheCreationTokenDetails(ephemeral_5m_input_tokens=written - for_an_hour,
                                      ephemeral_1h_input_tokens=for_an_hour) \
        if for_an_hour else None
    completion_details = CompletionTokensDetailsWrapper(
        reasoning_tokens=reasoning, audio_tokens=audio_out,
        text_tokens=completion - reasoning - audio_out)
    if call["form"] == "openai":
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetailsWrapper(
                cached_tokens=read, cache_write_tokens=written, audio_tokens=audio_in),
            completion_tokens_details=completion_details)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetailsWrapper(
            cached_tokens=read, cache_creation_tokens=written, audio_tokens=audio_in,
            text_tokens=prompt - read - written - audio_in,
            cache_creation_token_details=split),
        cache_read_input_tokens=read, cache_creation_input_tokens=written,
        completion_tokens_details=completion_details, inference_geo=call.get("inference_geo"),
        speed=call.get("speed"))


def provider_of(model: str) -> str:
    """The provider LiteLLM calls `model` with: the one it finds from the name, else (a
    bare `deepseek-chat`) the entry's own, as a deployment naming it would be called."""
    try:
        return str(litellm.get_llm_provider(model=model)[1])
    except litellm.BadRequestError:
        family = litellm.model_cost[model].get("litellm_provider")
        if family not in litellm.provider_list:
            raise
        return str(family)


def price(call: dict[str, Any]) -> dict[str, Any]:
    model = call["model"]
    try:
        provider = provider_of(model)
        used = usage(call)
        entry = litellm.get_model_info(model=model, custom_llm_provider=provider)["key"]
        cost_in, cost_out = litellm.cost_per_token(
            model=model, custom_llm_provider=provider, usage_object=used,
            prompt_tokens=call["prompt"], completion_tokens=call["completion"],
            service_tier=call.get("service_tier"), data_residency=call.get("data_residency"),
            vertex_location=call.get("vertex_location"))
    except Exception as e:  # LiteLLM's own refusal is the answer for that call
        return {"error": f"{type(e).__name__}: {e}"}
    return {"provider": provider, "entry": entry, "usage": used.model_dump(),
            "input": cost_in, "output": cost_out}


def main() -> None:
    answer, sys.stdout = sys.stdout, sys.stderr  # what LiteLLM prints is no answer
    json.dump([price(call) for call in json.load(sys.stdin)], answer)


if __name__ == "__main__":
    main()
