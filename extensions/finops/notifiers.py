"""Budget notification targets: webhooks, each delivered as an exporter is.

```yaml
extensions:
  finops:
    notifiers:
      slack-finops: {url: "${env:SLACK_WEBHOOK_URL}", format: slack}
      ops: {url: https://ops.example.com/hooks/budgets, format: json,
            headers: {Authorization: "Bearer ${env:OPS_TOKEN}"}}
```

A notifier's config derives from `ExporterConfig`, so it takes the same `queue` and
`retry` blocks, and `crossings.Notifications` runs each one as an `ExporterRunner` over
its own queue: a notification is queued durably (persistent by default) and retried with
backoff like any export. A notification travels through the queue as an `Event` whose
`attributes["budget_notification"]` is the crossing; `WebhookExporter` posts it, one
request per notification (`batch.max_size` is 1), with its id in
`X-Meterline-Notification-Id` so that a receiver can drop the one repeat a crash can
cause (see crossings.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

from meterline import backoff
from meterline.component import ExportBatch, Exporter, PermanentError, RetryableError
from meterline.delivery import BatchConfig, ExporterConfig
from meterline.event import Event
from meterline.extensions.finops.budgets import usd
from meterline.httpclient import answer_start
from meterline.units import Duration

NOTIFICATION = "budget_notification"  # the attribute of the event carrying a notification


class NotifierConfig(ExporterConfig, kw_only=True):
    url: str  # where notifications are POSTed (http or https)
    # slack: a Slack (incoming webhook) message {text, blocks}; json: the crossing itself
    format: Literal["slack", "json"] = "json"
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # sent with each POST
    timeout: Duration = Duration(10)  # one POST, whole
    # one notification per POST (a batch of several would repeat the ones sent before a
    # failure when it is retried)
    batch: BatchConfig = msgspec.field(default_factory=lambda: BatchConfig(max_size=1))

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/path, got {self.url!r}")
        if self.batch.max_size != 1:
            raise ValueError("batch.max_size must be 1: a notification is one POST")


def slack_body(n: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` (the notification's fallback) and blocks.
    A member and scope values come from traffic (a user id, a metadata value): Slack reads
    `<!channel>` in them as a mention of everyone and `<https://...|text>` as a link, so
    `&`, `<` and `>` are escaped as Slack asks."""
    member = f" for {n['per']} {_slack_text(n['member'])}" if n.get("member") else ""
    text = (f"Budget {n['budget']}{member} reached {n['threshold']:.0%} of its limit: "
            f"{usd(n['spend_usd'])} of {usd(n['limit_usd'])} this {n['period']}")
    scope = ", ".join(f"{k}={_slack_text(str(v))}" for k, v in n["scope"].items()) \
        or "all spend"
    details = (f"scope: {scope} · window {n['window_start']} to {n['window_end']} · "
               f"action: {n['action']} · crossed at {n['crossed_at']}")
    return {"text": text, "blocks": [
        {"type": "section", "text": {"type": "mrkdwn", "text": f":warning: *{text}*"}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": details}]}]}


def _slack_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def json_body(n: dict[str, Any]) -> dict[str, Any]:
    return {"type": "budget_threshold_crossed", **n}


_BODIES = {"slack": slack_body, "json": json_body}


class WebhookExporter(Exporter):
    """Posts each notification of a batch; `sent(event)` is awaited after a 2xx, before the
    batch is acknowledged."""

    def __init__(self, config: NotifierConfig,
                 sent: Callable[[Event], Awaitable[None]]) -> None:
        self.config = config
        self.sent = sent
        self.body = _BODIES[config.format]
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=float(self.config.timeout)))

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def export(self, batch: ExportBatch) -> None:
        assert self.session is not None
        for event in batch.events:
            notification = (event.attributes or {})[NOTIFICATION]
            headers = {**self.config.headers, "X-Meterline-Notification-Id": event.event_id}
            try:
                async with self.session.post(self.config.url, json=self.body(notification),
                                             headers=headers) as response:
                    status = response.status
                    text = (await answer_start(response, 1024)).decode(errors="replace")[:200]
                    retry_after = response.headers.get("Retry-After", "")
            except (aiohttp.ClientError, TimeoutError) as e:
                raise RetryableError(f"webhook unreachable: {type(e).__name__} {e}") from e
            if status == 429 or status >= 500:
                raise RetryableError(f"webhook answered HTTP status {status}: {text}",
                                     backoff.retry_after(retry_after))
            if status >= 300:
                raise PermanentError(f"webhook refused the notification: HTTP status {status}: "
                                     f"{text}")
            await self.sent(event)
