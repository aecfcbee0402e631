"""Google's Gemini API (and Vertex AI's): `models/M:generateContent`,
`:streamGenerateContent`, Imagen's `:predict`, Veo's `:predictLongRunning`.

The model is in the path, not the body. `usageMetadata` counts the prompt
(`promptTokenCount`, cached tokens included, plus `toolUsePromptTokenCount`) and the
answer apart from its thoughts (`candidatesTokenCount`, `thoughtsTokenCount`): the
event's `output_tokens` counts both, as the GenAI conventions ask; the `AUDIO` entries of
`promptTokensDetails` and `candidatesTokensDetails` are its audio tokens. Images in the answer
(`inlineData` parts of an image type) are counted in `images`; the queries grounding
with Google Search ran (`groundingMetadata.webSearchQueries`) in `search_queries`. A
stream (`?alt=sse`, or a JSON array without it) repeats the usage so far in each chunk.
Imagen answers one prediction per image; Veo answers an operation: the seconds of
video are the request's (`durationSeconds` x `sampleCount`), recorded once the
operation is accepted.
"""

from __future__ import annotations

import re
from typing import Any, Final

from meterline.event import Event
from meterline.gateway.shapes.base import TOKEN, Shape, StreamReader, set_attribute
from meterline.lenient import as_dict, as_float, as_int, as_list

_MODEL: Final = re.compile(r"/models/([^/:]+):")
_VEO_SECONDS: Final = 8  # Veo's default duration, when the request gives none


def _model(event: Event) -> None:
    if m := _MODEL.search(event.endpoint or ""):
        event.request_model = m.group(1)


def read_usage(usage: dict[str, Any], event: Event) -> None:
    prompt = as_int(usage.get("promptTokenCount"))
    tools = as_int(usage.get("toolUsePromptTokenCount")) or 0
    answer = as_int(usage.get("candidatesTokenCount"))
    thoughts = as_int(usage.get("thoughtsTokenCount"))
    event.input_tokens = None if prompt is None else prompt + tools
    event.output_tokens = None if answer is None and thoughts is None else (
        (answer or 0) + (thoughts or 0))
    event.reasoning_tokens = thoughts
    event.cache_read_tokens = as_int(usage.get("cachedContentTokenCount"))
    event.audio_input_tokens = _modality(usage.get("promptTokensDetails"), "AUDIO")
    event.audio_output_tokens = _modality(usage.get("candidatesTokensDetails"), "AUDIO")
    traffic = usage.get("trafficType")  # ON_DEMAND, ON_DEMAND_PRIORITY, FLEX...: the tier
    if isinstance(traffic, str) and traffic:
        event.service_tier = traffic


def _modality(details: Any, modality: str) -> int | None:
    """The tokens of one modality in a list of `{modality, tokenCount}` (None: it lists
    none of that modality)."""
    counts = [as_int(d.get("tokenCount")) or 0 for d in as_list(details)
              if isinstance(d, dict) and d.get("modality") == modality]
    return sum(counts) if counts else None


def _candidates(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in as_list(body.get("candidates")) if isinstance(c, dict)]


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in as_list(as_dict(candidate.get("content")).get("parts"))
            if isinstance(p, dict)]


def _is_image(part: dict[str, Any]) -> bool:
    mime = as_dict(part.get("inlineData") or part.get("inline_data")).get("mimeType")
    return isinstance(mime, str) and mime.startswith("image/")


class GenerateContent(Shape):
    operation = "generate_content"

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        _model(event)
        event.streaming = ":streamGenerateContent" in (event.endpoint or "")
        config = as_dict(body.get("generationConfig"))
        params = {k: config[k] for k in ("temperature", "topP", "topK", "maxOutputTokens",
                                         "candidateCount", "seed") if config.get(k) is not None}
        event.params = params or None
        if capture and isinstance(body.get("contents"), list):
            event.input_messages = [c for c in body["contents"] if isinstance(c, dict)] or None

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        chunks = body if isinstance(body, list) else [body]  # a stream without alt=sse
        reader = ChunkStream(event)
        for chunk in chunks:
            if isinstance(chunk, dict):
                reader.feed(chunk)
        reader.finish()

    def stream(self, event: Event, capture: bool, drop_usage: bool) -> StreamReader:
        return ChunkStream(event)


class ChunkStream(StreamReader):
    """Each chunk is a whole `GenerateContentResponse` holding the usage so far."""

    def __init__(self, event: Event) -> None:
        self.event = event
        self.images = 0
        self.searches: int | None = None
        self.finish_reasons: list[str] = []

    def feed(self, message: dict[str, Any]) -> int:
        event = self.event
        flags = 0
        if isinstance(message.get("modelVersion"), str):
            event.response_model = message["modelVersion"]
        if isinstance(message.get("responseId"), str):
            set_attribute(event, "gen_ai.response.id", message["responseId"])
        usage = as_dict(message.get("usageMetadata"))
        if usage:
            read_usage(usage, event)
            self.final_usage = "candidatesTokenCount" in usage
        for candidate in _candidates(message):
            for part in _parts(candidate):
                if _is_image(part):
                    self.images += 1
                    flags = TOKEN
                elif isinstance(text := part.get("text"), str) and text:
                    self.output_deltas += 1
                    self.output_chars += len(text)
                    flags = TOKEN
            queries = as_dict(candidate.get("groundingMetadata")).get("webSearchQueries")
            if isinstance(queries, list):
                self.searches = (self.searches or 0) + len(queries)
            if isinstance(reason := candidate.get("finishReason"), str):
                self.finish_reasons.append(reason)
        return flags

    def finish(self) -> None:
        event = self.event
        if self.images:
            event.images = self.images
        if self.searches is not None:
            event.search_queries = self.searches
        if self.finish_reasons:
            event.finish_reasons = self.finish_reasons[-1:]


class Predict(Shape):
    """Imagen's `:predict`: one prediction per image generated."""

    operation = "image_generation"

    def read_request(self, body: dict[str, Any], event: Event, capture: bool) -> None:
        _model(event)
        event.streaming = False
        parameters = as_dict(body.get("parameters"))
        params = {k: parameters[k] for k in ("sampleCount", "aspectRatio", "sampleImageSize",
                                             "durationSeconds", "resolution")
                  if parameters.get(k) is not None}
        event.params = params or None
        size = parameters.get("sampleImageSize") or parameters.get("aspectRatio")
        event.image_size = size if isinstance(size, str) else None

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if isinstance(body, dict) and isinstance(body.get("predictions"), list):
            event.images = sum(1 for p in body["predictions"] if isinstance(p, dict)
                               and ("bytesBase64Encoded" in p or "gcsUri" in p))


class PredictLongRunning(Predict):
    """Veo's `:predictLongRunning`: the answer is an operation, the video comes later;
    its seconds are the request's."""

    operation = "video_generation"

    def read_response(self, body: Any, event: Event, capture: bool) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            return
        params = event.params or {}
        seconds = as_float(params.get("durationSeconds")) or _VEO_SECONDS
        event.video_seconds = seconds * (as_int(params.get("sampleCount")) or 1)
        set_attribute(event, "gen_ai.response.id", body["name"])


GENERATE_CONTENT = GenerateContent()
PREDICT = Predict()
PREDICT_LONG_RUNNING = PredictLongRunning()
