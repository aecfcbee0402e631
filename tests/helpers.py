"""Shared test helpers: free ports, events, pipeline files, running the daemon in-process
or as a process. Fixtures live in conftest.py; tests import these from `tests.helpers`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from meterline import config as config_mod
from meterline import logs
from meterline.component import Context
from meterline.config import MetricsConfig
from meterline.event import Event
from meterline.service import Service
from meterline.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_context(tmp_path: Path, cid: str = "test") -> Context:
    """A component context with its own self-telemetry, for testing one component."""
    return Context(cid, tmp_path, Telemetry(MetricsConfig()), logs.get(component=cid))


def metric_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


_GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this process: once a socket bound
    to port 0 is closed, the kernel may give the next one the same port, and two
    listeners of one config then collide (a test's daemon failed to start so, its webhook
    and admin both given 44859)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def make_event(i: int = 0, **fields: Any) -> Event:
    base: dict[str, Any] = {
        "event_id": f"evt-{i:08d}", "timestamp": 1_700_000_000_000_000_000 + i,
        "source": "gateway", "provider": "openai", "operation": "chat",
        "request_model": "gpt-4o-mini", "status_code": 200, "input_tokens": 10 + i % 7,
        "output_tokens": 20, "duration_ms": 120.5, "endpoint": "/v1/chat/completions",
    }
    base.update(fields)
    return Event(**base)


def long_prompts(count: int, size: int, start: int = 0) -> list[Event]:
    """`count` events from number `start` on, each with a prompt of `size` characters: a
    backlog of RAG calls, for the bounds on batches and requests."""
    return [make_event(i, input_messages=[{"role": "user", "content": "x" * size}])
            for i in range(start, start + count)]


def event_dicts(start: int, count: int, **fields: Any) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(make_event(i, **fields)) for i in range(start, start + count)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a line still being written is left out)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    return [msgspec.json.decode(line) for line in complete.splitlines() if line.strip()]


def config_text(body: str, tmp_path: Path) -> str:
    """A pipeline.yaml body with `{data}` standing for a data dir under tmp_path."""
    return textwrap.dedent(body).replace("{data}", str(tmp_path / "data"))


FILE_OUT: dict[str, Any] = {"path": "{data}/out.jsonl", "batch": {"timeout": "10ms"}}
"""The file exporter most tests read back: `{data}/out.jsonl`, flushed every 10ms."""


INLINE: dict[str, Any] = {"workers": 1}
"""The service settings of a pipeline without processors: no worker processes. A worker
would only copy each batch there and back, and starting them (one per core, each a new
interpreter) took 0.3-1 s of every test that runs a daemon, a fifth of the suite; the
worker pool is what tests/test_workers.py and the tests of processors run."""


def pipeline(receivers: dict[str, Any], processors: dict[str, Any] | None = None,
             exporters: dict[str, Any] | None = None,
             service: dict[str, Any] | None = None) -> str:
    """The text of a pipeline.yaml with one pipeline `p` through every receiver, every
    processor (in the order given) and every exporter.

    `exporters` defaults to `{"file": FILE_OUT}`; `service` is laid over
    `{data_dir: "{data}", admin: null, memory_limiter: null}` and may replace
    `pipelines` (no memory limiter unless a test sets one: a daemon run in-process would
    measure the test runner's memory, chDB's of every earlier test included), and, without
    `processors`, over `{workers: 1}` (see `INLINE`). `{data}` (and
    `{admin}` for `daemon_factory`) are left for `config_text` to fill in. Collections
    of scalars are written inline (`[openai]`, `{timeout: 10ms}`), so a test may still
    edit the text it wrote."""
    exporters = {"file": dict(FILE_OUT)} if exporters is None else exporters
    flow: dict[str, Any] = {"receivers": list(receivers)}
    if processors:
        flow["processors"] = list(processors)
    flow["exporters"] = list(exporters)
    settings: dict[str, Any] = {"data_dir": "{data}", "admin": None, "memory_limiter": None,
                                **({} if processors else INLINE), **(service or {})}
    settings.setdefault("pipelines", {"p": flow})
    doc: dict[str, Any] = {"receivers": receivers}
    if processors:
        doc["processors"] = processors
    doc["exporters"] = exporters
    doc["service"] = settings
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1000))


def webhook_to_file(port: int, webhook: dict[str, Any] | None = None,
                    processors: dict[str, Any] | None = None,
                    file: dict[str, Any] | None = None,
                    service: dict[str, Any] | None = None) -> str:
    """`pipeline` for the common case: the webhook on 127.0.0.1:`port` (plus `webhook`
    options) into the file exporter (`FILE_OUT` with `file` laid over it)."""
    return pipeline({"webhook": {"listen": f"127.0.0.1:{port}", **(webhook or {})}},
                    processors, {"file": {**FILE_OUT, **(file or {})}}, service)


@contextlib.asynccontextmanager
async def running(body: str, tmp_path: Path) -> AsyncIterator[Service]:
    """Run a Service in-process on the given pipeline.yaml body."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_text(body, tmp_path))
    service = Service(config_mod.load(str(path)))
    await service.start()
    try:
        yield service
    finally:
        await service.shutdown()


async def post_json(url: str, payload: Any, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return await post_raw(url, msgspec.json.encode(payload), headers=headers, **kwargs)


async def post_raw(url: str, data: bytes, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    """POST bytes; the answer's status, its JSON (or text) and its headers."""
    async with aiohttp.ClientSession() as session, session.post(url, data=data, **kwargs) as r:
        body = await r.read()
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            parsed = body.decode()
        return r.status, parsed, dict(r.headers)


async def sent_until_taken(send: Callable[[], Awaitable[Any]],
                           refused: type[Exception]) -> None:
    """`send()` again every 0.1 s while it raises `refused` (at most 100 times), as a
    client sends again what was pushed back."""
    for _ in range(99):
        try:
            await send()
            return
        except refused:
            await asyncio.sleep(0.1)
    await send()


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll `check()` (a function or a coroutine function) until it returns something
    truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class Daemon:
    """`meterline run` as a real process (for crash, signal and CLI tests)."""

    def __init__(self, config: Path, admin_port: int, cwd: Path) -> None:
        self.config, self.admin_port, self.cwd = config, admin_port, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cwd / "daemon.log"

    def start(self, timeout: float = 15.0, extra_args: list[str] | None = None) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meterline", "run", "-c", str(self.config),
             *(extra_args or [])],
            cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2) as s:
                    s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    if b" 200 " in s.recv(100):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@contextlib.asynccontextmanager
async def serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> AsyncIterator[str]:
    """A local HTTP server answering every request with `handler`. Yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def endless_server(status: int = 200, content_type: str = "application/json"
                         ) -> AsyncIterator[str]:
    """A server that answers any request with `status` and a body that never ends (64 KB
    chunks of `x` until the client goes): a peer the daemon must not read to the end.
    Yields its base URL."""

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await response.prepare(request)
        chunk = b"x" * (64 << 10)
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(chunk)
        return response

    async with serving(endless) as url:
        yield url
