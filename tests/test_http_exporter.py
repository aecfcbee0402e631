"""Exporter `http` against local servers that behave like Splunk HEC, Datadog's logs intake
and an Elasticsearch `_bulk` endpoint, through the shared delivery loop: retries (with
`Retry-After`), dead letters, and per-item bulk errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiohttp import web

from meterline import config as config_mod
from meterline.component import ExportBatch, RetryableError
from meterline.config import convert
from meterline.delivery import ExporterRunner, open_queue
from meterline.exporters.http.config import HttpExporterConfig
from meterline.exporters.http.exporter import HttpExporter, request_headers
from meterline.queue import Batch
from tests.helpers import (
    config_text,
    endless_server,
    eventually,
    free_port,
    long_prompts,
    make_context,
    make_event,
    metric_value,
    pipeline,
    read_jsonl,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serving(path: str, handler: Handler, ssl_context: Any = None
                  ) -> AsyncIterator[str]:
    """A local server answering POST `path` with `handler`; yields its base URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def delivering(tmp_path: Path, **config: Any) -> AsyncIterator[ExporterRunner]:
    """An `http` exporter behind its delivery loop (persistent queue: dead letters on)."""
    cfg = convert({"batch": {"timeout": "10ms"},
                   "retry": {"initial_interval": "10ms", "max_interval": "20ms"}, **config},
                  HttpExporterConfig)
    ctx = make_context(tmp_path, "http")
    runner = ExporterRunner(HttpExporter(cfg, ctx), cfg, ctx, open_queue(cfg.queue, ctx),
                            ctx.telemetry)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.shutdown(2)


async def send(runner: ExporterRunner, count: int, start: int = 0) -> None:
    await runner.put(Batch([make_event(i) for i in range(start, start + count)]))


def sent(runner: ExporterRunner) -> float:
    return metric_value(runner.telemetry.registry, "meterline_exporter_sent_events_total",
                        exporter="http")


def dead_letters(tmp_path: Path) -> list[str]:
    return sorted(e["event_id"] for f in (tmp_path / "queue" / "http" / "dead-letter")
                  .glob("*.jsonl") for e in read_jsonl(f))


# --- Splunk HEC --------------------------------------------------------------------------

class Hec:
    """Splunk's HTTP Event Collector: `Authorization: Splunk <token>`, concatenated
    `{"event": ...}` objects (one per line here), `{"text":"Success","code":0}`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.events: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Splunk {self.token}":
            return web.json_response({"text": "Invalid token", "code": 4}, status=403)
        self.events += [msgspec.json.decode(line) for line in (await request.read()).split()]
        return web.json_response({"text": "Success", "code": 0})


HEC_PROJECTION = {"$compose": {"event": {"$path": "$"}, "sourcetype": "meterline:llm",
                               "source": {"$at": "provider"}}}


async def test_splunk_hec_receives_one_event_object_per_line(tmp_path):
    hec = Hec("tok-1")
    async with serving("/services/collector/event", hec.handle) as base, delivering(
            tmp_path, endpoint=f"{base}/services/collector/event",
            headers={"Authorization": "Splunk tok-1"}, projection=HEC_PROJECTION) as runner:
        await send(runner, 3)
        await eventually(lambda: len(hec.events) == 3)
    assert [e["event"]["event_id"] for e in hec.events] == [f"evt-{i:08d}" for i in range(3)]
    assert {(e["sourcetype"], e["source"]) for e in hec.events} == {("meterline:llm",
                                                                     "openai")}


async def test_a_refused_token_is_permanent_and_dead_letters_the_batch(tmp_path):
    hec = Hec("right")
    async with serving("/services/collector/event", hec.handle) as base, delivering(
            tmp_path, endpoint=f"{base}/services/collector/event",
            headers={"Authorization": "Splunk wrong"}) as runner:
        await send(runner, 2)
        await eventually(lambda: dead_letters(tmp_path))
    assert dead_letters(tmp_path) == ["evt-00000000", "evt-00000001"] and not hec.events


def test_header_values_take_env_substitutions(tmp_path, monkeypatch):
    monkeypatch.setenv("HEC_TOKEN", "from-env")
    body = pipeline({"webhook": {"listen": f"127.0.0.1:{free_port()}"}}, exporters={"http": {
        "endpoint": "http://127.0.0.1:8088/services/collector/event",
        "headers": {"Authorization": "Splunk ${env:HEC_TOKEN}"}}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_text(body, tmp_path))
    loaded = config_mod.load(str(path))
    assert loaded.exporters["http"].config.headers == {"Authorization": "Splunk from-env"}


# --- Datadog logs intake -----------------------------------------------------------------

async def test_datadog_logs_intake_receives_a_json_array(tmp_path):
    logs: list[Any] = []

    async def intake(request: web.Request) -> web.Response:
        if request.headers.get("DD-API-KEY") != "dd-key":
            return web.json_response({"errors": [{"status": "403"}]}, status=403)
        assert request.content_type == "application/json"
        logs.append(await request.json())
        return web.json_response({}, status=202)

    projection = {"ddsource": {"$value": "meterline"}, "service": {"$value": "llm-gateway"},
                  "provider": True, "message": {"$at": "request_model"}}
    async with serving("/api/v2/logs", intake) as base, delivering(
            tmp_path, endpoint=f"{base}/api/v2/logs", format="array",
            headers={"DD-API-KEY": "dd-key"}, projection=projection) as runner:
        await send(runner, 2)
        await eventually(lambda: sent(runner) == 2)
    assert logs == [[{"ddsource": "meterline", "service": "llm-gateway", "provider": "openai",
                      "message": "gpt-4o-mini"}] * 2]


# --- Elasticsearch _bulk -----------------------------------------------------------------

class Elasticsearch:
    """A `_bulk` endpoint storing documents by `_id`. The documents of `refuse` are answered
    400 `mapper_parsing_exception`; those of `busy` 429 the first time they come."""

    def __init__(self, refuse: set[str], busy: set[str]) -> None:
        self.refuse, self.busy = refuse, set(busy)
        self.stored: dict[str, dict[str, Any]] = {}
        self.writes: list[str] = []
        self.indexes: set[str] = set()

    async def bulk(self, request: web.Request) -> web.Response:
        lines = [msgspec.json.decode(x) for x in (await request.read()).splitlines() if x]
        items = []
        for action, doc in zip(lines[::2], lines[1::2], strict=True):
            meta = action["index"]
            self.indexes.add(meta["_index"])
            items.append({"index": self._store(meta["_id"], doc)})
        errors = any(i["index"]["status"] >= 300 for i in items)
        return web.json_response({"took": 3, "errors": errors, "items": items})

    def _store(self, id_: str, doc: dict[str, Any]) -> dict[str, Any]:
        if id_ in self.refuse:
            return {"_id": id_, "status": 400, "error": {
                "type": "mapper_parsing_exception", "reason": "failed to parse field"}}
        if id_ in self.busy:
            self.busy.discard(id_)
            return {"_id": id_, "status": 429, "error": {
                "type": "es_rejected_execution_exception", "reason": "queue full"}}
        self.stored[id_] = doc
        self.writes.append(id_)
        return {"_id": id_, "status": 201, "result": "created"}


async def test_bulk_partial_failure_dead_letters_only_the_refused_item(tmp_path):
    es = Elasticsearch(refuse={"evt-00000001"}, busy={"evt-00000003"})
    async with serving("/_bulk", es.bulk) as base, delivering(
            tmp_path, endpoint=f"{base}/_bulk", format="bulk", index="llm-calls") as runner:
        await send(runner, 5)
        await eventually(lambda: len(es.stored) == 4 and dead_letters(tmp_path))
        await eventually(lambda: sent(runner) == 4)
    assert sorted(es.stored) == ["evt-00000000", "evt-00000002", "evt-00000003",
                                 "evt-00000004"]
    assert sorted(es.writes) == sorted(es.stored)  # each stored once: the retry sent one
    assert dead_letters(tmp_path) == ["evt-00000001"]
    assert es.indexes == {"llm-calls"}
    assert es.stored["evt-00000003"]["request_model"] == "gpt-4o-mini"


async def test_a_bulk_answer_that_never_ends_is_retryable_naming_the_bound(tmp_path):
    async with endless_server() as base:
        exporter = HttpExporter(convert({"endpoint": f"{base}/_bulk", "format": "bulk",
                                         "index": "llm"}, HttpExporterConfig),
                                make_context(tmp_path))
        with pytest.raises(RetryableError, match="passed 67,108,864 bytes"):
            await asyncio.wait_for(exporter.export(ExportBatch("b", [make_event(0)])), 20)
        await exporter.shutdown()


async def test_an_error_answer_that_never_ends_is_quoted_from_its_start(tmp_path):
    async with endless_server(503, "text/plain") as base:
        exporter = HttpExporter(convert({"endpoint": f"{base}/in"}, HttpExporterConfig),
                                make_context(tmp_path))
        with pytest.raises(RetryableError, match="HTTP 503: b'xxxx"):
            await asyncio.wait_for(exporter.export(ExportBatch("b", [make_event(0)])), 10)
        await exporter.shutdown()


# --- request size -------------------------------------------------------------------------

class Intake:
    """A JSON-lines intake that refuses bodies over `limit` bytes (413), as Datadog's logs
    intake does past 5 MB, and answers 503 to the requests listed in `busy` (by number)."""

    def __init__(self, limit: int, busy: tuple[int, ...] = ()) -> None:
        self.limit = limit
        self.busy = set(busy)
        self.requests = 0
        self.stored: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if len(body) > self.limit:
            return web.Response(status=413, text="payload too large")
        if self.requests in self.busy:
            return web.Response(status=503)
        self.stored += [msgspec.json.decode(line)["event_id"] for line in body.split()]
        return web.Response(status=202)


async def test_a_batch_over_max_request_mb_goes_in_requests_the_intake_takes(tmp_path):
    intake = Intake(limit=100_000)
    async with serving("/in", intake.handle) as base:
        exporter = HttpExporter(convert({"endpoint": f"{base}/in", "max_request_mb": 0.09},
                                        HttpExporterConfig), make_context(tmp_path))
        await exporter.export(ExportBatch("b", long_prompts(20, 20_000)))  # 400 KB
        await exporter.shutdown()
    assert intake.stored == [e.event_id for e in long_prompts(20, 20_000)]
    assert intake.requests >= 5


async def test_a_request_to_retry_is_sent_again_without_the_ones_before_it(tmp_path):
    intake = Intake(limit=100_000, busy=(3,))
    async with serving("/in", intake.handle) as base, delivering(
            tmp_path, endpoint=f"{base}/in", max_request_mb=0.09) as runner:
        await runner.put(Batch(long_prompts(20, 20_000)))
        await eventually(lambda: sent(runner) == 20)
    # each once
    assert sorted(intake.stored) == sorted(e.event_id for e in long_prompts(20, 20_000))


async def test_an_event_too_big_even_alone_is_dead_lettered_and_the_rest_sent(tmp_path):
    intake = Intake(limit=100_000)
    async with serving("/in", intake.handle) as base, delivering(
            tmp_path, endpoint=f"{base}/in", max_request_mb=0.09) as runner:
        await runner.put(Batch([*long_prompts(2, 20_000), *long_prompts(1, size=200_000, start=2)]))
        await eventually(lambda: dead_letters(tmp_path))
        await eventually(lambda: sent(runner) == 2)
    assert dead_letters(tmp_path) == ["evt-00000002"]
    assert intake.stored == ["evt-00000000", "evt-00000001"]


# --- retries, compression, authentication, TLS -------------------------------------------

async def test_a_503_is_retried_after_the_servers_retry_after(tmp_path):
    times: list[float] = []

    async def flaky(request: web.Request) -> web.Response:
        times.append(time.monotonic())
        if len(times) == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(status=200)

    async with serving("/in", flaky) as base, delivering(
            tmp_path, endpoint=f"{base}/in") as runner:
        await send(runner, 1)
        await eventually(lambda: sent(runner) == 1)
    assert len(times) == 2 and times[1] - times[0] >= 0.95


@pytest.mark.parametrize("status", [408, 429, 500, 502])
async def test_these_statuses_are_retryable(tmp_path, status):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status)

    async with serving("/in", answer) as base:
        exporter = HttpExporter(convert({"endpoint": f"{base}/in"}, HttpExporterConfig),
                                make_context(tmp_path))
        with pytest.raises(RetryableError, match=str(status)):
            await exporter.export(ExportBatch("b", [make_event(0)]))
        await exporter.shutdown()


async def test_no_server_is_retryable(tmp_path):
    exporter = HttpExporter(convert({"endpoint": f"http://127.0.0.1:{free_port()}/in"},
                                    HttpExporterConfig), make_context(tmp_path))
    with pytest.raises(RetryableError, match=r"127\.0\.0\.1"):
        await exporter.export(ExportBatch("b", [make_event(0)]))
    await exporter.shutdown()


async def test_gzip_bodies_are_decoded_by_the_server(tmp_path):
    seen: list[tuple[str | None, int, list[Any]]] = []

    async def collector(request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp decodes Content-Encoding: gzip
        seen.append((request.headers.get("Content-Encoding"), request.content_length or 0,
                     [msgspec.json.decode(x) for x in body.splitlines()]))
        return web.Response(status=204)

    async with serving("/in", collector) as base, delivering(
            tmp_path, endpoint=f"{base}/in", compression="gzip") as runner:
        await send(runner, 50)
        await eventually(lambda: sent(runner) == 50)
    [(encoding, length, docs)] = seen
    assert encoding == "gzip" and len(docs) == 50
    assert length < len(b"\n".join(msgspec.json.encode(d) for d in docs))


async def test_basic_auth_is_sent(tmp_path):
    seen: list[str] = []

    async def guarded(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(status=200)

    async with serving("/in", guarded) as base, delivering(
            tmp_path, endpoint=f"{base}/in",
            basic_auth={"username": "meter", "password": "s3cret"}) as runner:
        await send(runner, 1)
        await eventually(lambda: seen)
    assert seen == [f"Basic {base64.b64encode(b'meter:s3cret').decode()}"]


def test_a_bearer_token_becomes_the_authorization_header():
    config = convert({"endpoint": "http://h/in", "bearer_token": "t0k"}, HttpExporterConfig)
    assert request_headers(config)["Authorization"] == "Bearer t0k"


async def test_https_with_the_servers_ca(tmp_path):
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    got: list[int] = []

    async def secure(request: web.Request) -> web.Response:
        got.append(len(await request.read()))
        return web.Response(status=200)

    async with serving("/in", secure, context) as base, delivering(
            tmp_path, endpoint=f"{base}/in", tls={"ca_file": str(tmp_path / "ca.pem")}
    ) as runner:
        await send(runner, 1)
        await eventually(lambda: sent(runner) == 1)
    assert got


@pytest.mark.parametrize(("config", "message"), [
    ({"endpoint": "ftp://h"}, "endpoint must start with http:// or https://"),
    ({"endpoint": "http://h", "tls": {}}, "tls applies to an https:// endpoint"),
    ({"endpoint": "http://h", "bearer_token": "t", "basic_auth": {"username": "u"}},
     "bearer_token and basic_auth: give one way"),
    ({"endpoint": "http://h", "bearer_token": "t", "headers": {"authorization": "x"}},
     "bearer_token and headers.Authorization"),
    ({"endpoint": "http://h", "index": "x"}, "apply to format: bulk only"),
    ({}, "endpoint"),
])
def test_bad_configs_are_refused(config, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        convert(config, HttpExporterConfig)
