"""Otoroshi's `LLMUsageAudit` audit event (its LLM extension's usage record).

Otoroshi's webhook exporter posts a JSON array of such events, its Kafka exporter
one per message. Other Otoroshi events (GatewayEvent, AlertEvent...), which an
unfiltered data exporter sends too, are not LLM calls (`NotAnLLMCall`, naming the
filter that keeps them out); an `LLMUsageAudit` that cannot be read is a
`DecodeError`. The audit event's `@timestamp` is written
when the call ends, so the request start is `@timestamp - duration`. A count of -1 (tokens,
rate limits) is Otoroshi's "not reported" (`_count`), as is a duration of 0. A call
Otoroshi's cache answered (`output.metadata.cache.status: Hit`) is a `cache_hit`, with its
cached answer's usage (`_served`).

The API key: `api_key_id` is the hash prefix of its `clientId` (`meterline.event.api_key_id`,
the rule every source follows, so ids never carry a source's own identifiers); the raw
`clientId` is kept as the attribute `otoroshi.apikey.client_id`, and `api_key_name` is the
key's `clientName` (its `clientId` when it has none), so that the key tables users keep by
Otoroshi client id still join. The key's `metadata` becomes the event's `metadata`, its
`tags` the attribute `otoroshi.apikey.tags`.

Guardrails: a provider whose guardrails deny a call fails it when its
`guardrails_fail_on_deny` is set, and the audit event's `error` says so:
`{"error": "guardrail_denied", "error_description": ..., "phase": "before" | "after"}`.
That is a guardrail that blocked the request (`before`: stage `input`) or the answer
(`after`: `output`); its rule is the id of the only enabled guardrail of the provider
(`provider_details.guardrails`) that runs in that phase, `unknown` when several do. A
denial without `guardrails_fail_on_deny` is answered as a normal completion, and the
event cannot tell it from one.
"""

from __future__ import annotations

import math
from typing import Any

from meterline.event import Event, Guardrail, GuardrailStage, api_key_id, uuid7
from meterline.genai import error_of, error_type_for_names, provider_name
from meterline.lenient import as_dict, as_float, as_int, as_list, as_messages, as_metadata
from meterline.receivers.decoders.errors import DecodeError, NotAnLLMCall

_OPERATIONS = {
    "chat": "chat",
    "completion": "text_completion",
    "embedding_model": "embeddings",
    "audio_model": "audio",
    "image_model": "image_generation",
    "moderation_model": "moderation",
    "video_model": "video_generation",
}
_PARAMS = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty", "seed",
           "n", "top_k")


def decode(item: dict[str, Any]) -> Event:
    audit = item.get("audit")
    if audit != "LLMUsageAudit":
        kind = audit or item.get("@type") or "unknown"
        raise NotAnLLMCall(f"Otoroshi {kind} event is not an LLM usage event; keep only "
                           "LLMUsageAudit in the data exporter: "
                           'include [{"audit": "LLMUsageAudit"}]')
    slug, cache_hit = _served(item)
    usage = as_dict(slug.get("usage"))
    rate = as_dict(slug.get("rate_limit"))
    apikey = as_dict(item.get("apikey"))
    location = as_dict(apikey.get("_loc"))
    teams = as_list(location.get("teams"))
    route = as_dict(item.get("route"))
    user = as_dict(item.get("user"))
    consumed = str(item.get("consumed_using") or "")
    # Otoroshi's clients of several providers take the duration from a header
    # (`openai-processing-ms`) and write 0 without it: no call takes no time, so 0 is a
    # duration not reported, which would otherwise pull every latency figure down
    duration = as_float(slug.get("duration")) or None
    stamp_ms = as_float(item.get("@timestamp"))
    if stamp_ms is None:
        raise DecodeError("Otoroshi LLMUsageAudit without @timestamp")
    start_us_f = (stamp_ms - (duration or 0)) * 1000
    if not math.isfinite(start_us_f):
        raise DecodeError(f"Otoroshi LLMUsageAudit @timestamp ({stamp_ms}) or duration "
                          f"({duration}) is not a time in epoch milliseconds")
    start_us = round(start_us_f)
    error = item.get("error")
    error_category, error_message = _failure(error)
    guardrail = _guardrail(error, as_dict(item.get("provider_details")))
    costs = _costs(item)
    domains = as_list(as_dict(route.get("frontend")).get("domains"))
    client_id = str(apikey.get("clientId") or "") or None
    tags = [str(tag) for tag in apikey.get("tags") or [] if tag is not None] \
        if isinstance(apikey.get("tags"), list) else []
    attributes = {k: v for k, v in {
        "otoroshi.apikey.client_id": client_id,
        "otoroshi.apikey.tags": tags or None,
        "otoroshi.provider_id": item.get("provider"),
        "otoroshi.route_id": route.get("id"),
        "otoroshi.instance": item.get("instance-name"),
        "otoroshi.env": item.get("@env"),
        "otoroshi.consumed_using": consumed or None,
        "server.address": domains[0] if domains else None,
        "otoroshi.cost_currency": costs.get("currency") if costs else None,
    }.items() if v is not None}
    return Event(
        event_id=str(item.get("@id") or "") or uuid7(),
        timestamp=start_us * 1000,
        source="otoroshi",
        provider=provider_name(item.get("provider_kind")),
        operation=_OPERATIONS.get(consumed.split("/")[0]) if consumed else None,
        request_model=slug.get("model"),
        streaming=consumed.endswith("/streaming") if consumed else None,
        route=route.get("name") or route.get("id"),
        upstream=as_dict(item.get("provider_details")).get("name") or item.get("provider"),
        params=_params(item),
        status_code=200 if error is None else None,
        error_type=error_category,
        error_message=error_message,
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("generation_tokens")),
        reasoning_tokens=_count(usage.get("reasoning_tokens")),
        duration_ms=duration,
        user_id=user.get("email") or user.get("name") or user.get("id") if user else None,
        api_key_id=api_key_id(client_id) if client_id else None,
        api_key_name=apikey.get("clientName") or client_id,
        team=teams[0] if len(teams) == 1 else None,
        organization=location.get("tenant"),
        metadata=as_metadata(apikey.get("metadata")),
        ratelimit_requests_limit=_count(rate.get("requests_limit")),
        ratelimit_requests_remaining=_count(rate.get("requests_remaining")),
        ratelimit_tokens_limit=_count(rate.get("tokens_limit")),
        ratelimit_tokens_remaining=_count(rate.get("tokens_remaining")),
        cache_hit=cache_hit,
        policies=["guardrails"] if guardrail else None,
        guardrails=[guardrail] if guardrail else None,
        input_messages=as_messages(item.get("input_prompt")),
        output_messages=as_messages([as_dict(g).get("message") for g in
                                   as_list(as_dict(item.get("output")).get("generations"))]),
        actual_cost_usd=_usd(costs),
        attributes=attributes or None,
    )


def _served(item: dict[str, Any]) -> tuple[dict[str, Any], bool | None]:
    """The provider call's usage slug (`usage`, `duration`, `model`, `rate_limit`, which
    Otoroshi merges into the event), and whether Otoroshi's cache answered
    (`output.metadata.cache.status`: Hit, Miss, Refresh or Bypass; None without a cache).
    On a hit no provider ran, and a slug there is another call's (an LLM guardrail's): the
    call's usage is its cached answer's (`output.metadata.usage`), its model the provider's
    (`provider_details.options.model`), and it has no duration or rate limits of its own."""
    metadata = as_dict(as_dict(item.get("output")).get("metadata"))
    status = as_dict(metadata.get("cache")).get("status")
    hit = status.lower() == "hit" if isinstance(status, str) else None
    if hit:
        options = as_dict(as_dict(item.get("provider_details")).get("options"))
        return {"usage": metadata.get("usage"), "model": options.get("model")}, True
    return {"usage": as_dict(item.get("usage")) or metadata.get("usage"),
            "duration": item.get("duration"), "model": item.get("model"),
            "rate_limit": item.get("rate_limit")}, hit


NOT_REPORTED = -1


def _count(value: Any) -> int | None:
    """A count of Otoroshi's (tokens, rate limits): its provider clients write -1 for one the
    provider did not send (`getOrElse(-1L)`: Anthropic reports no reasoning tokens, many
    providers no rate-limit headers). That is a count not reported, not a negative one
    that would refuse the whole call."""
    number = as_int(value)
    return None if number == NOT_REPORTED else number


def _params(item: dict[str, Any]) -> dict[str, Any] | None:
    options = as_dict(as_dict(item.get("provider_details")).get("options"))
    params = {k: int(n) if n.is_integer() else n
              for k in _PARAMS if (n := as_float(options.get(k))) is not None}
    return params or None


def _costs(item: dict[str, Any]) -> dict[str, Any]:
    output_meta = as_dict(as_dict(item.get("output")).get("metadata"))
    return as_dict(output_meta.get("costs")) or as_dict(item.get("costs"))


_COST_PARTS = ("input_cost", "output_cost", "reasoning_cost")


def _usd(costs: dict[str, Any]) -> float | None:
    """Otoroshi's `total_cost`, else the sum of the parts it reports; only in USD."""
    currency = str(costs.get("currency") or "USD").upper()
    if currency != "USD":
        return None
    total = as_float(costs.get("total_cost"))
    if total is None:
        parts = [n for part in _COST_PARTS if (n := as_float(costs.get(part))) is not None]
        total = sum(parts) if parts else None
    return total


def _failure(error: Any) -> tuple[str | None, str | None]:
    """The category and message of a failed call (None, None for one that did not fail):
    Otoroshi's `error` is the provider's own error body (`ProviderHelpers.wrapResponse`),
    read as the gateway reads it, or `{"exception": message}`; without an HTTP status, the
    first of its names that tells a category decides."""
    if error is None:
        return None, None
    names, message = error_of(error)
    exception = as_dict(error).get("exception")
    message = message or (str(exception) if exception else None)
    return error_type_for_names([*names, message or ""]), (message or str(error))[:1024]


_PHASES: dict[str, GuardrailStage] = {"before": "input", "after": "output"}
UNKNOWN_RULE = "unknown"


def _guardrail(error: Any, provider: dict[str, Any]) -> Guardrail | None:
    """The guardrail that blocked the call, from a `guardrail_denied` error."""
    error = as_dict(error)
    phase = error.get("phase")
    if error.get("error") != "guardrail_denied" or not isinstance(phase, str) \
            or phase not in _PHASES:
        return None
    rules = {str(g["id"]) for g in map(as_dict, as_list(provider.get("guardrails")))
             if g.get("enabled") is True and g.get(phase) is True
             and isinstance(g.get("id"), str) and g["id"]}
    return Guardrail(rule=rules.pop() if len(rules) == 1 else UNKNOWN_RULE,
                     stage=_PHASES[phase], action="block")
