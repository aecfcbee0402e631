"""The `http` exporter's configuration."""

from __future__ import annotations

from typing import Literal

import msgspec

from meterline.component import Config
from meterline.delivery import ExporterConfig
from meterline.tls import TlsConfig
from meterline.units import Duration

Format = Literal["ndjson", "array", "bulk"]


class BasicAuth(Config):
    username: str  # sent as Authorization: Basic base64(username:password)
    password: str = ""  # write it as ${env:NAME} rather than in the file


class HttpExporterConfig(ExporterConfig, kw_only=True):
    endpoint: str  # the URL every batch is POSTed to: http(s)://host[:port]/path
    # ndjson: a document per line; array: one JSON array; bulk: Elasticsearch/OpenSearch _bulk
    format: Format = "ndjson"
    index: str = "meterline-events"  # bulk: the _index of every document
    # bulk: index (a retry overwrites by _id) or create (data streams; a 409 is a duplicate)
    bulk_action: Literal["index", "create"] = "index"
    # sent with every request; values may use ${env:NAME} (tokens: keep them out of the file)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    bearer_token: str | None = None  # sends Authorization: Bearer <token>
    basic_auth: BasicAuth | None = None  # sends Authorization: Basic ...
    compression: Literal["none", "gzip"] = "none"  # of request bodies (Content-Encoding)
    tls: TlsConfig | None = None  # https: CAs, client certificate; null: the system's CAs
    timeout: Duration = Duration(30)  # for one request and its answer
    # the largest body sent, before compression: a batch is sent in as many requests as it
    # needs (Datadog's logs intake takes 5 MB; Elasticsearch's _bulk is best at 5-15 MB)
    max_request_mb: float = 5

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must start with http:// or https://, "
                             f"got {self.endpoint!r}")
        if self.tls is not None and not self.endpoint.startswith("https://"):
            raise ValueError("tls applies to an https:// endpoint")
        given = [name for name, value in (("bearer_token", self.bearer_token),
                                          ("basic_auth", self.basic_auth)) if value]
        if any(k.lower() == "authorization" for k in self.headers):
            given.append("headers.Authorization")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give one way to authenticate")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_request_mb <= 0:
            raise ValueError("max_request_mb must be positive")
        if self.format != "bulk" and (self.index != "meterline-events"
                                      or self.bulk_action != "index"):
            raise ValueError("index and bulk_action apply to format: bulk only")
