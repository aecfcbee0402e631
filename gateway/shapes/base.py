"""What every API shape has in common, and helpers for reading loose JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from meterline.event import Event
from meterline.genai import error_of, error_type

TOKEN: Final = 1  # the stream message carried output (a token, a tool call delta...)
DROP: Final = 2  # the stream message is not forwarded to the client

# Set (true) on an event whose token counts are the gateway's estimate, not the provider's
# figures: a stream cut before the provider reported its final usage
USAGE_ESTIMATED: Final = "meterline.usage_estimated"
CHARS_PER_TOKEN: Final = 4  # the usual rule of thumb for English text and code

_MAX_ERROR_MESSAGE = 1024
_encoder = msgspec.json.Encoder()


def estimated_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


class StreamReader:
    """Reads the messages of one streamed response, then fills the event.

    A reader counts the output it saw (`output_deltas`: messages that carried output;
    `output_chars`: the characters of text, reasoning and tool-call arguments in them) and
    notes whether the provider's final usage arrived (`final_usage`), so that a stream cut
    short (`cut`) still records the usage known so far."""

    event: Event
    output_deltas = 0
    output_chars = 0
    final_usage = False  # the provider's counts for the whole call (or so far) were read

    def feed(self, message: dict[str, Any]) -> int:
        """Take one parsed message; return TOKEN and DROP flags."""
        raise NotImplementedError

    def finish(self) -> None:
        """The stream ended: write what was gathered into the event."""

    def cut(self, input_chars: Callable[[], int]) -> None:
        """The stream ended before its end (the client left, the upstream broke off or went
        silent, the gateway stopped): write what was gathered and, unless the provider
        already reported its usage, the usage so far, marked as estimated:

        - `output_tokens`: the larger of the output messages seen (each holds at least one
          token) and their characters / `CHARS_PER_TOKEN`, or what the provider reported
          so far if that is more (Anthropic's `message_start` count);
        - `input_tokens`: what the provider reported (Anthropic's `message_start`), else
          the request's text (messages, prompt, system, tool definitions: `input_chars()`)
          / `CHARS_PER_TOKEN`.
        """
        self.finish()
        if self.final_usage:
            return
        event = self.event
        output = max(self.output_deltas, estimated_tokens(self.output_chars))
        if event.output_tokens is None or event.output_tokens < output:
            event.output_tokens = output
        if event.input_tokens is None:
            event.input_tokens = estimated_tokens(input_chars())
        set_attribute(event, USAGE_ESTIMATED, True)


class Shape:
    """One API operation (e.g. OpenAI chat completions). Stateless; one instance each."""

    operation: str = ""
    streams_by_default = False  # Ollama streams unless told `"stream": false`
    params: tuple[str, ...] = ()  # request keys recorded in `params`
    multipart = False  # the request is a form (an upload): `read_form_request`, not JSON
    reads_response = True  # the answer is JSON to read (false: audio, relayed unread)

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        model = body.get("model")
        event.request_model = model if isinstance(model, str) else None
        stream = body.get("stream")
        event.streaming = stream if isinstance(stream, bool) else self.streams_by_default
        event.params = pick(body, self.params)

    def read_form_request(self, form: Any, event: Event, capture: bool) -> None:
        """A `multipart` request's fields (a `media.Form`)."""

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
    """The category and message of an error body (`genai.error_of`): the status decides
    the category, the body's own name when the status says little."""
    names, message = error_of(body) if isinstance(body, dict) else ([], None)
    event.error_type = error_type(event.status_code, names[0] if names else None)
    if message:
        event.error_message = message[:_MAX_ERROR_MESSAGE]


_TEXT_KEYS: Final = ("messages", "input", "prompt", "system", "instructions", "content",
                     "text", "output", "arguments", "function", "tool_calls")


def input_chars(body: Any) -> int:
    """The characters of a request body's text (any shape): messages and their parts,
    prompt, system and instructions, tool calls and results, and the tool definitions
    (as JSON). Images and other binary parts are not counted."""
    if not isinstance(body, dict):
        return 0
    try:
        chars = _text_chars(body)
    except RecursionError:  # nested deeper than any real request
        return 0
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chars += len(_encoder.encode(tools))
    return chars


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_chars(value[key]) for key in _TEXT_KEYS if key in value)
    return 0


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
