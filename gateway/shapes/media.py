"""OpenAI's media endpoints (and those of the providers that copy them): images
(`/images/generations`, `/images/edits`, `/images/variations`), speech
(`/audio/speech`), transcriptions and translations (`/audio/transcriptions`,
`/audio/translations`).

What each call is billed for is recorded as units: the images answered (`data`) with
their size and quality (the answer's when it gives them, gpt-image-1 does, else the
request's), the characters of the text spoken, the seconds of audio transcribed.

Uploads (edits, transcriptions) are `multipart/form-data`, already held whole by the
gateway within `max_body_mb`: only the small text fields are decoded (`form`), a file
is located, never copied. The seconds transcribed come from the answer: `duration`
(`response_format=verbose_json`) or `usage.seconds` (OpenAI's `usage` of type
`duration`; Mistral's `usage.prompt_audio_seconds`); failing those, from the file
only when that is cheap, a WAV file's header (byte rate and data size). Other formats
(MP3, M4A, WebM...) would need decoding: their seconds stay unknown, and so does the
cost of a model priced by the minute.
"""

from __future__ import annotations

import re
import struct
from typing import Any, Final

from meterline.event import Event
from meterline.gateway.shapes.base import (
    TOKEN,
    Shape,
    StreamReader,
    pick,
    read_model_and_id,
)
from meterline.gateway.shapes.openai import read_usage
from meterline.lenient import as_dict, as_float

_MAX_FIELD: Final = 4096  # a form field longer than this is content, not a setting
_MAX_PARTS: Final = 64
_DISPOSITION: Final = re.compile(rb'\b(name|filename)="([^"]*)"', re.IGNORECASE)
_BOUNDARY: Final = re.compile(rb'boundary="?([^";,\s]+)"?', re.IGNORECASE)


class Form:
    """The fields of a multipart body: text values, and where each file lies."""

    __slots__ = ("body", "fields", "files")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.fields: dict[str, str] = {}
        self.files: dict[str, tuple[int, int]] = {}  # name -> (start, end) in the body

    def head(self, name: str, size: int = 4096) -> bytes:
        """The first `size` bytes of a file (empty when there is none)."""
        start, end = self.files.get(name, (0, 0))
        return bytes(self.body[start:min(end, start + size)])


def read_form(body: bytes, content_type: bytes) -> Form | None:
    """A `multipart/form-data` body's fields, or None when it is not one. Finding each
    part's end is a `bytes.find` (memchr-fast) over the body; nothing is copied but the
    short text fields."""
    form = Form(body)
    match = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith(b"multipart/form-data") or match is None:
        return None
    delimiter = b"--" + match.group(1)
    pos = body.find(delimiter)
    for _ in range(_MAX_PARTS):
        if pos < 0:
            break
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        names = {k.lower(): v for k, v in _DISPOSITION.findall(body[pos:head_end])}
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            break
        name = names.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in names:
            form.files[name] = (start, end)
        elif end - start <= _MAX_FIELD:
            form.fields[name] = body[start:end].decode("utf-8", "replace")
        pos = end + 2
    return form


def wav_seconds(head: bytes) -> float | None:
    """The duration of a WAV file from its header: data size / byte rate (None for any
    other format, or a header that does not add up)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk == b"fmt " and pos + 16 <= len(head):
            byte_rate = struct.unpack_from("<I", head, pos + 16)[0]
        elif chunk == b"data":
            return size / byte_rate if byte_rate else None
        pos += 8 + size + (size & 1)
    return None


class MultipartShape(Shape):
    """A shape whose request is a form (an upload), read by `read_form_request`."""

    multipart = True
    form_params: tuple[str, ...] = ()

    def read_form_request(self, form: Form, event: Event, capture: bool) -> None:
        fields = form.fields
        event.request_model = fields.get("model") or None
        event.streaming = fields.get("stream", "").lower() == "true"
        event.params = pick(dict(fields), self.form_params)


def _quality(value: Any) -> str | None:
    return value if isinstance(value, str) and value and value != "auto" else None


class Images(Shape):
    """`/images/generations`: the images answered, their size and quality."""

    operation = "image_generation"
    params = ("n", "size", "quality", "style", "response_format", "background",
              "output_format", "moderation")
    default_model = "dall-e-2"  # OpenAI's, when the request names none

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.request_model = event.request_model or self.default_model
        event.image_size = _quality(body.get("size"))
        event.image_quality = _quality(body.get("quality"))
        if capture and isinstance(body.get("prompt"), str):
            event.input_messages = [{"role": "user", "content": body["prompt"]}]

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        read_image_response(body, event)


def read_image_response(body: Any, event: Event) -> None:
    if not isinstance(body, dict):
        return
    read_model_and_id(body, event)
    data = body.get("data")
    if isinstance(data, list):
        event.images = len(data)
    event.image_size = _quality(body.get("size")) or event.image_size
    event.image_quality = _quality(body.get("quality")) or event.image_quality
    if isinstance(usage := body.get("usage"), dict):  # gpt-image-1: the tokens of its images
        read_usage(usage, event)


class ImageEdits(MultipartShape):
    """`/images/edits` and `/images/variations`: a form with the image(s) to change."""

    operation = "image_generation"
    form_params = ("n", "size", "quality", "response_format", "background", "output_format")

    def read_form_request(self, form: Form, event: Event, capture: bool) -> None:
        super().read_form_request(form, event, capture)
        event.request_model = event.request_model or Images.default_model
        event.image_size = _quality(form.fields.get("size"))
        event.image_quality = _quality(form.fields.get("quality"))

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        read_image_response(body, event)


class Speech(Shape):
    """`/audio/speech`: the answer is audio (not read, not kept); the characters of the
    text spoken are what tts-1 and most voices bill. An SSE answer (`stream_format: sse`,
    gpt-4o-mini-tts) ends with its token usage."""

    operation = "text_to_speech"
    params = ("voice", "response_format", "speed", "stream_format")
    reads_response = False

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        super().read_request(body, event, capture)
        event.streaming = body.get("stream_format") == "sse"
        text = body.get("input")
        if isinstance(text, str):
            event.characters = len(text)
            if capture:
                event.input_messages = [{"role": "user", "content": text}]

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return DoneStream(event, "speech.audio.delta", "speech.audio.done")


class Transcriptions(MultipartShape):
    """`/audio/transcriptions` (and `/audio/translations`): the seconds transcribed, and
    the tokens of the models that report them (gpt-4o-transcribe)."""

    operation = "speech_to_text"
    form_params = ("language", "response_format", "temperature", "timestamp_granularities[]")

    def read_form_request(self, form: Form, event: Event, capture: bool) -> None:
        super().read_form_request(form, event, capture)
        event.audio_input_seconds = wav_seconds(form.head("file"))

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict):
            return  # text, srt, vtt: only the file told the seconds, if it could
        read_transcription(body, event, capture)

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return DoneStream(event, "transcript.text.delta", "transcript.text.done")


def read_transcription(body: dict[str, Any], event: Event, capture: bool) -> None:
    read_model_and_id(body, event)
    seconds = as_float(body.get("duration"))
    usage = as_dict(body.get("usage"))
    if usage.get("type") == "duration":
        seconds = as_float(usage.get("seconds"))
    elif "prompt_audio_seconds" in usage:  # Mistral's Voxtral
        seconds = as_float(usage.get("prompt_audio_seconds"))
    elif "input_tokens" in usage or "prompt_tokens" in usage:
        read_usage(usage, event)
    if seconds is not None:
        event.audio_input_seconds = seconds
    if capture and isinstance(body.get("text"), str):
        event.output_messages = [{"role": "assistant", "content": body["text"]}]


class DoneStream(StreamReader):
    """A stream of `<delta>` events ending in a `<done>` event that carries the usage
    (`transcript.text.done`, `speech.audio.done`)."""

    def __init__(self, event: Event, delta: str, done: str) -> None:
        self.event = event
        self.delta, self.done = delta, done

    def feed(self, message: dict[str, Any]) -> int:
        kind = message.get("type")
        if kind == self.delta:
            self.output_deltas += 1
            return TOKEN
        if kind == self.done:
            usage = as_dict(message.get("usage"))
            if usage:
                self.final_usage = True
                if usage.get("type") == "duration":
                    self.event.audio_input_seconds = as_float(usage.get("seconds"))
                else:
                    read_usage(usage, self.event)
        return 0


IMAGES = Images()
IMAGE_EDITS = ImageEdits()
SPEECH = Speech()
TRANSCRIPTIONS = Transcriptions()
