"""`meterline run --demo`: a fake LLM upstream and synthetic traffic through the gateway.

So that a newcomer sees the dashboard, `/metrics` and `meterline finops` fill within
a minute, with no API key and no network. `start` starts the fake upstream and
returns an overlay for pipeline.yaml: the gateway's upstreams point at the fake
(OpenAI, Anthropic, Mistral, Gemini and Ollama names, all served by it), and, when
the file has a `labels` processor, an API-key table for the demo's keys (names,
teams, organizations). `drive` then sends two weeks of history to the webhook
receiver (meterline JSON, `source: meterline`, growing over time, so trends and
growth have something to show), and keeps live calls flowing through the gateway:
several providers, models, keys, users and customers, streams, embeddings, and a
share of rate limits, server errors and bad requests. Every demo event carries
`metadata.environment = demo`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from meterline.config import PipelineFile
from meterline.event import api_key_id
from meterline.gateway.fakeupstream import FakeUpstream

# key -> (name, team, organization)
KEYS = {
    "sk-demo-checkout-7f3a": ("checkout-service", "payments", "acme"),
    "sk-demo-search-91bc": ("search-api", "search", "acme"),
    "sk-demo-support-2d44": ("support-bot", "support", "acme"),
    "sk-demo-etl-5e10": ("nightly-etl", "data", "globex"),
    "sk-demo-lab-c0de": ("research-sandbox", "research", "globex"),
}
CUSTOMERS = ("acme-42", "initech-7", "umbrella-3", "hooli-11", "stark-1")
FEATURES = ("refund-bot", "semantic-search", "ticket-triage", "report-writer")


@dataclass(frozen=True)
class Model:
    upstream: str  # the demo upstream serving it (a path prefix, or the default)
    provider: str
    name: str
    api: str  # "openai", "anthropic", "ollama", "embeddings"
    weight: float  # share of the traffic
    growth: float = 1.0  # how much busier the latest day is than the first


MODELS = (
    Model("openai", "openai", "gpt-4o-mini", "openai", 30, 1.5),
    Model("openai", "openai", "gpt-4.1", "openai", 10, 3.0),
    Model("openai", "openai", "o3-mini", "openai", 5),
    Model("openai", "openai", "text-embedding-3-small", "embeddings", 8),
    Model("anthropic", "anthropic", "claude-sonnet-4-5", "anthropic", 14, 2.0),
    Model("anthropic", "anthropic", "claude-haiku-4-5", "anthropic", 10),
    Model("mistral", "mistral_ai", "mistral-small", "openai", 6),
    Model("gemini", "gcp.gemini", "gemini-2.5-flash", "openai", 8, 4.0),
    Model("ollama", "ollama", "llama3.1", "ollama", 4),
)
HISTORY_DAYS = 14


class Demo:
    def __init__(self, rate: float = 6.0, history_events: int = 3000,
                 seed: int | None = None) -> None:
        self.rate = rate  # live calls per second
        self.history_events = history_events
        self.random = random.Random(seed)
        self.upstream = FakeUpstream(latency=0.2, chunk_delay=0.02, tokens=60)

    # --- the overlay -----------------------------------------------------------------
    async def start(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Start the fake upstream; return what to merge into pipeline.yaml (`raw`)."""
        await self.upstream.start()
        receivers = raw.get("receivers") or {}
        gateway = _first(receivers, "gateway")
        if gateway is None:
            raise ValueError("the demo drives the gateway receiver, and the pipeline has none")
        url = self.upstream.url
        upstreams: dict[str, Any] = {
            name: {"base_url": url, "provider": provider, "default": name == "openai"}
            for name, provider in {m.upstream: m.provider for m in MODELS}.items()}
        overlay: dict[str, Any] = {"receivers": {gateway: {"upstreams": upstreams}}}
        labels = _first(raw.get("processors") or {}, "labels")
        if labels is not None:
            keys = {api_key_id(key): {"name": name, "team": team, "organization": org}
                    for key, (name, team, org) in KEYS.items()}
            overlay["processors"] = {labels: {"api_keys": {"keys": keys}}}
        return overlay

    async def stop(self) -> None:
        await self.upstream.stop()

    # --- traffic ---------------------------------------------------------------------
    async def drive(self, config: PipelineFile) -> None:
        """Send the history, then live calls, until cancelled."""
        gateway = _listen_url(config, "gateway")
        webhook = _listen_url(config, "webhook")
        async with aiohttp.ClientSession() as session:
            if webhook is not None:
                with contextlib.suppress(aiohttp.ClientError):
                    await self._history(session, f"{webhook}/v1/events")
            assert gateway is not None
            await self._live(session, gateway)

    async def _history(self, session: aiohttp.ClientSession, url: str) -> None:
        now = time.time()
        events = [self._past_event(now) for _ in range(self.history_events)]
        for start in range(0, len(events), 500):
            async with session.post(url, json=events[start:start + 500]) as response:
                await response.read()

    def _past_event(self, now: float) -> dict[str, Any]:
        r = self.random
        age = HISTORY_DAYS * 86400 * (1 - r.random() ** 0.7)  # busier lately
        model = self._model(1 - age / (HISTORY_DAYS * 86400))
        key = r.choice(list(KEYS))
        status = self._status()
        tokens_in, tokens_out = r.randint(50, 4000), r.randint(10, 900)
        streaming = model.api != "embeddings" and r.random() < 0.4
        duration = r.uniform(150, 2500) + tokens_out * r.uniform(2, 12)
        event: dict[str, Any] = {
            "timestamp": int((now - age) * 1e9), "source": "meterline",
            "provider": model.provider,
            "operation": "embeddings" if model.api == "embeddings" else "chat",
            "request_model": model.name, "response_model": model.name,
            "streaming": streaming, "endpoint": _endpoint(model), "upstream": model.upstream,
            "status_code": status, "api_key_id": api_key_id(key),
            "user_id": f"user-{r.randint(1, 40)}",
            "metadata": {"environment": "demo", "customer_id": r.choice(CUSTOMERS),
                         "feature": r.choice(FEATURES)},
            "duration_ms": round(duration, 1),
            "provider_duration_ms": round(duration - 0.6, 1), "overhead_ms": 0.6,
        }
        if status == 200:
            event["input_tokens"] = tokens_in
            event["output_tokens"] = 0 if model.api == "embeddings" else tokens_out
            if streaming:
                event["ttft_ms"] = round(r.uniform(120, 900), 1)
                event["itl_ms"] = round(r.uniform(8, 40), 1)
        else:
            event["error_type"] = {429: "rate_limit_error", 500: "server_error",
                                   400: "invalid_request_error"}[status]
        return event

    async def _live(self, session: aiohttp.ClientSession, gateway: str) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            while True:
                task = asyncio.create_task(self._call(session, gateway))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(self.random.expovariate(self.rate))
        finally:
            for task in list(pending):
                task.cancel()

    async def _call(self, session: aiohttp.ClientSession, gateway: str) -> None:
        r = self.random
        model = self._model(1.0)
        key = r.choice(list(KEYS))
        streaming = model.api != "embeddings" and r.random() < 0.4
        headers = {
            "Authorization": f"Bearer {key}",
            "x-meterline-metadata": msgspec.json.encode({
                "environment": "demo", "customer_id": r.choice(CUSTOMERS),
                "feature": r.choice(FEATURES)}).decode(),
            "x-meterline-user": f"user-{r.randint(1, 40)}",
            "x-fake-latency": f"{r.uniform(0.05, 1.2):.3f}",
            "x-fake-tokens": str(r.randint(10, 300)),
        }
        status = self._status()
        if status != 200:
            headers["x-fake-status"] = str(status)
        url = f"{gateway}{'' if model.upstream == 'openai' else '/' + model.upstream}"
        url += _endpoint(model)
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(url, json=_body(model, streaming), headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=30)) as response:
                await response.read()

    def _model(self, progress: float) -> Model:
        """A model drawn by traffic share, `progress` (0: two weeks ago, 1: now) scaling
        each model's share by its growth."""
        weights = [m.weight * (1 + (m.growth - 1) * progress) for m in MODELS]
        return self.random.choices(MODELS, weights)[0]

    def _status(self) -> int:
        roll = self.random.random()
        return 429 if roll < 0.04 else 500 if roll < 0.06 else 400 if roll < 0.07 else 200


def _first(section: Mapping[str, Any], type_: str) -> str | None:
    """The id of the first component of `type_` in a pipeline.yaml section."""
    return next((cid for cid in section if cid == type_ or cid.startswith(f"{type_}/")), None)


def _listen_url(config: PipelineFile, type_: str) -> str | None:
    for spec in config.receivers.values():
        if spec.factory.type == type_:
            listen = spec.config.listen  # type: ignore[attr-defined]
            host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
            return f"http://{host}:{listen.port}"
    return None


def _endpoint(model: Model) -> str:
    return {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
            "ollama": "/api/chat", "embeddings": "/v1/embeddings"}[model.api]


def _body(model: Model, streaming: bool) -> dict[str, Any]:
    prompt = "Summarise the customer's last three orders and suggest a follow-up."
    if model.api == "embeddings":
        return {"model": model.name, "input": [prompt]}
    messages = [{"role": "user", "content": prompt}]
    if model.api == "anthropic":
        return {"model": model.name, "max_tokens": 512, "messages": messages,
                "stream": streaming}
    return {"model": model.name, "messages": messages, "stream": streaming}
