"""Exporter `http`: each batch POSTed to a URL, for the services that take JSON over HTTP,
in as many requests as `max_request_mb` asks (a service refuses bodies past its limit).

Splunk HEC (`/services/collector/event`, NDJSON), Datadog's logs intake (`/api/v2/logs`,
a JSON array), Elasticsearch and OpenSearch (`/_bulk`), or a service of one's own; the
`projection` shapes each document for the service, `headers` carry its token.

What an answer means, as the delivery loop (`meterline/delivery.py`) understands it:

- 2xx: delivered;
- 408, 429, 5xx, or no answer (refused, reset, timed out): retried with backoff, waiting at
  least the server's `Retry-After`;
- any other status: permanent; the request's events are dead-lettered (and the other
  requests of the batch still sent);
- when a request of a batch is retried, the requests before it were delivered: only its
  events and those after it are sent again;
- a `_bulk` answer with `"errors": true`: per item. Items answered 429 or 5xx are sent
  again (alone), the others that failed (a 400 `mapper_parsing_exception`...) are
  dead-lettered, the rest were stored. With `bulk_action: create`, a 409 is a document an
  earlier attempt stored.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
from typing import Any

import aiohttp
import msgspec

from meterline.backoff import retry_after
from meterline.component import (
    Context,
    ExportBatch,
    Exporter,
    Factory,
    PartialError,
    PermanentError,
    RetryableError,
)
from meterline.delivery import requests_within
from meterline.event import Event
from meterline.exporters.http.body import CONTENT_TYPES, encode
from meterline.exporters.http.config import HttpExporterConfig
from meterline.httpclient import AnswerTooLarge, answer_start, read_answer
from meterline.tls import client_context

_ANSWER_EXCERPT = 300  # characters of an error answer quoted in the log
_BULK_ANSWER_BYTES = 64 << 20  # a `_bulk` answer's, at most (a few hundred bytes an item)


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def request_headers(config: HttpExporterConfig) -> dict[str, str]:
    headers = {"Content-Type": CONTENT_TYPES[config.format], **config.headers}
    if config.bearer_token:
        headers["Authorization"] = f"Bearer {config.bearer_token}"
    if config.basic_auth is not None:
        pair = f"{config.basic_auth.username}:{config.basic_auth.password}".encode()
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
    if config.compression == "gzip":
        headers["Content-Encoding"] = "gzip"
    return headers


class HttpExporter(Exporter):
    def __init__(self, config: HttpExporterConfig, context: Context) -> None:
        self.config = config
        self.headers = request_headers(config)
        self.ssl: ssl.SSLContext | bool = client_context(config.tls) if config.tls else True
        self.session: aiohttp.ClientSession | None = None

    async def export(self, batch: ExportBatch) -> None:
        """The batch in as many requests as `max_request_mb` asks, in order. What a part's
        answer refuses for good is dead-lettered and the other parts still sent; when a
        part must be retried, the parts before it were delivered and are not sent again."""
        parts, alone = await asyncio.to_thread(self._bodies, batch.events)
        retry: list[Event] = []
        failed = list(alone)
        reasons = [f"{len(alone)} event(s) over max_request_mb "
                   f"({self.config.max_request_mb:g}) even alone"] if alone else []
        wait: float | None = None
        for index, (body, events) in enumerate(parts):
            try:
                status, answer, wait = await self._post(body)
                if _retryable(status):
                    raise RetryableError(self._refusal(status, answer), retry_after=wait)
                if not 200 <= status < 300:
                    failed += events
                    reasons.append(self._refusal(status, answer))
                elif self.config.format == "bulk":
                    again, refused, why = self._bulk_failures(events, answer)
                    retry += again
                    failed += refused
                    reasons += why
            except RetryableError as e:
                if not (index or failed or retry):
                    raise
                unsent = [event for _, group in parts[index:] for event in group]
                raise PartialError(str(e), retry + unsent, failed, e.retry_after) from None
        if retry:
            raise PartialError(f"{self.config.endpoint}: {len(retry)} items to retry, "
                               f"{len(failed)} refused ({'; '.join(reasons[:3])})",
                               retry, failed, retry_after=wait)
        if failed:
            raise PermanentError("; ".join(reasons[:3]),
                                 events=None if len(failed) == len(batch.events) else failed)

    def _refusal(self, status: int, answer: bytes) -> str:
        return f"{self.config.endpoint}: HTTP {status}: {answer[:_ANSWER_EXCERPT]!r}"

    def _bodies(self, events: list[Event]) -> tuple[list[tuple[bytes, list[Event]]],
                                                    list[Event]]:
        """The bodies that send `events` within `max_request_mb` (see `requests_within`),
        and the events too big even alone. Projecting and compressing a batch is CPU
        work: it runs in a thread, off the loop that serves the receivers."""
        config = self.config

        def encoded(group: list[Event]) -> bytes:
            return encode(group, config.projection, config.format, config.index,
                          config.bulk_action)

        parts, alone = requests_within(events, encoded, len, config.max_request_mb * (1 << 20))
        if config.compression == "gzip":
            parts = [(gzip.compress(body, 6), group) for body, group in parts]
        return parts, alone

    async def _post(self, body: bytes) -> tuple[int, bytes, float | None]:
        """The answer's status, body and `Retry-After`; no answer is retryable."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=float(self.config.timeout)))
        try:
            async with self.session.post(self.config.endpoint, data=body,
                                         headers=self.headers, ssl=self.ssl) as response:
                # a `_bulk` answer is read whole (it says which items were stored); of
                # any other, what an error's reason quotes
                whole = self.config.format == "bulk" and 200 <= response.status < 300
                answer = await (read_answer(response, _BULK_ANSWER_BYTES) if whole
                                else answer_start(response))
                return response.status, answer, retry_after(response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError, AnswerTooLarge) as e:
            raise RetryableError(f"{self.config.endpoint}: {type(e).__name__}: {e}") from None

    def _bulk_failures(self, events: list[Event], answer: bytes
                       ) -> tuple[list[Event], list[Event], list[str]]:
        """The items of a `_bulk` answer that were not stored: those to send again, those
        refused for good, and why (the first few)."""
        try:
            result = msgspec.json.decode(answer)
        except msgspec.DecodeError:
            raise RetryableError(f"{self.config.endpoint}: a _bulk answer that is not "
                                 f"JSON: {answer[:_ANSWER_EXCERPT]!r}") from None
        if not isinstance(result, dict) or not result.get("errors"):
            return [], [], []
        items = result.get("items")
        if not isinstance(items, list) or len(items) != len(events):
            raise RetryableError(f"{self.config.endpoint}: a _bulk answer with errors and "
                                 f"{len(items or ())} items for {len(events)} documents")
        retry: list[Event] = []
        failed: list[Event] = []
        reasons: list[str] = []
        for event, item in zip(events, items, strict=True):
            status, reason = self._item(item)
            if status is None:
                continue
            (retry if _retryable(status) else failed).append(event)
            if len(reasons) < 3:
                reasons.append(f"{event.event_id}: {status} {reason}")
        return retry, failed, reasons

    def _item(self, item: Any) -> tuple[int | None, str]:
        """An item's status when it was not stored (None when it was), and why."""
        result: Any = next(iter(item.values()), {}) if isinstance(item, dict) and item else {}
        status = result.get("status", 500) if isinstance(result, dict) else 500
        if 200 <= status < 300 or (status == 409 and self.config.bulk_action == "create"):
            return None, ""
        error = result.get("error") if isinstance(result, dict) else None
        kind = error.get("type", "") if isinstance(error, dict) else error or ""
        return status, str(kind)

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


factory = Factory(kind="exporter", type="http", config=HttpExporterConfig, create=HttpExporter)
