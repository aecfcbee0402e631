"""The gateway's settings, all of them: the proxy's (where it listens, its named upstreams
and their timeouts) and the `gateway` receiver's (how its events reach the pipeline).

`ProxyConfig` stands alone so that the gateway can run without the daemon (the bench and
the demo start a `Proxy` directly); `GatewayConfig`, the receiver's, adds the event buffer.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from meterline.component import Config
from meterline.gateway.guardrails import GuardrailRule, check_names
from meterline.genai import provider_name
from meterline.httpserver import ListenerConfig
from meterline.units import Duration, Listen

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Root paths of the APIs the gateway speaks: an upstream named like one would capture them.
_RESERVED = frozenset({"v1", "api"})


class TimeoutsConfig(Config):
    """Per attempt on one upstream. 0 turns a timeout off."""

    connect: Duration = Duration(10)  # opening a connection (TCP and TLS)
    first_byte: Duration = Duration(600)  # request sent -> response head (a whole
                                          # non-streaming completion comes back at once)
    idle: Duration = Duration(300)  # silence between two chunks of the response
    total: Duration = Duration(3600)  # request sent -> response end


class UpstreamConfig(Config):
    base_url: str  # scheme://host[:port][/path]; without the API's /v1
    # llm: the LLM APIs read from the path (OpenAI, Anthropic, Ollama); mcp: an MCP server
    # (Streamable HTTP), its JSON-RPC requests recorded (docs/gateway.md)
    protocol: Literal["llm", "mcp"] = "llm"
    # gen_ai.provider.name (aliases such as `azure` accepted); unset: openai, or mcp for an
    # mcp upstream
    provider: str | None = None
    api_key: str | None = None  # injected upstream in place of the client's credentials
    default: bool = False  # serves requests at the root (no /NAME prefix)
    fallback: list[str] = msgspec.field(default_factory=list)  # tried in order on failure
    timeouts: TimeoutsConfig = msgspec.field(default_factory=TimeoutsConfig)
    max_idle_connections: int = 256  # kept-alive connections kept for reuse

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/path], got "
                             f"{self.base_url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"base_url must not carry a query or fragment: {self.base_url!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as e:
            raise ValueError(f"base_url has an invalid port: {self.base_url!r}") from e
        if self.protocol == "llm" and parts.path.rstrip("/").endswith("/v1"):
            # (the client's path is forwarded whole: /v1/chat/completions would go to
            # /v1/v1/chat/completions, a 404 from every provider)
            bare = self.base_url.rstrip("/").removesuffix("/v1")
            raise ValueError(f"base_url must be given without the API's /v1, which the "
                             f"client's path carries: {bare!r}, not {self.base_url!r}")
        self.provider = provider_name(self.provider) or (
            "mcp" if self.protocol == "mcp" else "openai")
        self.api_key = self.api_key or None  # `${env:KEY:-}` left empty means none
        if self.max_idle_connections < 0:
            raise ValueError("max_idle_connections must be >= 0")


def _default_upstreams() -> dict[str, UpstreamConfig]:
    return {"openai": UpstreamConfig(base_url="https://api.openai.com", provider="openai",
                                     default=True)}


class ProxyConfig(ListenerConfig):
    """Also `read_timeout` (a request not received within it gets 408) and
    `keepalive_timeout` (`ListenerConfig`). Request heads are bounded as on every listener
    (`meterline.httpserver`: 431, 414)."""

    listen: Listen = Listen("127.0.0.1:8080")  # where clients call the gateway
    # the providers served, by name: /NAME/... goes to upstream NAME
    upstreams: dict[str, UpstreamConfig] = msgspec.field(default_factory=_default_upstreams)
    max_body_mb: float = 32  # a larger request body gets 413 without reaching an upstream
    max_connections: int = 4096  # client connections open at once (streams last long)
    drain_timeout: Duration = Duration(10)  # on shutdown, how long requests in flight get
    metadata_header: str = "x-meterline-metadata"  # JSON object of labels (X-TFY-METADATA too)
    user_header: str = "x-meterline-user"  # header naming the end user
    session_header: str = "x-meterline-session"  # header naming the session
    capture_content: bool = True  # record input and output messages in events
    # rules checked on prompts and answers, each to monitor, redact or block
    guardrails: list[GuardrailRule] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.upstreams:
            raise ValueError("upstreams must name at least one upstream")
        for name, upstream in self.upstreams.items():
            if not _NAME.match(name):
                raise ValueError(f"upstream name {name!r} must be a path segment "
                                 "(letters, digits, _ . -)")
            if name in _RESERVED:
                raise ValueError(f"upstream name {name!r} would capture the root paths "
                                 f"/{name}/...; choose another name")
            for other in upstream.fallback:
                if other == name or other not in self.upstreams:
                    raise ValueError(f"upstream {name!r}: fallback {other!r} must name another "
                                     f"upstream (defined: {', '.join(self.upstreams)})")
                if self.upstreams[other].protocol != upstream.protocol:
                    raise ValueError(f"upstream {name!r}: fallback {other!r} must speak the "
                                     f"same protocol ({upstream.protocol})")
        defaults = [n for n, u in self.upstreams.items() if u.default]
        if len(defaults) > 1:
            raise ValueError(f"only one upstream may be the default, got {', '.join(defaults)}")
        if self.max_body_mb <= 0:
            raise ValueError("max_body_mb must be positive")
        check_names(self.guardrails)
        self.metadata_header = self.metadata_header.lower()
        self.user_header = self.user_header.lower()
        self.session_header = self.session_header.lower()

    @property
    def default_upstream(self) -> str | None:
        """The upstream serving the root: the one marked default, or the only one."""
        for name, upstream in self.upstreams.items():
            if upstream.default:
                return name
        return next(iter(self.upstreams)) if len(self.upstreams) == 1 else None


class GatewayConfig(ProxyConfig):
    """The `gateway` receiver: the proxy's settings, and how its events reach the pipeline
    (recording never delays a response; see `receiver.py`)."""

    buffer_size: int = 10_000  # events waiting for the pipeline, at most
    batch_size: int = 1000  # events handed to the pipeline at once, at most
    flush_interval: Duration = Duration(0.1)  # how often buffered events are handed over

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.buffer_size < 1 or self.batch_size < 1:
            raise ValueError("buffer_size and batch_size must be at least 1")
        if self.flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
