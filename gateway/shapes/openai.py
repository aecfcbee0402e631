"""OpenAI's API (and every OpenAI-compatible one): chat completions, completions,
embeddings and responses.

A chat or completions stream reports its usage only when the request asked for
it (`stream_options.include_usage`); when the client did not, the gateway asks
and drops the extra final chunk (no choices, only usage) from what the client
sees. `prompt_tokens` already counts cached tokens, as `input_tokens` should (and audio
tokens, counted apart too: the audio and realtime models bill them at their own rate). The
Responses API's `web_search_call` output items are the event's `search_queries`.
"""

from __future__ import annotations

from typing import Any

from meterline.event import Event
from meterline.gateway.shapes.base import (
    DROP,
    TOKEN,
    Shape,
    StreamReader,
    assistant_message,
    read_error,
    read_model_and_id,
    set_attribute,
    text_of,
)
from meterline.lenient import as_dict, as_int

_SAMPLING = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty",
             "seed", "n", "stop")


def read_usage(usage: dict[str, Any], event: Event) -> None:
    """Chat/completions usage (`prompt_tokens`...) or responses usage (`input_tokens`...;
    the realtime and transcription models name their details `input_token_details`)."""
    if "prompt_tokens" in usage:
        event.input_tokens = as_int(usage.get("prompt_tokens"))
        event.output_tokens = as_int(usage.get("completion_tokens"))
        inputs = as_dict(usage.get("prompt_tokens_details"))
        outputs = as_dict(usage.get("completion_tokens_details"))
    else:
        event.input_tokens = as_int(usage.get("input_tokens"))
        event.output_tokens = as_int(usage.get("output_tokens"))
        inputs = as_dict(usage.get("input_tokens_details") or usage.get("input_token_details"))
        outputs = as_dict(usage.get("output_tokens_details")
                          or usage.get("output_token_details"))
    event.cache_read_tokens = as_int(inputs.get("cached_tokens"))
    event.reasoning_tokens = as_int(outputs.get("reasoning_tokens"))
    event.audio_input_tokens = as_int(inputs.get("audio_tokens"))
    event.audio_output_tokens = as_int(outputs.get("audio_tokens"))


def read_service_tier(body: dict[str, Any], event: Event) -> None:
    """The tier that served the call (`default`, `flex`, `priority`), which its price
    depends on; the request's `service_tier` (`auto`) says only what was asked."""
    tier = body.get("service_tier")
    if isinstance(tier, str) and tier:
        event.service_tier = tier


def _read_user(body: dict[str, Any], event: Event) -> None:
    user = body.get("user") or body.get("safety_identifier")
    if event.user_id is None and isinstance(user, str):
        event.user_id = user


class ChatCompletions(Shape):
    operation = "chat"
    params: tuple[str, ...] = (*_SAMPLING, "max_completion_tokens", "reasoning_effort", "logprobs",
              "top_logprobs", "service_tier", "parallel_tool_calls")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type"):
            event.params = {**(event.params or {}), "response_format": response_format["type"]}
        _read_user(body, event)
        messages = body.get("messages")
        if capture and isinstance(messages, list):
            event.input_messages = [m for m in messages if isinstance(m, dict)] or None

    def ask_usage(self, body: dict[str, Any]) -> bool:
        if body.get("stream") is not True:
            return False
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            return False
        body["stream_options"] = {**as_dict(options), "include_usage": True}
        return True

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return
        read_model_and_id(body, event)
        read_service_tier(body, event)
        read_usage(as_dict(body.get("usage")), event)
        choices = [c for c in body.get("choices") or () if isinstance(c, dict)]
        event.finish_reasons = [str(c["finish_reason"]) for c in choices
                                if c.get("finish_reason")] or None
        if capture:
            event.output_messages = self._outputs(choices) or None

    def _outputs(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c["message"] for c in choices if isinstance(c.get("message"), dict)]

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return ChoicesStream(event, capture, drop_usage)


class Completions(ChatCompletions):
    operation = "text_completion"
    params = (*_SAMPLING, "best_of", "logprobs", "echo", "suffix")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        Shape.read_request(self, body, event, capture)
        _read_user(body, event)
        prompt = body.get("prompt")
        if capture and prompt is not None:
            prompts = prompt if isinstance(prompt, list) else [prompt]
            event.input_messages = [{"role": "user", "content": p} for p in prompts
                                    if isinstance(p, str)] or None

    def _outputs(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [assistant_message(c["text"], []) for c in choices if isinstance(c.get("text"), str)]


class ChoicesStream(StreamReader):
    """Chat and completions chunks: `choices[].delta` (or `.text`), a final usage chunk."""

    def __init__(self, event: Event, capture: bool, drop_usage: bool) -> None:
        self.event = event
        self.capture = capture
        self.drop_usage = drop_usage
        self.texts: dict[int, list[str]] = {}
        self.tools: dict[int, dict[int, dict[str, Any]]] = {}
        self.finish_reasons: list[str] = []
        self.response_id: str | None = None

    def feed(self, message: dict[str, Any]) -> int:
        flags = 0
        event = self.event
        if event.response_model is None and isinstance(message.get("model"), str):
            event.response_model = message["model"]
        if event.service_tier is None:
            read_service_tier(message, event)
        choices = message.get("choices")
        usage = message.get("usage")
        if usage:
            read_usage(as_dict(usage), event)
            self.final_usage = True
            if self.drop_usage and not choices:
                flags |= DROP
        if choices:
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    flags |= self._delta(choice.get("index", 0), delta)
                elif isinstance(text := choice.get("text"), str) and text:
                    flags |= TOKEN
                    self.output_deltas += 1
                    self.output_chars += len(text)
                    if self.capture:
                        self.texts.setdefault(choice.get("index", 0), []).append(text)
                if choice.get("finish_reason"):
                    self.finish_reasons.append(str(choice["finish_reason"]))
        if self.response_id is None and isinstance(message.get("id"), str):
            self.response_id = message["id"]
            set_attribute(event, "gen_ai.response.id", self.response_id)
        return flags

    def _delta(self, index: int, delta: dict[str, Any]) -> int:
        content = delta.get("content")
        tool_calls = delta.get("tool_calls")
        reasoning = delta.get("reasoning_content")
        refusal = delta.get("refusal")
        if not (content or tool_calls or reasoning or refusal):
            return 0
        self.output_deltas += 1
        self.output_chars += sum(len(text) for text in (content, reasoning, refusal)
                                 if isinstance(text, str))
        if isinstance(tool_calls, list):
            for call in tool_calls:
                function = as_dict(call.get("function")) if isinstance(call, dict) else {}
                self.output_chars += sum(len(function[key]) for key in ("name", "arguments")
                                         if isinstance(function.get(key), str))
        if self.capture:
            if isinstance(content, str) and content:
                self.texts.setdefault(index, []).append(content)
            if isinstance(tool_calls, list):
                calls = self.tools.setdefault(index, {})
                for call in tool_calls:
                    if isinstance(call, dict):
                        self._tool_delta(calls, call)
        return TOKEN

    @staticmethod
    def _tool_delta(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
        call = calls.setdefault(delta.get("index", 0), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        function = as_dict(delta.get("function"))
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                call["function"][key] += function[key]

    def finish(self) -> None:
        self.event.finish_reasons = self.finish_reasons or None
        if self.capture:
            indexes = sorted({*self.texts, *self.tools})
            self.event.output_messages = [
                assistant_message("".join(self.texts[i]) if i in self.texts else None,
                                  list(self.tools.get(i, {}).values()))
                for i in indexes] or None


class Embeddings(Shape):
    operation = "embeddings"
    params = ("dimensions", "encoding_format")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.streaming = False
        _read_user(body, event)

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if isinstance(body, dict):
            read_model_and_id(body, event)
            read_usage(as_dict(body.get("usage")), event)


class Responses(Shape):
    """The Responses API: typed stream events, usage always reported at the end."""

    operation = "chat"
    params = ("temperature", "top_p", "max_output_tokens", "max_tool_calls", "service_tier",
              "parallel_tool_calls", "truncation")

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        effort = as_dict(body.get("reasoning")).get("effort")
        if effort:
            event.params = {**(event.params or {}), "reasoning_effort": effort}
        _read_user(body, event)
        if not capture:
            return
        messages: list[dict[str, Any]] = []
        if isinstance(body.get("instructions"), str):
            messages.append({"role": "system", "content": body["instructions"]})
        items = body.get("input")
        if isinstance(items, str):
            messages.append({"role": "user", "content": items})
        elif isinstance(items, list):
            messages.extend(item for item in items if isinstance(item, dict))
        event.input_messages = messages or None

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return
        read_model_and_id(body, event)
        read_service_tier(body, event)
        read_usage(as_dict(body.get("usage")), event)
        status = body.get("status")
        reason = as_dict(body.get("incomplete_details")).get("reason")
        if status or reason:
            event.finish_reasons = [str(reason or status)]
        if body.get("error"):
            read_error(body, event)
        items = body.get("output")
        if isinstance(items, list):  # the built-in web search tool's calls, billed apart
            searches = sum(1 for item in items if isinstance(item, dict)
                           and item.get("type") == "web_search_call")
            event.search_queries = searches or None
        if capture:
            event.output_messages = _response_outputs(items) or None

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return ResponsesStream(self, event, capture)


def _response_outputs(items: Any) -> list[dict[str, Any]]:
    text: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            text.append(text_of(item.get("content")) or "")
        elif item.get("type") == "function_call":
            tool_calls.append({"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}})
    return [assistant_message("".join(text), tool_calls)] if text or tool_calls else []


class ResponsesStream(StreamReader):
    _OUTPUT_EVENTS = frozenset({"response.output_text.delta", "response.refusal.delta",
                                "response.function_call_arguments.delta",
                                "response.reasoning_summary_text.delta"})
    _FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def __init__(self, shape: Responses, event: Event, capture: bool) -> None:
        self.shape = shape
        self.event = event
        self.capture = capture

    def feed(self, message: dict[str, Any]) -> int:
        kind = message.get("type")
        if kind in self._OUTPUT_EVENTS:
            self.output_deltas += 1
            delta = message.get("delta")
            if isinstance(delta, str):
                self.output_chars += len(delta)
            return TOKEN
        if kind in self._FINAL_EVENTS:
            self.shape.read_response(message.get("response"), self.event, self.capture)
            self.final_usage = True
        elif kind == "response.created" and self.event.response_model is None:
            model = as_dict(message.get("response")).get("model")
            self.event.response_model = model if isinstance(model, str) else None
        return 0


CHAT = ChatCompletions()
COMPLETIONS = Completions()
EMBEDDINGS = Embeddings()
RESPONSES = Responses()
