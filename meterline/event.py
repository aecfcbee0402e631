"""The event: one typed record per LLM call, and its versioned JSON form.

An `Event` is a msgspec `Struct`: decoding a batch of JSON straight into structs
and encoding it back are the cheapest per-event operations Python offers, and
per-event cost is the budget that limits throughput. `None` always means "not
reported" (never 0), and such fields are omitted from the JSON form. The JSON
form always carries `schema_version`, so that a reader can tell which schema an
event was written against; decoding accepts it absent (hand-written events) and
refuses unknown fields, which belong in `attributes`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any, Final, Literal

import msgspec

SCHEMA_VERSION: Final = 1


def uuid7() -> str:
    """A UUIDv7 string: time-ordered, so ids sort (and cluster in storage) by time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 66 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


GuardrailStage = Literal["input", "output"]
GuardrailAction = Literal["monitor", "redact", "block"]


class Guardrail(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                gc=False):
    """One guardrail rule that fired on a call (a rule that passed is not recorded)."""

    rule: str  # the rule's name in its gateway's config
    stage: GuardrailStage  # "input" (the request) or "output" (the answer)
    # "monitor" (only recorded), "redact" (masked, then sent on) or "block". Any other
    # value is refused with the event: the FinOps answers count blocked and modified calls
    # by these words, and would miss a "Block" or a "blocked".
    action: GuardrailAction
    detector: str | None = None  # what matched: a detector (email), a pattern set, a topic


class Event(
    msgspec.Struct,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,  # never in a reference cycle; untracked, it costs the collector nothing
    tag_field="schema_version",
    tag=SCHEMA_VERSION,
):
    """One LLM call. Field names follow the OpenTelemetry GenAI conventions."""

    event_id: str = msgspec.field(default_factory=uuid7)
    timestamp: int = msgspec.field(default_factory=time.time_ns)  # request start, epoch ns
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    source: str | None = None

    provider: str | None = None
    operation: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    streaming: bool | None = None
    endpoint: str | None = None
    route: str | None = None
    upstream: str | None = None
    params: dict[str, Any] | None = None

    # agents and tools (OpenTelemetry GenAI agent spans, MCP): operation is then
    # execute_tool, invoke_agent, create_agent or an MCP method's operation
    agent_name: str | None = None
    agent_id: str | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None
    mcp_method: str | None = None  # the MCP JSON-RPC method (tools/call, initialize...)
    mcp_session_id: str | None = None
    request_bytes: int | None = None  # the body sent (a tool call's arguments)
    response_bytes: int | None = None  # the body answered (a tool call's result)

    status_code: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    finish_reasons: list[str] | None = None

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    # among those, the tokens written to a cache kept for an hour (Anthropic's `ttl: 1h`),
    # billed at their own rate; the rest were written for five minutes
    cache_creation_1h_tokens: int | None = None
    reasoning_tokens: int | None = None
    # audio tokens among the input and output tokens (OpenAI's audio and realtime models,
    # Gemini's audio input), billed at their own rate; the text tokens are the rest
    audio_input_tokens: int | None = None
    audio_output_tokens: int | None = None

    # what a call is billed for besides tokens (see docs/event.md, "Units")
    images: int | None = None  # images generated
    image_size: str | None = None  # their size, as answered or requested: 1024x1024
    image_quality: str | None = None  # their quality: standard, hd, low, medium, high
    audio_input_seconds: float | None = None  # audio transcribed or translated
    audio_output_seconds: float | None = None  # audio synthesised
    characters: int | None = None  # text characters synthesised into speech
    video_seconds: float | None = None  # video generated
    search_queries: int | None = None  # rerank searches (search units), web searches
    batch: bool | None = None  # a batch-API call (billed at the batch price)
    # the tier that served the call, as the provider answered it (OpenAI: default, flex,
    # priority; Anthropic: standard, priority), billed at that tier's rates
    service_tier: str | None = None

    duration_ms: float | None = None
    provider_duration_ms: float | None = None
    overhead_ms: float | None = None
    ttft_ms: float | None = None
    itl_ms: float | None = None

    user_id: str | None = None
    api_key_id: str | None = None
    api_key_name: str | None = None
    team: str | None = None
    organization: str | None = None
    session_id: str | None = None
    metadata: dict[str, str] | None = None

    ratelimit_requests_limit: int | None = None
    ratelimit_requests_remaining: int | None = None
    ratelimit_tokens_limit: int | None = None
    ratelimit_tokens_remaining: int | None = None

    attempts: int | None = None
    fallback: bool | None = None
    cache_hit: bool | None = None  # answered from a cache (a proxy's, a gateway's), not a provider
    tags: list[str] | None = None  # the request's own tags (LiteLLM `request_tags`...)
    # policies that acted on the call: rate_limit, load_balanced, fallback, budget, guardrails
    policies: list[str] | None = None
    guardrails: list[Guardrail] | None = None  # the guardrail rules that fired

    input_messages: list[dict[str, Any]] | None = None
    output_messages: list[dict[str, Any]] | None = None

    cost_input_usd: float | None = None
    cost_output_usd: float | None = None
    cost_usd: float | None = None
    actual_cost_usd: float | None = None
    saved_cost_usd: float | None = None  # a cache hit: what the provider would have billed
    pricing_ref: str | None = None

    sample_weight: float = 1.0
    redactions: dict[str, int] | None = None
    attributes: dict[str, Any] | None = None


FIELDS: Final = frozenset(Event.__struct_fields__)

API_KEY_ID_CHARS: Final = 16


def add_policy(event: Event, policy: str) -> None:
    """Note on the event that a policy acted on the call (once, whatever the times)."""
    if policy not in (event.policies or ()):
        event.policies = [*(event.policies or ()), policy]


def api_key_id(key: bytes | str) -> str:
    """The `api_key_id` of a key: a prefix of its sha256, never the key. LiteLLM's
    `user_api_key_hash` is the same sha256, so a key seen by either gets the same id."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:API_KEY_ID_CHARS]

_json_encoder = msgspec.json.Encoder()
_pack_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_events_decoder = msgspec.json.Decoder(list[Event])
_packed_events_decoder = msgspec.msgpack.Decoder(list[Event])


def to_json(event: Event) -> bytes:
    """The event's JSON form, as the file exporter writes it and the webhook reads it."""
    return _json_encoder.encode(event)


def to_jsonl(events: list[Event]) -> bytes:
    """Events as JSON lines, each terminated by a newline."""
    return _json_encoder.encode_lines(events)


JSONL_PIECE = 32  # events encoded per call by `jsonl_pieces`


def jsonl_pieces(events: list[Event]) -> Iterator[bytes]:
    """`to_jsonl` in pieces of `JSONL_PIECE` events, for a thread writing a whole batch:
    msgspec holds the GIL for all of one call, and a batch of long prompts (10,000 of
    60 KB is 600 MB of JSON) encoded at once would stall the event loop for as long;
    between pieces it runs. The pieces cost what one call costs. Each is encoded when it
    is taken, so a writer that writes them as they come holds one piece, not the batch's
    whole JSON (10,000 events of 1.4 KB: 14 MB)."""
    for i in range(0, len(events), JSONL_PIECE):
        yield _json_encoder.encode_lines(events[i:i + JSONL_PIECE])


def from_json(data: bytes | str) -> Event:
    return _event_decoder.decode(data)


def list_from_json(data: bytes | str) -> list[Event]:
    """Decode a JSON array of events in one call (the fast path for batches)."""
    return _events_decoder.decode(data)


def from_dict(obj: dict[str, Any]) -> Event:
    """Validate a parsed JSON object as an event; raises `msgspec.ValidationError`."""
    return msgspec.convert(obj, Event)


def to_dict(event: Event) -> dict[str, Any]:
    return msgspec.to_builtins(event)


def pack(events: list[Event]) -> bytes:
    """Compact binary form (msgpack) used inside the persistent queue."""
    return _pack_encoder.encode(events)


def unpack(data: bytes | memoryview) -> list[Event]:
    return _packed_events_decoder.decode(data)


def clone(events: list[Event]) -> list[Event]:
    """Deep copies, for a second pipeline whose processors may mutate what they get."""
    return unpack(pack(events))
