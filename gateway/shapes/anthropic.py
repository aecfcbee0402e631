"""Anthropic's Messages API (`/v1/messages`).

Usage comes in `message_start` (input and cache counts) and `message_delta`
(the output count so far, and in newer versions the input counts again).
Anthropic's `input_tokens` excludes cached tokens; the event's `input_tokens`
counts all input, as OpenAI's `prompt_tokens` does and as the GenAI conventions
ask, so the three counts are summed and the cached ones also reported apart. The
web search tool's requests (`usage.server_tool_use.web_search_requests`, billed
apart) are the event's `search_queries`.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from meterline.event import Event
from meterline.gateway.shapes.base import (
    TOKEN,
    Shape,
    StreamReader,
    assistant_message,
    read_model_and_id,
    set_attribute,
    text_of,
)
from meterline.genai import INFERENCE_GEO, SPEED
from meterline.lenient import as_dict, as_int

_encoder = msgspec.json.Encoder()


class Usage:
    """Anthropic's counts, merged as they arrive, written as the event's."""

    __slots__ = ("cache_creation", "cache_creation_1h", "cache_read", "inference_geo",
                 "input", "output", "service_tier", "speed", "web_searches")

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.cache_read: int | None = None
        self.cache_creation: int | None = None
        self.cache_creation_1h: int | None = None  # written for an hour (`ttl: 1h`)
        self.web_searches: int | None = None  # the web search tool's requests
        self.service_tier: str | None = None  # standard, priority, batch
        self.inference_geo: str | None = None  # where it ran: us, global
        self.speed: str | None = None  # fast mode or standard

    def merge(self, usage: dict[str, Any]) -> None:
        for attr, key in (("input", "input_tokens"), ("output", "output_tokens"),
                          ("cache_read", "cache_read_input_tokens"),
                          ("cache_creation", "cache_creation_input_tokens")):
            value = as_int(usage.get(key))
            if value is not None:
                setattr(self, attr, value)
        searches = as_int(as_dict(usage.get("server_tool_use")).get("web_search_requests"))
        if searches is not None:
            self.web_searches = searches
        for_an_hour = as_int(as_dict(usage.get("cache_creation")).get(
            "ephemeral_1h_input_tokens"))
        if for_an_hour is not None:
            self.cache_creation_1h = for_an_hour
        if isinstance(tier := usage.get("service_tier"), str) and tier:
            self.service_tier = tier
        if isinstance(geo := usage.get("inference_geo"), str) and geo:
            self.inference_geo = geo
        if isinstance(speed := usage.get("speed"), str) and speed:
            self.speed = speed

    def write(self, event: Event) -> None:
        counts = [c for c in (self.input, self.cache_read, self.cache_creation) if c is not None]
        event.input_tokens = sum(counts) if counts else None
        event.output_tokens = self.output
        event.cache_read_tokens = self.cache_read
        event.cache_creation_tokens = self.cache_creation
        event.cache_creation_1h_tokens = self.cache_creation_1h
        event.search_queries = self.web_searches
        event.service_tier = self.service_tier
        if self.inference_geo is not None:
            set_attribute(event, INFERENCE_GEO, self.inference_geo)
        if self.speed is not None:
            set_attribute(event, SPEED, self.speed)


class Messages(Shape):
    operation = "chat"
    params = ("max_tokens", "temperature", "top_p", "top_k", "stop_sequences")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        budget = as_dict(body.get("thinking")).get("budget_tokens")
        if budget is not None:
            event.params = {**(event.params or {}), "thinking_budget_tokens": budget}
        user = as_dict(body.get("metadata")).get("user_id")
        if event.user_id is None and isinstance(user, str):
            event.user_id = user
        if not capture:
            return
        messages: list[dict[str, Any]] = []
        if body.get("system"):
            messages.append({"role": "system", "content": body["system"]})
        if isinstance(body.get("messages"), list):
            messages.extend(m for m in body["messages"] if isinstance(m, dict))
        event.input_messages = messages or None

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return
        read_model_and_id(body, event)
        usage = Usage()
        usage.merge(as_dict(body.get("usage")))
        usage.write(event)
        if body.get("stop_reason"):
            event.finish_reasons = [str(body["stop_reason"])]
        if capture:
            blocks = [b for b in body.get("content") or () if isinstance(b, dict)]
            tool_calls = [_tool_call(b, b.get("input")) for b in blocks
                          if b.get("type") == "tool_use"]
            event.output_messages = [assistant_message(text_of(blocks), tool_calls)]

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return MessagesStream(event, capture)

    def error_body(self, kind: str, message: str) -> bytes:
        return _encoder.encode({"type": "error", "error": {"type": kind, "message": message}})


def _tool_call(block: dict[str, Any], arguments: Any) -> dict[str, Any]:
    if not isinstance(arguments, str):
        arguments = _encoder.encode(arguments).decode()
    return {"id": block.get("id"), "type": "function",
            "function": {"name": block.get("name"), "arguments": arguments}}


class MessagesStream(StreamReader):
    _OUTPUT_DELTAS: Final = {"text_delta": "text", "input_json_delta": "partial_json",
                             "thinking_delta": "thinking"}  # each delta type's output

    def __init__(self, event: Event, capture: bool) -> None:
        self.event = event
        self.capture = capture
        self.usage = Usage()
        self.text: list[str] = []
        self.tools: dict[int, tuple[dict[str, Any], list[str]]] = {}

    def feed(self, message: dict[str, Any]) -> int:
        kind = message.get("type")
        if kind == "content_block_delta":
            delta = as_dict(message.get("delta"))
            delta_kind = delta.get("type")
            if delta_kind not in self._OUTPUT_DELTAS:
                return 0
            self.output_deltas += 1
            text = delta.get(self._OUTPUT_DELTAS[delta_kind])
            if isinstance(text, str):
                self.output_chars += len(text)
            if self.capture:
                if delta_kind == "text_delta" and isinstance(delta.get("text"), str):
                    self.text.append(delta["text"])
                elif delta_kind == "input_json_delta" and message.get("index") in self.tools:
                    self.tools[message["index"]][1].append(str(delta.get("partial_json", "")))
            return TOKEN
        if kind == "content_block_start":
            block = as_dict(message.get("content_block"))
            if self.capture and block.get("type") == "tool_use":
                self.tools[message.get("index", 0)] = (block, [])
        elif kind == "message_start":
            start = as_dict(message.get("message"))
            self.usage.merge(as_dict(start.get("usage")))
            read_model_and_id(start, self.event)
        elif kind == "message_delta":
            usage = as_dict(message.get("usage"))
            self.usage.merge(usage)
            self.final_usage = self.final_usage or bool(usage)
            reason = as_dict(message.get("delta")).get("stop_reason")
            if reason:
                self.event.finish_reasons = [str(reason)]
        return 0

    def finish(self) -> None:
        self.usage.write(self.event)
        if self.capture:
            tool_calls = [_tool_call(block, "".join(parts)) for block, parts in
                          self.tools.values()]
            self.event.output_messages = [
                assistant_message("".join(self.text) if self.text else None, tool_calls)]


MESSAGES = Messages()
