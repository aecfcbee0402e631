"""API shapes: how each provider API's requests, responses and streams read.

The shape is chosen by the path called (its end: `/chat/completions`,
`/images/generations`, `/audio/transcriptions`, `/rerank`, `:generateContent`...),
not by the upstream: Ollama serves both its own `/api/chat` and OpenAI's
`/v1/chat/completions`, and many providers speak OpenAI's API. A shape reads the
request body (model, parameters, stream, messages; an upload's form fields), may
adjust it (ask OpenAI for the usage of a stream), and reads the response, whole or
as a stream of messages, into the event, with the units it is billed for (images,
characters, seconds of audio, searches). Paths no shape knows are forwarded
untouched and recorded with what the HTTP exchange tells.
"""

from __future__ import annotations

from typing import Final

from meterline.gateway.shapes import anthropic, cohere, gemini, media, ollama, openai
from meterline.gateway.shapes.base import (
    DROP,
    TOKEN,
    USAGE_ESTIMATED,
    Shape,
    StreamReader,
    input_chars,
    read_error,
)

__all__ = ["DROP", "TOKEN", "USAGE_ESTIMATED", "Shape", "StreamReader", "input_chars",
           "read_error", "shape_for"]

_SUFFIXES: Final[tuple[tuple[str, Shape], ...]] = (
    ("/api/chat", ollama.CHAT),
    ("/api/generate", ollama.GENERATE),
    ("/api/embed", ollama.EMBED),
    ("/api/embeddings", ollama.EMBED),
    ("/chat/completions", openai.CHAT),
    ("/completions", openai.COMPLETIONS),
    ("/embeddings", openai.EMBEDDINGS),
    ("/responses", openai.RESPONSES),
    ("/messages", anthropic.MESSAGES),
    ("/images/generations", media.IMAGES),
    ("/images/edits", media.IMAGE_EDITS),
    ("/images/variations", media.IMAGE_EDITS),
    ("/audio/speech", media.SPEECH),
    ("/audio/transcriptions", media.TRANSCRIPTIONS),
    ("/audio/translations", media.TRANSCRIPTIONS),
    ("/rerank", cohere.RERANK),
    (":generateContent", gemini.GENERATE_CONTENT),
    (":streamGenerateContent", gemini.GENERATE_CONTENT),
    (":predict", gemini.PREDICT),
    (":predictLongRunning", gemini.PREDICT_LONG_RUNNING),
)
_by_path: dict[str, Shape | None] = {}


def shape_for(path: str) -> Shape | None:
    """The shape of a path, matched by its end (so that Azure's
    `/openai/deployments/D/chat/completions` reads as chat completions)."""
    try:
        return _by_path[path]
    except KeyError:
        pass
    shape = next((s for suffix, s in _SUFFIXES if path.endswith(suffix)), None)
    if len(_by_path) > 4096:  # paths with ids in them: keep the cache bounded
        _by_path.clear()
    _by_path[path] = shape
    return shape
