"""LiteLLM's `StandardLoggingPayload`, as its generic API logger posts it.

Times are epoch seconds (floats). The key's hash becomes `api_key_id` (a prefix:
enough to tell keys apart, never the key); the key alias, team, organization and
user come from `metadata.user_api_key_*`; `spend_logs_metadata` becomes
`metadata`. LiteLLM's own `response_cost` is the source-reported cost.
"""

from __future__ import annotations

import math
from typing import Any

from meterline.event import API_KEY_ID_CHARS, Event, uuid7
from meterline.genai import error_type_for_name, error_type_for_status, provider_name
from meterline.lenient import as_dict, as_float, as_int, as_list, as_messages, as_metadata
from receivers.decoders.errors import DecodeError

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
    streaming = bool(item.get("stream")) if item.get("stream") is not None else None
    meta = as_dict(item.get("metadata"))
    response = as_dict(item.get("response"))
    usage = as_dict(response.get("usage"))
    failed = item.get("status") == "failure"
    error_info = as_dict(item.get("error_information"))
    status = _status(error_info.get("error_code")) if failed else 200
    key_hash = meta.get("user_api_key_hash")
    choices = [c for c in as_list(response.get("choices")) if isinstance(c, dict)]
    attributes = {k: v for k, v in {
        "litellm.call_id": item.get("litellm_call_id"),
        "litellm.model_id": item.get("model_id"),
        "litellm.cache_hit": item.get("cache_hit"),
        "litellm.request_tags": item.get("request_tags") or None,
        "litellm.end_user": item.get("end_user") or None,
        "litellm.trace_id": item.get("trace_id"),
    }.items() if v is not None}
    return Event(
        event_id=str(item.get("id") or item.get("litellm_call_id") or "") or uuid7(),
        timestamp=round(start * 1e6) * 1000,
        source="litellm",
        provider=provider_name(item.get("custom_llm_provider")),
        operation=_OPERATIONS.get(str(item.get("call_type") or "")),
        request_model=item.get("model_group") or item.get("model"),
        response_model=response.get("model") or item.get("model"),
        streaming=streaming,
        upstream=item.get("api_base") or None,
        params=as_dict(item.get("model_parameters")) or None,
        status_code=status,
        error_type=(error_type_for_status(status) or error_type_for_name(
            error_info.get("error_class"))) if failed else None,
        error_message=str(error_info.get("error_message") or item.get("error_str") or "")[:1024]
        or None if failed else None,
        finish_reasons=[str(c["finish_reason"]) for c in choices if c.get("finish_reason")]
        or None,
        input_tokens=as_int(item.get("prompt_tokens")),
        output_tokens=as_int(item.get("completion_tokens")),
        cache_read_tokens=as_int(as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")
                               or usage.get("cache_read_input_tokens")),
        cache_creation_tokens=as_int(usage.get("cache_creation_input_tokens")),
        reasoning_tokens=as_int(as_dict(usage.get("completion_tokens_details")).get(
            "reasoning_tokens")),
        duration_ms=(end - start) * 1000 if end is not None else None,
        ttft_ms=(first_token - start) * 1000
        if streaming and first_token is not None and first_token > start else None,
        user_id=meta.get("user_api_key_user_id") or None,
        api_key_id=str(key_hash)[:API_KEY_ID_CHARS] if key_hash else None,
        api_key_name=meta.get("user_api_key_alias") or None,
        team=meta.get("user_api_key_team_id") or None,
        organization=meta.get("user_api_key_org_id") or None,
        session_id=item.get("session_id") or None,
        metadata=as_metadata(meta.get("spend_logs_metadata")),
        input_messages=as_messages(item.get("messages")),
        output_messages=as_messages([c.get("message") for c in choices]),
        actual_cost_usd=as_float(item.get("response_cost")),
        attributes=attributes or None,
    )





def _status(code: Any) -> int | None:
    number = as_int(code)
    return number if number is not None and 100 <= number < 600 else None
