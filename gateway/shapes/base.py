"""What every API shape has in common, and helpers for reading loose JSON."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from meterline.event import Event
from meterline.genai import error_type

TOKEN: Final = 1  # the stream message carried output (a token, a tool call delta...)
DROP: Final = 2  # the stream message is not forwarded to the client

_MAX_ERROR_MESSAGE = 1024
_encoder = msgspec.json.Encoder()


class StreamReader:
    """Reads the messages of one streamed response, then fills the event."""

    def feed(self, message: dict[str, Any]) -> int:
        """Take one parsed message; return TOKEN and DROP flags."""
        raise NotImplementedError

    def finish(self) -> None:
        """The stream ended: write what was gathered into the event."""


class Shape:
    """One API operation (e.g. OpenAI chat completions). Stateless; one instance each."""

    operation: str = ""
    streams_by_default = False  # Ollama streams unless told `"stream": false`
    params: tuple[str, ...] = ()  # request keys recorded in `params`

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        model = body.get("model")
        event.request_model = model if isinstance(model, str) else None
        stream = body.get("stream")
        event.streaming = stream if isinstance(stream, bool) else self.streams_by_default
        event.params = pick(body, self.params)

    def ask_usage(self, body: dict[str, Any]) -> bool:
        """Change the request so that a stream reports its usage; True if it was changed
        (the stream then carries a message the client did not ask for, to drop)."""
        return False

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        """A whole (non-streamed) successful response body."""

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader | None:
        return None

    def error_body(self, kind: str, message: str) -> bytes:
        """The body of an error the gateway itself answers, as this API writes errors."""
        return _encoder.encode({"error": {"message": message, "type": kind, "code": kind}})


def read_error(body: Any, event: Event) -> None:
    """The category and message of an error body: OpenAI's `{"error": {type, code,
    message}}`, Anthropic's `{"type": "error", "error": {...}}`, Ollama's
    `{"error": "..."}`, or a bare `{type|code, message}` stream event."""
    if not isinstance(body, dict):
        event.error_type = error_type(event.status_code, None)
        return
    error = body.get("error")
    if isinstance(error, dict):
        name, message = error.get("type") or error.get("code"), error.get("message")
    elif isinstance(error, str):
        name, message = None, error
    else:
        name, message = body.get("code") or body.get("type"), body.get("message")
    event.error_type = error_type(event.status_code, name if isinstance(name, str) else None)
    if message:
        event.error_message = str(message)[:_MAX_ERROR_MESSAGE]


def pick(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The request parameters among `keys` that are present and not null."""
    params = {key: body[key] for key in keys if body.get(key) is not None}
    return params or None


def read_model_and_id(body: dict[str, Any], event: Event) -> None:
    """The response's model and id, where every API puts them (`model`, `id`)."""
    if isinstance(body.get("model"), str):
        event.response_model = body["model"]
    if isinstance(body.get("id"), str):
        set_attribute(event, "gen_ai.response.id", body["id"])


def set_attribute(event: Event, key: str, value: Any) -> None:
    if event.attributes is None:
        event.attributes = {}
    event.attributes[key] = value


def text_of(content: Any) -> str | None:
    """Text of a message content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part["text"] for part in content
                 if isinstance(part, dict) and isinstance(part.get("text"), str)]
        return "".join(texts) if texts else None
    return None


def assistant_message(text: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message
