"""Ollama's own API: `/api/chat`, `/api/generate`, `/api/embed`.

Ollama streams unless the request says `"stream": false`, one JSON object per
line; the last one (`"done": true`) carries the counts (`prompt_eval_count`,
`eval_count`) and the reason it stopped. Sampling parameters sit in `options`.
"""

from __future__ import annotations

from typing import Any

from meterline.event import Event
from meterline.gateway.shapes.base import (
    TOKEN,
    Shape,
    StreamReader,
    assistant_message,
    pick,
    read_model_and_id,
)
from meterline.lenient import as_dict, as_int

_OPTIONS = ("temperature", "top_p", "top_k", "num_predict", "num_ctx", "seed", "stop",
            "repeat_penalty", "min_p")


class Chat(Shape):
    operation = "chat"
    streams_by_default = True
    output_key = "message"  # where a response carries its output

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.params = pick(as_dict(body.get("options")), _OPTIONS)
        if capture:
            event.input_messages = self._inputs(body) or None

    def _inputs(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages = body.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return
        read_final(body, event)
        if capture:
            event.output_messages = [assistant_message(self.output_text(body), [])]

    def output_text(self, body: dict[str, Any]) -> str | None:
        content = as_dict(body.get("message")).get("content")
        return content if isinstance(content, str) else None

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return LinesStream(self, event, capture)


class Generate(Chat):
    operation = "text_completion"

    def _inputs(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": role, "content": body[key]}
                for role, key in (("system", "system"), ("user", "prompt"))
                if isinstance(body.get(key), str)]

    def output_text(self, body: dict[str, Any]) -> str | None:
        return body.get("response") if isinstance(body.get("response"), str) else None


class Embed(Shape):
    operation = "embeddings"

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.streaming = False
        event.params = pick(as_dict(body.get("options")), _OPTIONS)

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if isinstance(body, dict):
            read_final(body, event)


def read_final(body: dict[str, Any], event: Event) -> None:
    read_model_and_id(body, event)
    event.input_tokens = as_int(body.get("prompt_eval_count"))
    event.output_tokens = as_int(body.get("eval_count"))
    if body.get("done_reason"):
        event.finish_reasons = [str(body["done_reason"])]


class LinesStream(StreamReader):
    def __init__(self, shape: Chat, event: Event, capture: bool) -> None:
        self.shape = shape
        self.event = event
        self.capture = capture
        self.text: list[str] = []

    def feed(self, message: dict[str, Any]) -> int:
        if message.get("done"):
            read_final(message, self.event)
            self.final_usage = True
        text = self.shape.output_text(message)
        if not text:
            return 0
        self.output_deltas += 1
        self.output_chars += len(text)
        if self.capture:
            self.text.append(text)
        return TOKEN

    def finish(self) -> None:
        if self.capture:
            self.event.output_messages = [assistant_message("".join(self.text), [])]


CHAT = Chat()
GENERATE = Generate()
EMBED = Embed()
