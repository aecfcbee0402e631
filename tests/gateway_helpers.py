"""Running the gateway's proxy in-process against the fake upstream, for its tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai

from meterline import logs
from meterline.config import convert
from meterline.event import Event
from meterline.gateway.config import ProxyConfig
from meterline.gateway.proxy import Proxy


@dataclass
class Running:
    proxy: Proxy
    events: list[Event]
    clients: list[Any] = field(default_factory=list)  # closed when the gateway stops

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def openai(self, prefix: str = "", key: str = "sk-client",
               **options: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}{prefix}/v1", api_key=key,
                                    max_retries=0, **options)
        self.clients.append(client)
        return client

    def anthropic(self, prefix: str = "/anthropic", key: str = "sk-ant-client",
                  **options: Any) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=f"{self.url}{prefix}", api_key=key,
                                          max_retries=0, **options)
        self.clients.append(client)
        return client

    @property
    def event(self) -> Event:
        """The only event recorded so far."""
        assert len(self.events) == 1, self.events
        return self.events[0]


@contextlib.asynccontextmanager
async def gateway(upstreams: dict[str, Any], **options: Any) -> AsyncIterator[Running]:
    """A proxy on a free port with these upstreams; events are collected in a list."""
    config = convert({"listen": "127.0.0.1:0", "upstreams": upstreams, **options}, ProxyConfig)
    assert isinstance(config, ProxyConfig)
    events: list[Event] = []
    proxy = Proxy(config, events.append, logs.get(component="gateway-test"))
    await proxy.start()
    running = Running(proxy, events)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        await proxy.shutdown()


def openai_upstream(url: str, **extra: Any) -> dict[str, Any]:
    return {"base_url": url, "provider": "openai", "default": True, **extra}
