"""The `billing` option of the `finops` extension: pulling the OpenAI and Anthropic cost APIs
on a schedule, and how often the variance gauges are recomputed.

```yaml
extensions:
  finops:
    billing:
      openai: {admin_key_env: OPENAI_ADMIN_KEY}        # GET /v1/organization/costs
      anthropic: {admin_key_env: ANTHROPIC_ADMIN_KEY}  # GET /v1/organizations/cost_report
      refresh: 1h         # pull, then recompute the meterline_billing_* gauges
      lookback_days: 7    # the days pulled each time (today included): late lines replace
      variance_days: 7    # the gauges' window: whole days before today
```

The keys are read from the environment when pulling (never written in the file). Every
page is followed (`has_more`, `next_page`); a pull's lines are stored only once every page
was read, and replace the ones stored for the same days (`store.py`).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from meterline.component import Config
from meterline.extensions.finops.billing.formats import lines_of_pages
from meterline.extensions.finops.billing.lines import BillingLine
from meterline.httpclient import answer_start, read_answer
from meterline.units import Duration

MAX_PAGES = 1000
MAX_PAGE_BYTES = 32 << 20  # of one page of a cost API's answer


class CostApi(Config):
    # the environment variable holding an admin key (OpenAI: an admin key, sk-admin-...;
    # Anthropic: an Admin API key, sk-ant-admin...)
    admin_key_env: str
    # the API's base URL (default https://api.openai.com or https://api.anthropic.com)
    url: str | None = None


class BillingConfig(Config):
    openai: CostApi | None = None  # pull OpenAI's organization costs
    anthropic: CostApi | None = None  # pull Anthropic's cost report
    refresh: Duration = Duration(3600)  # how often to pull and recompute the gauges
    lookback_days: int = 7  # the days each pull asks for, today included
    variance_days: int = 7  # the gauges' window, in whole days before today

    def __post_init__(self) -> None:
        if self.refresh <= 0:
            raise ValueError("refresh must be a positive duration such as 1h")
        for name in ("lookback_days", "variance_days"):
            if not 1 <= getattr(self, name) <= 180:
                raise ValueError(f"{name} must be from 1 to 180 days")


DEFAULT_URLS = {"openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}


async def pull(session: aiohttp.ClientSession, provider: str, api: CostApi, days: int,
               now: datetime | None = None) -> list[BillingLine]:
    """The lines of the last `days` days (today included) from a provider's cost API."""
    key = os.environ.get(api.admin_key_env)
    if not key:
        raise ValueError(f"billing.{provider}: the environment variable {api.admin_key_env} "
                         "(admin_key_env) is not set")
    today = (now or datetime.now(UTC)).astimezone(UTC).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
    since, until = today - timedelta(days=days - 1), today + timedelta(days=1)
    base = (api.url or DEFAULT_URLS[provider]).rstrip("/")
    if provider == "openai":
        url = f"{base}/v1/organization/costs"
        headers = {"Authorization": f"Bearer {key}"}
        params: list[tuple[str, str]] = [
            ("start_time", str(int(since.timestamp()))), ("end_time", str(int(until.timestamp()))),
            ("bucket_width", "1d"), ("group_by", "line_item"), ("group_by", "project_id"),
            ("limit", "180")]
    else:
        url = f"{base}/v1/organizations/cost_report"
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        params = [("starting_at", since.strftime("%Y-%m-%dT%H:%M:%SZ")),
                  ("ending_at", until.strftime("%Y-%m-%dT%H:%M:%SZ")), ("bucket_width", "1d"),
                  ("group_by[]", "workspace_id"), ("group_by[]", "description"),
                  ("limit", "31")]
    pages = await _pages(session, url, headers, params)
    return lines_of_pages(pages, provider, url)


async def _pages(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                 params: list[tuple[str, str]]) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    page: str | None = None
    while len(pages) < MAX_PAGES:
        query = params + ([("page", page)] if page else [])
        async with session.get(url, params=query, headers=headers) as response:
            if response.status != 200:
                reason = (await answer_start(response)).decode(errors="replace")[:300]
                raise RuntimeError(f"{url} answered {response.status}: {reason}")
            try:
                body = json.loads(await read_answer(response, MAX_PAGE_BYTES))
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{url}: the answer is not a JSON page: {e}") from None
        if not isinstance(body, dict):
            raise ValueError(f"{url}: expected a JSON page (an object), got "
                             f"{type(body).__name__}")
        pages.append(body)
        page = body.get("next_page")
        if not body.get("has_more") or not page:
            return pages
    raise RuntimeError(f"{url}: more than {MAX_PAGES} pages; narrow lookback_days")
