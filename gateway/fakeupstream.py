"""A fake LLM provider: OpenAI, Anthropic and Ollama shapes, streaming and not; OpenAI's
images, speech and transcriptions, Cohere's rerank, Gemini's generateContent and
Imagen's predict, not streamed.

Tests, the gateway benchmark and the demo point the gateway at it instead of a
real provider (there is no internet at run time, and a real provider is neither
free nor deterministic). It answers the way the providers do, byte for byte
where it matters to clients and to the gateway: SSE events and their order,
usage where each provider puts it (OpenAI's final usage chunk only when asked
with `stream_options.include_usage`), Ollama's NDJSON, error bodies, rate-limit
headers. Output is `tok0 tok1 ...`; input tokens are the words of the input.

Behaviour is set on the instance (for every request) or per request with
headers, which the gateway forwards:

| header | attribute | |
|---|---|---|
| `x-fake-latency` | `latency` | seconds before the response (or its first chunk) |
| `x-fake-chunk-delay` | `chunk_delay` | seconds between stream chunks |
| `x-fake-tokens` | `tokens` | output tokens |
| `x-fake-status` | `status` | answer this error status, with the provider's error body |
| `x-fake-break-after` | | close the connection after this many stream chunks |
| `x-fake-reply` | | the answer's text (its words are the output tokens) instead of `tok0 tok1 …` |
| `x-fake-images` | | images answered (OpenAI images, Gemini) |
| `x-fake-audio-seconds` | | the duration a transcription answers (default 3.5) |
| `x-fake-echo-key` | | answer 401 (or `x-fake-status`) with an error message that echoes the key |
|  |  | received: `masked` as OpenAI does (`sk-proj-abc***…wxyz`), `clear` whole, as some |
|  |  | proxies do (`Bearer sk-…`; Anthropic: `invalid x-api-key: sk-ant-…`) |

    python -m meterline.gateway.fakeupstream --listen 127.0.0.1:9000 --latency 20ms --tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from meterline.gateway.shapes.media import read_form  # (the gateway's own form reader)
from meterline.httpserver import serve
from meterline.units import Duration, Listen

_encode = msgspec.json.Encoder().encode

_OPENAI_ERRORS = {400: "invalid_request_error", 401: "invalid_request_error",
                  403: "invalid_request_error", 404: "invalid_request_error",
                  429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                     429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass
class Received:
    """A request as the fake upstream got it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer_port: int  # the client's port: the same for requests on one kept-alive connection


@dataclass
class _Plan:
    """How to answer one request: the instance's settings, overridden by headers."""

    latency: float
    chunk_delay: float
    tokens: int
    status: int | None
    break_after: int | None
    model: str
    input_tokens: int
    texts: list[str] = field(default_factory=list)
    echo_key: str | None = None  # `masked` or `clear`: the error message echoes the key
    reply: list[str] | None = None  # the answer's words, when the request set them

    def word(self, i: int) -> str:
        """Output token `i`, as streams send it."""
        return f"{self.reply[i]} " if self.reply is not None else f"tok{i} "

    def output(self) -> str:
        return "".join(self.word(i) for i in range(self.tokens))


class FakeUpstream:
    def __init__(self, listen: str = "127.0.0.1:0", *, latency: float = 0.0,
                 chunk_delay: float = 0.0, tokens: int = 5, cached_tokens: int = 0,
                 cache_creation_tokens: int = 0, reasoning_tokens: int = 0,
                 status: int | None = None, keep: int = 1000) -> None:
        self.listen = Listen.from_config(listen)
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.tokens = tokens
        self.cached_tokens = cached_tokens
        self.cache_creation_tokens = cache_creation_tokens
        self.reasoning_tokens = reasoning_tokens
        self.status = status
        self.requests: deque[Received] = deque(maxlen=keep)  # the latest, for tests
        self.served = 0  # responses completed
        self.streams_open = 0  # streams being written now
        self.streams_cut = 0  # streams whose client closed the connection before the end
        self.handlers_cut = 0  # requests whose client closed the connection before the answer
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = self.listen.host if self.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=256 << 20)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = await serve(app, self.listen, handler_cancellation=True)
        site = next(iter(self._runner.sites))
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- dispatch ------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(Received(request.method, request.path, dict(request.headers), body,
                                      peer[1] if peer else 0))
        path = request.path
        plan = self._plan(request, body if isinstance(body, dict) else {})
        if request.method == "GET" and path.endswith("/models"):
            return self._json({"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}]})
        if request.method != "POST":
            return web.json_response({"error": {"message": f"no route {path}"}}, status=404)
        if plan.latency:
            try:
                await asyncio.sleep(plan.latency)
            except asyncio.CancelledError:
                self.handlers_cut += 1
                raise
        if plan.status is not None:
            return self._error(path, plan.status, _echoed(request, plan.echo_key))
        stream = isinstance(body, dict) and body.get("stream")
        for suffix, answer in self._routes:
            if path.endswith(suffix):
                default_stream = suffix.startswith("/api/") and suffix != "/api/embed"
                streaming = stream if stream is not None else default_stream
                return await answer(self, request, body or {}, plan, bool(streaming))
        return web.json_response({"error": {"message": f"no route {path}"}}, status=404)

    def _plan(self, request: web.Request, body: dict[str, Any]) -> _Plan:
        h = request.headers
        status = h.get("x-fake-status")
        brk = h.get("x-fake-break-after")
        echo = h.get("x-fake-echo-key")
        if echo and not status:
            status = "401"
        texts = _texts(body)
        reply = h["x-fake-reply"].split() if h.get("x-fake-reply") else None
        return _Plan(
            latency=_seconds(h.get("x-fake-latency"), self.latency),
            chunk_delay=_seconds(h.get("x-fake-chunk-delay"), self.chunk_delay),
            tokens=len(reply) if reply is not None else int(h.get("x-fake-tokens", self.tokens)),
            status=int(status) if status else self.status,
            break_after=int(brk) if brk else None,
            model=str(body.get("model") or "fake-model"),
            input_tokens=sum(len(t.split()) for t in texts), texts=texts, echo_key=echo,
            reply=reply)

    def _json(self, payload: Any, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
        self.served += 1
        return web.Response(body=_encode(payload), status=status, content_type="application/json",
                            headers=headers)

    def _error(self, path: str, status: int, echoed: str | None = None) -> web.Response:
        message = f"fake upstream error {status}"
        if echoed is not None:
            message = (f"invalid x-api-key: {echoed}" if path.endswith("/messages") else
                       f"Incorrect API key provided: {echoed}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
        if path.endswith("/messages"):
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            return self._json({"type": "error", "error": {"type": kind, "message": message}},
                              status)
        if path.startswith("/api/"):
            return self._json({"error": message}, status)
        code = "invalid_api_key" if status == 401 else _OPENAI_ERRORS.get(status, "server_error")
        return self._json({"error": {"message": message, "type": _OPENAI_ERRORS.get(
            status, "server_error"), "param": None, "code": code}}, status)

    async def _stream(self, request: web.Request, plan: _Plan, content_type: str,
                      chunks: Callable[[], AsyncIterator[bytes]],
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, **headers})
        await response.prepare(request)
        self.streams_open += 1
        sent = 0
        try:
            async for chunk in chunks():
                if plan.break_after is not None and sent >= plan.break_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(chunk)
                sent += 1
            await response.write_eof()
            self.served += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.streams_cut += 1
            raise
        finally:
            self.streams_open -= 1
        return response

    async def _pace(self, plan: _Plan, index: int) -> None:
        if plan.chunk_delay and index:
            await asyncio.sleep(plan.chunk_delay)

    # --- OpenAI ------------------------------------------------------------------------
    def _openai_usage(self, plan: _Plan, responses: bool = False) -> dict[str, Any]:
        if responses:
            return {"input_tokens": plan.input_tokens, "output_tokens": plan.tokens,
                    "total_tokens": plan.input_tokens + plan.tokens,
                    "input_tokens_details": {"cached_tokens": self.cached_tokens},
                    "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}
        return {"prompt_tokens": plan.input_tokens, "completion_tokens": plan.tokens,
                "total_tokens": plan.input_tokens + plan.tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    async def _chat(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                    stream: bool, text_completion: bool = False) -> web.StreamResponse:
        model = f"{plan.model}-2025-01-01"
        kind = "text_completion" if text_completion else "chat.completion"
        base = {"id": f"cmpl-fake-{self.served}", "created": int(time.time()), "model": model,
                "service_tier": _served_tier(body)}
        if not stream:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if text_completion:
                choice["text"] = plan.output()
            else:
                choice["message"] = {"role": "assistant", "content": plan.output()}
            return self._json({**base, "object": kind, "choices": [choice],
                               "usage": self._openai_usage(plan)}, headers=_OPENAI_LIMITS)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        chunk_kind = kind if text_completion else "chat.completion.chunk"

        def choice_of(text: str | None, finish: str | None) -> dict[str, Any]:
            if text_completion:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish}

        async def chunks() -> AsyncIterator[bytes]:
            head = {**base, "object": chunk_kind, **extra}
            if not text_completion:
                yield _sse({**head, "choices": [{"index": 0, "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None}]})
            for i in range(plan.tokens):
                await self._pace(plan, i)
                yield _sse({**head, "choices": [choice_of(plan.word(i), None)]})
            yield _sse({**head, "choices": [choice_of(None, "stop")]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": self._openai_usage(plan)})
            yield b"data: [DONE]\n\n"

        return await self._stream(request, plan, "text/event-stream", chunks, _OPENAI_LIMITS)

    async def _completions(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                           stream: bool) -> web.StreamResponse:
        return await self._chat(request, body, plan, stream, text_completion=True)

    async def _embeddings(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                          stream: bool) -> web.StreamResponse:
        return self._json({"object": "list", "model": plan.model, "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(max(1, len(plan.texts)))],
            "usage": {"prompt_tokens": plan.input_tokens, "total_tokens": plan.input_tokens}},
            headers=_OPENAI_LIMITS)

    async def _responses(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                         stream: bool) -> web.StreamResponse:
        text = plan.output()
        response = {"id": f"resp_fake{self.served}", "object": "response",
                    "created_at": int(time.time()), "model": f"{plan.model}-2025-01-01",
                    "service_tier": _served_tier(body), "status": "completed", "output": [
                        {"type": "message", "id": "msg_fake", "status": "completed",
                         "role": "assistant", "content": [
                             {"type": "output_text", "text": text, "annotations": []}]}],
                    "usage": self._openai_usage(plan, responses=True)}
        if not stream:
            return self._json(response, headers=_OPENAI_LIMITS)

        async def chunks() -> AsyncIterator[bytes]:
            created = {**response, "status": "in_progress", "output": [], "usage": None}
            yield _sse({"type": "response.created", "sequence_number": 0,
                        "response": created}, "response.created")
            for i in range(plan.tokens):
                await self._pace(plan, i)
                yield _sse({"type": "response.output_text.delta", "sequence_number": i + 1,
                            "item_id": "msg_fake", "output_index": 0, "content_index": 0,
                            "delta": plan.word(i), "logprobs": []},
                           "response.output_text.delta")
            yield _sse({"type": "response.completed", "sequence_number": plan.tokens + 1,
                        "response": response}, "response.completed")

        return await self._stream(request, plan, "text/event-stream", chunks, _OPENAI_LIMITS)

    # --- Anthropic --------------------------------------------------------------------
    async def _messages(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                        stream: bool) -> web.StreamResponse:
        usage = {"input_tokens": plan.input_tokens, "output_tokens": plan.tokens,
                 "cache_read_input_tokens": self.cached_tokens,
                 "cache_creation_input_tokens": self.cache_creation_tokens}
        message = {"id": f"msg_fake{self.served}", "type": "message", "role": "assistant",
                   "model": plan.model, "stop_reason": "end_turn", "stop_sequence": None}
        if not stream:
            return self._json({**message, "content": [{"type": "text",
                                                       "text": plan.output()}],
                               "usage": usage}, headers=_ANTHROPIC_LIMITS)

        async def chunks() -> AsyncIterator[bytes]:
            start: dict[str, Any] = {**message, "content": [], "stop_reason": None,
                     "usage": {**usage, "output_tokens": 1}}
            yield _sse({"type": "message_start", "message": start}, "message_start")
            yield _sse({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}, "content_block_start")
            yield _sse({"type": "ping"}, "ping")
            for i in range(plan.tokens):
                await self._pace(plan, i)
                yield _sse({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": plan.word(i)}},
                           "content_block_delta")
            yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            yield _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                            "stop_sequence": None},
                        "usage": {"output_tokens": plan.tokens}}, "message_delta")
            yield _sse({"type": "message_stop"}, "message_stop")

        return await self._stream(request, plan, "text/event-stream", chunks,
                                  _ANTHROPIC_LIMITS)

    # --- Ollama ---------------------------------------------------------------------------
    async def _ollama(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        chat = request.path.endswith("/api/chat")

        def line(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": plan.model, "created_at": "2025-01-01T00:00:00Z"}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            if done:
                out.update(done_reason="stop", total_duration=1000, prompt_eval_count=(
                    plan.input_tokens), eval_count=plan.tokens)
            return out

        if not stream:
            return self._json(line(plan.output(), True))

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(plan.tokens):
                await self._pace(plan, i)
                yield _encode(line(plan.word(i), False)) + b"\n"
            yield _encode(line("", True)) + b"\n"

        return await self._stream(request, plan, "application/x-ndjson", chunks, {})

    async def _ollama_embed(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                            stream: bool) -> web.StreamResponse:
        return self._json({"model": plan.model, "embeddings": [[0.1, 0.2, 0.3]],
                           "prompt_eval_count": plan.input_tokens})

    # --- media, rerank, Gemini -------------------------------------------------------------
    async def _images(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        """OpenAI's images: `n` images (`x-fake-images` overrides); gpt-image-1 also
        answers its size, quality and the tokens of its images."""
        count = int(request.headers.get("x-fake-images", body.get("n") or 1))
        answer: dict[str, Any] = {"created": int(time.time()), "data": [
            {"b64_json": "aW1hZ2U=", "revised_prompt": None} for _ in range(count)]}
        if str(body.get("model", "")).startswith("gpt-image"):
            size = body.get("size") if body.get("size") not in (None, "auto") else "1024x1024"
            quality = body.get("quality") if body.get("quality") not in (None, "auto") \
                else "medium"
            answer.update(size=size, quality=quality, output_format="png", usage={
                "input_tokens": plan.input_tokens, "output_tokens": 1056 * count,
                "total_tokens": plan.input_tokens + 1056 * count,
                "input_tokens_details": {"text_tokens": plan.input_tokens, "image_tokens": 0}})
        return self._json(answer, headers=_OPENAI_LIMITS)

    async def _speech(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        """OpenAI's speech: audio bytes (as many as characters asked for, times 100)."""
        self.served += 1
        return web.Response(body=b"ID3" + b"\0" * (100 * len(str(body.get("input", "")))),
                            content_type="audio/mpeg", headers=_OPENAI_LIMITS)

    async def _transcription(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                             stream: bool) -> web.StreamResponse:
        """OpenAI's transcriptions: the form's `response_format`; `x-fake-audio-seconds`
        (default 3.5) is the duration answered. whisper-1 reports it as `usage.seconds`,
        the gpt-4o-*-transcribe models report tokens."""
        form = read_form(await request.read(), request.headers.get("content-type", "").encode())
        fields = form.fields if form is not None else {}
        seconds = float(request.headers.get("x-fake-audio-seconds", "3.5"))
        text = plan.output().strip()
        model = fields.get("model", "whisper-1")
        response_format = fields.get("response_format", "json")
        if response_format == "text":
            self.served += 1
            return web.Response(text=text, content_type="text/plain")
        if response_format == "verbose_json":
            return self._json({"task": "transcribe", "language": "english",
                               "duration": seconds, "text": text, "segments": []})
        usage: dict[str, Any] = {"type": "duration", "seconds": int(seconds + 0.5)}
        if "transcribe" in model:
            audio = int(seconds * 10)
            usage = {"type": "tokens", "input_tokens": audio, "output_tokens": plan.tokens,
                     "total_tokens": audio + plan.tokens,
                     "input_token_details": {"text_tokens": 0, "audio_tokens": audio}}
        return self._json({"text": text, "usage": usage})

    async def _rerank(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        """Cohere's rerank: one search unit per 100 documents."""
        documents = body.get("documents") or []
        return self._json({"id": f"rerank-fake-{self.served}", "results": [
            {"index": i, "relevance_score": round(1 - i / (len(documents) + 1), 3)}
            for i in range(min(len(documents), int(body.get("top_n") or len(documents))))],
            "meta": {"api_version": {"version": "2"},
                     "billed_units": {"search_units": max(1, -(-len(documents) // 100))}}})

    async def _gemini(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        """Gemini's generateContent (not streamed): text, and `x-fake-images` images."""
        images = int(request.headers.get("x-fake-images", "0"))
        model = request.path.rsplit("/", 1)[-1].split(":")[0]
        texts = [p for c in body.get("contents") or [] for p in c.get("parts") or []
                 if isinstance(p, dict) and isinstance(p.get("text"), str)]
        prompt = sum(len(p["text"].split()) for p in texts)
        parts: list[dict[str, Any]] = [{"text": plan.output()}]
        parts += [{"inlineData": {"mimeType": "image/png", "data": "aW1hZ2U="}}] * images
        return self._json({"candidates": [{"content": {"role": "model", "parts": parts},
                                           "finishReason": "STOP", "index": 0}],
                           "usageMetadata": {"promptTokenCount": prompt,
                                             "candidatesTokenCount": plan.tokens + 1290 * images,
                                             "totalTokenCount": prompt + plan.tokens},
                           "modelVersion": model, "responseId": f"gemini-fake-{self.served}"})

    async def _imagen(self, request: web.Request, body: dict[str, Any], plan: _Plan,
                      stream: bool) -> web.StreamResponse:
        """Imagen's predict: `parameters.sampleCount` images."""
        count = int((body.get("parameters") or {}).get("sampleCount") or 1)
        return self._json({"predictions": [{"mimeType": "image/png",
                                            "bytesBase64Encoded": "aW1hZ2U="}] * count})

    _routes = (("/api/chat", _ollama), ("/api/generate", _ollama), ("/api/embed", _ollama_embed),
               ("/chat/completions", _chat), ("/completions", _completions),
               ("/embeddings", _embeddings), ("/responses", _responses),
               ("/messages", _messages), ("/images/generations", _images),
               ("/audio/speech", _speech), ("/audio/transcriptions", _transcription),
               ("/audio/translations", _transcription), ("/rerank", _rerank),
               (":generateContent", _gemini), (":predict", _imagen))


_OPENAI_LIMITS = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
                  "x-ratelimit-limit-tokens": "200000",
                  "x-ratelimit-remaining-tokens": "199000"}
_ANTHROPIC_LIMITS = {"anthropic-ratelimit-requests-limit": "4000",
                     "anthropic-ratelimit-requests-remaining": "3999",
                     "anthropic-ratelimit-tokens-limit": "400000",
                     "anthropic-ratelimit-tokens-remaining": "399000"}


def _served_tier(body: dict[str, Any]) -> str:
    """The tier OpenAI answers as having served a call: the one asked for, if it is one it
    has (`flex`, `priority`), else `default` (for `auto` too)."""
    asked = body.get("service_tier")
    return asked if asked in ("flex", "priority") else "default"


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + _encode(payload) + b"\n\n"


def _echoed(request: web.Request, how: str | None) -> str | None:
    """The credential received, as an error message echoes it: whole (`clear`: the
    Authorization value with its scheme), or OpenAI's way (`masked`: the first 8 and the
    last 4 characters of the key, stars between)."""
    if how is None:
        return None
    h = request.headers
    names = ("x-api-key", "authorization", "api-key") if request.path.endswith("/messages") \
        else ("authorization", "api-key", "x-api-key")
    value = next((h[name] for name in names if h.get(name)), "")
    if how == "clear":
        return value
    key = value.removeprefix("Bearer ")
    return key[:8] + "*" * max(len(key) - 12, 4) + key[-4:]


def _seconds(header: str | None, default: float) -> float:
    """A delay header: seconds (`0.05`), or a duration with its unit (`50ms`)."""
    if header is None:
        return default
    try:
        return float(header)
    except ValueError:
        return float(Duration.from_config(header))


def _texts(body: dict[str, Any]) -> list[str]:
    """The input text of any of the request shapes."""
    texts: list[str] = []
    for key in ("messages", "input", "prompt", "system", "instructions"):
        value = body.get(key)
        items = value if isinstance(value, list) else [value]
        for item in items:
            content = item.get("content") if isinstance(item, dict) else item
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(p["text"] for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a fake LLM provider (OpenAI, Anthropic, "
                                     "Ollama shapes) for tests, benchmarks and demos")
    parser.add_argument("--listen", default="127.0.0.1:9000")
    parser.add_argument("--latency", default="0s", help="delay before each response")
    parser.add_argument("--chunk-delay", default="0s", help="delay between stream chunks")
    parser.add_argument("--tokens", type=int, default=5, help="output tokens per response")
    args = parser.parse_args(argv)

    async def run() -> None:
        fake = FakeUpstream(args.listen, latency=float(Duration.from_config(args.latency)),
                            chunk_delay=float(Duration.from_config(args.chunk_delay)),
                            tokens=args.tokens)
        await fake.start()
        print(f"fake upstream listening on {fake.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
