"""LiteLLM's `StandardLoggingPayload`, as its generic API logger posts it.

Read against what the LiteLLM proxy (1.100.5) really sends (tests/test_litellm_proxy.py
runs it; docs/howto/litellm.md lists the mapping):

- `model` is the deployment LiteLLM called (`anthropic/claude-3-5-haiku-20241022`): it
  is `request_model`, without the provider's own prefix; `model_group` is the name the
  client asked for (an alias such as `claude-haiku`): it is the `route`.
- LiteLLM rewrites `response.model` to the name the client asked for, so it names the
  provider's answer only when it differs from `model_group` (after a fallback, say):
  only then, and only for a call that got a response, is it `response_model`. A failed
  call's `prompt_tokens: 0` / `completion_tokens: 0` are LiteLLM's defaults, not counts.
- `stream` is set for streams only; `model_parameters.stream` says `false` for most other
  calls, and a completion that says neither (a cache hit) was not streamed.
- `user_api_key_hash: "litellm_proxy_master_key"` is LiteLLM's stand-in for its master
  key (neither the key nor its hash): the key is named `master` and has no id;
  `default_user_id` is LiteLLM's placeholder for the proxy admin, not a user.
- `cache_hit: true` is a call answered from LiteLLM's cache: nothing was billed
  (`actual_cost_usd` 0) and `saved_cache_cost` is `saved_cost_usd`.
- `spend_logs_metadata` becomes `metadata`, whose values are strings: other JSON values
  are written as JSON (`1`, `true`), and the typed originals are kept in the attribute
  `litellm.spend_logs_metadata`. `request_tags` are `tags`, without the `User-Agent: …`
  tags LiteLLM adds itself; response messages lose the fields LiteLLM adds as null.
- `response_cost: 0` for a call that used tokens is LiteLLM's answer for a model its
  cost map does not price (no entry, or the zero-cost placeholder without a `mode` it
  makes for an unknown deployment): that cost is not reported (None), not $0.
- `guardrail_information` (a list; a single object in older versions) says what each
  guardrail that ran did: one that intervened or masked fired, and is in `guardrails`
  (`_guardrails`); one that passed, failed to respond or did not run is not.
- `policies`: `guardrails` when one fired; `fallback` when the headers LiteLLM answered
  with (`hidden_params.additional_headers`) count `x-litellm-attempted-fallbacks` above
  0; `rate_limit` when `error_information` says LiteLLM's own limiter refused the call
  (`error_rate_limit_category` `litellm_rate_limit`, `litellm_batch_rate_limit`; a
  provider's 429 is no policy); `budget` when a budget was exceeded
  (`error_budget_entity_type`, `error_rate_limit_type: budget`, `BudgetExceededError`).
  The provider's rate-limit headers there (`x_ratelimit_*`) fill `ratelimit_*`.
"""

from __future__ import annotations

import math
from typing import Any

from meterline.event import API_KEY_ID_CHARS, Event, Guardrail, GuardrailStage, uuid7
from meterline.genai import (
    INFERENCE_GEO,
    SPEED,
    error_type_for_name,
    error_type_for_status,
    provider_name,
)
from meterline.lenient import as_dict, as_float, as_int, as_list, as_messages, as_metadata
from meterline.receivers.decoders.errors import DecodeError

_MARKERS = frozenset({"litellm_call_id", "call_type", "custom_llm_provider", "model_group",
                      "response_cost"})
_OPERATIONS = {
    "completion": "chat", "acompletion": "chat",
    "text_completion": "text_completion", "atext_completion": "text_completion",
    "embedding": "embeddings", "aembedding": "embeddings",
    "responses": "chat", "aresponses": "chat",
    "anthropic_messages": "chat",
    "image_generation": "image_generation", "aimage_generation": "image_generation",
    "transcription": "transcription", "atranscription": "transcription",
    "speech": "speech", "aspeech": "speech",
    "moderation": "moderation", "amoderation": "moderation",
}


def recognises(item: dict[str, Any]) -> bool:
    return not _MARKERS.isdisjoint(item)


def decode(item: dict[str, Any]) -> Event:
    start = as_float(item.get("startTime"))
    if start is None:
        raise DecodeError("LiteLLM payload without startTime")
    if not math.isfinite(start * 1e6):
        raise DecodeError(f"LiteLLM startTime is not a time in epoch seconds: {start}")
    end = as_float(item.get("endTime"))
    first_token = as_float(item.get("completionStartTime"))
    meta = as_dict(item.get("metadata"))
    params = as_dict(item.get("model_parameters"))
    response = as_dict(item.get("response"))
    usage = as_dict(response.get("usage"))
    # an OpenAI-compatible answer passed on (Kimi, OpenRouter) has its cache writes here
    # only, as `cache_write_tokens` (LiteLLM's name) or `cache_creation_tokens`
    prompt_details = as_dict(usage.get("prompt_tokens_details"))
    completion_details = as_dict(usage.get("completion_tokens_details"))
    failed = item.get("status") == "failure"
    operation = _OPERATIONS.get(str(item.get("call_type") or ""))
    streaming = _streaming(item, params, operation)
    error_info = as_dict(item.get("error_information"))
    status = _status(error_info.get("error_code")) if failed else 200
    provider_raw = item.get("custom_llm_provider")
    group = _text(item.get("model_group"))
    deployed = _deployed_model(_text(item.get("model")), provider_raw) or group
    cache_hit = item.get("cache_hit") is True
    input_tokens = as_int(item.get("prompt_tokens"))
    output_tokens = as_int(item.get("completion_tokens"))
    if failed and not usage and not input_tokens and not output_tokens:
        input_tokens = output_tokens = None  # LiteLLM's 0 for a call without a response
    used_tokens = (input_tokens or 0) + (output_tokens or 0) > 0
    priced = _priced_by_litellm(item)
    key_hash = _text(meta.get("user_api_key_hash"))
    master = key_hash == MASTER_KEY_ALIAS
    choices = [c for c in as_list(response.get("choices")) if isinstance(c, dict)]
    spend_metadata = as_dict(meta.get("spend_logs_metadata"))
    attributes = {k: v for k, v in {
        "litellm.call_id": item.get("litellm_call_id"),
        "litellm.model_id": item.get("model_id"),
        "litellm.end_user": item.get("end_user") or None,
        "litellm.trace_id": item.get("trace_id"),
        "litellm.cache_key": item.get("cache_key") or None,
        # the typed originals of `metadata`, whose values are strings
        "litellm.spend_logs_metadata": spend_metadata if any(
            not isinstance(v, str) for v in spend_metadata.values() if v is not None) else None,
        "user_agent.original": item.get("user_agent") or None,
        # where and how fast Anthropic ran the call (`us`, `fast`: billed more), as its
        # usage said
        INFERENCE_GEO: _text(usage.get("inference_geo")),
        SPEED: _text(usage.get("speed")),
    }.items() if v is not None}
    response_model = _text(response.get("model"))
    headers = as_dict(as_dict(item.get("hidden_params")).get("additional_headers"))
    guardrails = _guardrails(item.get("guardrail_information"))
    policies = _policies(headers, error_info if failed else {}, bool(guardrails))
    return Event(
        event_id=str(item.get("id") or item.get("litellm_call_id") or "") or uuid7(),
        timestamp=round(start * 1e6) * 1000,
        source="litellm",
        provider=provider_name(provider_raw),
        operation=operation,
        request_model=deployed,
        response_model=response_model if not failed and response_model
        and response_model != group else None,
        route=group,
        streaming=streaming,
        upstream=item.get("api_base") or None,
        params=params or None,
        status_code=status,
        error_type=(error_type_for_status(status) or error_type_for_name(
            error_info.get("error_class"))) if failed else None,
        error_message=str(error_info.get("error_message") or item.get("error_str") or "")[:1024]
        or None if failed else None,
        finish_reasons=[str(c["finish_reason"]) for c in choices if c.get("finish_reason")]
        or None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=as_int(prompt_details.get("cached_tokens")
                               or usage.get("cache_read_input_tokens")),
        cache_creation_tokens=as_int(usage.get("cache_creation_input_tokens")
                                   or prompt_details.get("cache_write_tokens")
                                   or prompt_details.get("cache_creation_tokens")),
        # (LiteLLM's usage keeps Anthropic's `cache_creation` split in its details)
        cache_creation_1h_tokens=as_int(
            as_dict(prompt_details.get("cache_creation_token_details")
                    or usage.get("cache_creation")).get("ephemeral_1h_input_tokens")),
        reasoning_tokens=as_int(completion_details.get("reasoning_tokens")),
        audio_input_tokens=as_int(prompt_details.get("audio_tokens")),
        audio_output_tokens=as_int(completion_details.get("audio_tokens")),
        service_tier=_text(response.get("service_tier")),
        duration_ms=(end - start) * 1000 if end is not None else None,
        ttft_ms=(first_token - start) * 1000
        if streaming and first_token is not None and first_token > start else None,
        # the key's user; else the request's own `user` (what the gateway records too)
        user_id=_user(meta.get("user_api_key_user_id")) or _text(item.get("end_user")),
        api_key_id=None if master or not key_hash else key_hash[:API_KEY_ID_CHARS],
        api_key_name="master" if master else _text(meta.get("user_api_key_alias")),
        team=_text(meta.get("user_api_key_team_id")),
        organization=_text(meta.get("user_api_key_org_id")),
        session_id=item.get("session_id") or None,
        metadata=as_metadata(spend_metadata),
        ratelimit_requests_limit=as_int(headers.get("x_ratelimit_limit_requests")),
        ratelimit_requests_remaining=as_int(headers.get("x_ratelimit_remaining_requests")),
        ratelimit_tokens_limit=as_int(headers.get("x_ratelimit_limit_tokens")),
        ratelimit_tokens_remaining=as_int(headers.get("x_ratelimit_remaining_tokens")),
        fallback=True if "fallback" in policies else None,
        policies=policies or None,
        guardrails=guardrails or None,
        cache_hit=cache_hit,
        tags=[t for t in as_list(item.get("request_tags"))
              if isinstance(t, str) and t and not t.startswith(_INTERNAL_TAG_PREFIXES)]
        or None,
        input_messages=as_messages(item.get("messages")),
        output_messages=[_clean_message(m) for m in as_messages(
            [c.get("message") for c in choices]) or []] or None,
        actual_cost_usd=_actual_cost(item, cache_hit, used_tokens, priced),
        saved_cost_usd=_saved_cost(item, priced) if cache_hit else None,
        attributes=attributes or None,
    )


MASTER_KEY_ALIAS = "litellm_proxy_master_key"  # LiteLLM's LITELLM_PROXY_MASTER_KEY_ALIAS
_PLACEHOLDER_USERS = frozenset({"default_user_id"})  # LiteLLM's LITELLM_PROXY_ADMIN_NAME
_INTERNAL_TAG_PREFIXES = ("User-Agent: ",)  # tags LiteLLM adds to every request's own
_COMPLETIONS = frozenset({"chat", "text_completion"})
# fields LiteLLM's response objects carry on every message, null unless used
_NULL_MESSAGE_FIELDS = frozenset({"tool_calls", "function_call", "audio", "reasoning_content",
                                  "thinking_blocks", "annotations", "images", "refusal"})


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _user(value: Any) -> str | None:
    text = _text(value)
    return None if text in _PLACEHOLDER_USERS else text


def _deployed_model(model: str | None, provider: Any) -> str | None:
    """The deployment's model without LiteLLM's prefix naming its provider
    (`anthropic/claude-3-5-haiku-20241022` → `claude-3-5-haiku-20241022`)."""
    if model and isinstance(provider, str) and provider:
        bare = model.removeprefix(f"{provider}/")
        return bare or model
    return model


def _streaming(item: dict[str, Any], params: dict[str, Any], operation: str | None) -> bool | None:
    said = [v for v in (item.get("stream"), params.get("stream")) if isinstance(v, bool)]
    if said:
        return any(said)
    # neither says: LiteLLM marks every stream, so a completion that says nothing (a
    # cache hit) was not one; of other operations nothing is known
    return False if operation in _COMPLETIONS else None


def _priced_by_litellm(item: dict[str, Any]) -> bool:
    """Whether LiteLLM's cost map had a price for the call's model. For a deployment it
    does not know, LiteLLM reports no map entry, or the placeholder it registers for
    it: zero rates and no `mode`; a failed cost computation leaves debug information."""
    if item.get("response_cost_failure_debug_info") or item.get(
            "response_cost_failure_debug_information"):
        return False
    value = as_dict(as_dict(item.get("model_map_information")).get("model_map_value"))
    if not value:
        return False
    if value.get("mode"):
        return True
    return any((as_float(v) or 0) > 0 for k, v in value.items()
               if k.endswith(("_cost_per_token", "_cost_per_second", "_cost_per_image",
                              "_cost_per_query", "_cost_per_character", "_cost_per_request")))


def _actual_cost(item: dict[str, Any], cache_hit: bool, used_tokens: bool,
                 priced: bool) -> float | None:
    cost = as_float(item.get("response_cost"))
    if cost is None or cost != 0 or cache_hit:
        return cost  # a cache hit's 0 is a real 0: no provider was called
    return cost if priced or not used_tokens else None


def _saved_cost(item: dict[str, Any], priced: bool) -> float | None:
    saved = as_float(item.get("saved_cache_cost"))
    return saved if saved is None or saved != 0 or priced else None


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """A response message without the fields LiteLLM adds as null (`tool_calls`,
    `function_call`…) and its empty `provider_specific_fields`."""
    extra = message.get("provider_specific_fields")
    return {k: v for k, v in message.items()
            if not (v is None and k in _NULL_MESSAGE_FIELDS)
            and not (k == "provider_specific_fields" and (
                not isinstance(extra, dict) or all(x is None for x in extra.values())))}


def _status(code: Any) -> int | None:
    number = as_int(code)
    return number if number is not None and 100 <= number < 600 else None


# --- guardrails and policies -------------------------------------------------------------
# LiteLLM's guardrail modes (event hooks) to the stage they check: a request (before or
# while the call runs) or an answer. `logging_only` masks only what is logged, of either.
_STAGES: dict[str, GuardrailStage] = {
    "pre_call": "input", "during_call": "input", "pre_mcp_call": "input",
    "during_mcp_call": "input", "realtime_input_transcription": "input",
    "post_call": "output", "post_mcp_call": "output"}
_INTERVENED = frozenset({"guardrail_intervened", "blocked"})  # "blocked": older versions
_OWN_RATE_LIMITS = frozenset({"litellm_rate_limit", "litellm_batch_rate_limit"})


def _guardrails(value: Any) -> list[Guardrail]:
    """The guardrails that fired, from `guardrail_information`: one that intervened
    blocked the call, unless it masked entities (`masked_entity_count`, or a custom code
    guardrail's `mask` answer): then it redacted them, one entry per entity type
    (`detector`). Entries without a name or whose mode names no one stage are left out."""
    entries = [value] if isinstance(value, dict) else as_list(value)
    fired = []
    for entry in (as_dict(e) for e in entries):
        rule = _text(entry.get("guardrail_name")) or _text(entry.get("guardrail_id"))
        stage = _stage(entry.get("guardrail_mode"))
        masked = sorted(str(k) for k, n in as_dict(entry.get("masked_entity_count")).items()
                        if (as_int(n) or 0) > 0)
        if entry.get("guardrail_response") == "mask" and not masked:
            masked = [_text(entry.get("detection_method")) or ""]
        if rule is None or stage is None:
            continue
        if masked:
            fired += [Guardrail(rule=rule, stage=stage, action="redact", detector=d or None)
                      for d in masked]
        elif _text(entry.get("guardrail_status")) in _INTERVENED:
            fired.append(Guardrail(rule=rule, stage=stage, action="block",
                                   detector=_text(entry.get("detection_method"))))
    return fired


def _stage(mode: Any) -> GuardrailStage | None:
    """The stage of a guardrail mode: a hook name, a list of them, or `{default, tags}`."""
    if isinstance(mode, dict):
        mode = mode.get("default")
    modes = mode if isinstance(mode, list) else [mode]
    stages = {_STAGES.get(m) for m in modes if isinstance(m, str)}
    return stages.pop() if len(stages) == 1 else None


def _policies(headers: dict[str, Any], error: dict[str, Any], guardrails: bool) -> list[str]:
    policies = []
    if (as_int(headers.get("x-litellm-attempted-fallbacks")) or 0) > 0:
        policies.append("fallback")
    budget = bool(error.get("error_budget_entity_type")) or error.get(
        "error_rate_limit_type") == "budget" or "BudgetExceeded" in str(
        error.get("error_class") or "")
    if _text(error.get("error_rate_limit_category")) in _OWN_RATE_LIMITS and not budget:
        policies.append("rate_limit")
    if budget:
        policies.append("budget")
    if guardrails:
        policies.append("guardrails")
    return policies
