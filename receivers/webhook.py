"""Receiver `webhook`: `POST /v1/events` with JSON events from anything that posts them.

Takes a JSON object, a JSON array or NDJSON (gzip, deflate or zstd encoded or
not; decoded step by step within `max_body_mb`, see `meterline.httpserver`): meterline's
own events, Otoroshi's `LLMUsageAudit` events (its webhook data exporter) and
LiteLLM's `StandardLoggingPayload` (its generic API logger). It answers only
once the accepted events are durably queued, with how many were accepted and,
for each refused item, why. Otoroshi events other than `LLMUsageAudit` (an
unfiltered data exporter sends them all) are skipped and counted as
`not_llm_call`, not refused: the answer says how many (`skipped`). When a queue
is full it answers 429 with `Retry-After`, having queued nothing, so the
sender's retry loses nothing.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from meterline.auth import BearerToken, unauthorised
from meterline.backpressure import Refused, refuse_encoded
from meterline.component import Consumer, Context, Factory, Receiver
from meterline.httpserver import BearerListenerConfig, BodyRefused, read_body, serve
from meterline.receivers.decoders import (
    DecodeError,
    TooManyItems,
    decode_body,
    decode_ndjson,
    loggable,
)
from meterline.units import Listen

_JSON_TYPES = {"application/json", "text/json"}
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl",
                 "application/x-jsonlines", "application/jsonlines"}
_MAX_REASONS = 100


class WebhookConfig(BearerListenerConfig):
    """Also `auth_token`, `tls`, `read_timeout`, `keepalive_timeout` and `max_connections`
    (`BearerListenerConfig`)."""

    listen: Listen = Listen("127.0.0.1:8090")  # where events are received (:8090: all interfaces)
    path: str = "/v1/events"  # where events are POSTed
    max_body_mb: float = 16  # after decoding (gzip, deflate, zstd)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with /, got {self.path!r}")
        if self.max_body_mb <= 0:
            raise ValueError("max_body_mb must be positive")


class WebhookReceiver(Receiver):
    def __init__(self, config: WebhookConfig, context: Context, consumer: Consumer) -> None:
        super().__init__(consumer)
        self.config = config
        self.log = context.log
        self.auth = BearerToken(config.auth_token)
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=int(self.config.max_body_mb * (1 << 20)))
        app.router.add_post(self.config.path, self.handle)
        self.runner = await serve(app, self.config.listen, self.config, self.log,
                                  decode_bodies=False, shutdown_timeout=5.0)
        self.log.info("webhook listening", listen=self.config.listen, path=self.config.path)

    async def shutdown(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        if not self.auth.admits_request(request):
            return unauthorised()
        ctype = request.content_type.lower()
        if ctype not in _JSON_TYPES and ctype not in _NDJSON_TYPES:
            return _error(415, f"unsupported Content-Type {ctype!r}: send application/json "
                               "(an object or an array) or application/x-ndjson")
        try:
            body = await read_body(request, int(self.config.max_body_mb * (1 << 20)),
                                   "max_body_mb", float(self.config.read_timeout))
        except BodyRefused as e:
            return _error(e.status, e.message)
        decode = decode_ndjson if ctype in _NDJSON_TYPES else decode_body
        try:
            received = await refuse_encoded(self.consumer, decode, body, self.log)
        except DecodeError as e:
            self.consumer.refused(1, "undecodable")
            return _error(413 if isinstance(e, TooManyItems) else 400, str(e))
        except Refused as e:
            return _error(e.status, str(e), e.headers)
        if received.skipped:
            self.consumer.refused(received.skipped, "not_llm_call")
        if received.rejected:
            self.consumer.refused(len(received.rejected), "undecodable")
            self.log.info("items refused", count=len(received.rejected),
                          first_reason=loggable(received.rejected[0][1]))
        answer: dict[str, Any] = {
            "accepted": received.accepted,
            "rejected": [{"index": i, "reason": r}
                         for i, r in received.rejected[:_MAX_REASONS]],
        }
        if received.skipped:
            answer["skipped"] = received.skipped
        if len(received.rejected) > _MAX_REASONS:
            answer["rejected_count"] = len(received.rejected)
        status = 400 if received.rejected and not received.accepted else 200
        return web.json_response(answer, status=status)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


factory = Factory(kind="receiver", type="webhook", config=WebhookConfig, create=WebhookReceiver)
