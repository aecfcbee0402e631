"""What the gateway refuses to forward: CONNECT and TRACE, targets that are not a routed path, and
headers that would pick another host or URL upstream."""

import asyncio
import json

import msgspec
import pytest

from meterline.gateway.fakeupstream import FakeUpstream
from tests.gateway_helpers import gateway, openai_upstream

BODY = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
async def fake():
    async with FakeUpstream(tokens=4) as upstream:
        yield upstream


async def raw_request(url: str, method: str, target: str, headers: str = "") -> tuple[int, dict]:
    """One request written byte for byte (HTTP clients normalise paths themselves)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(BODY)}\r\n{headers}Connection: close\r\n\r\n"
                 .encode() + BODY)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.strip() else {}


@pytest.mark.parametrize("target", [
    "/v1/../../../admin", "/v1/chat/completions/..", "/v1/%2e%2e/%2E%2E/admin",
    "/v1/./chat/completions", "/v1\\..\\admin"])
async def test_a_path_with_dot_segments_is_refused_and_never_forwarded(fake, target):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, body = await raw_request(gw.url, "POST", target)
    assert status == 400 and "'.' or '..' segments" in body["error"]["message"]
    assert not fake.requests


async def test_an_absolute_form_target_is_refused(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, body = await raw_request(gw.url, "POST", "http://evil.example/v1/chat")
    assert status == 400 and "origin-form" in body["error"]["message"]
    assert not fake.requests


@pytest.mark.parametrize("target", ["evil.example:443", "/v1/chat/completions"])
async def test_connect_is_refused_and_nothing_is_forwarded(fake, target):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, body = await raw_request(gw.url, "CONNECT", target)
    assert status == 501 and "CONNECT tunnels" in body["error"]["message"]
    assert not fake.requests


async def test_trace_is_not_proxied(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, body = await raw_request(gw.url, "TRACE", "/v1/chat/completions")
    assert status == 405 and "method TRACE is not proxied" in body["error"]["message"]
    assert not fake.requests


async def test_headers_that_pick_another_host_or_url_are_not_forwarded(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, _ = await raw_request(
            gw.url, "POST", "/v1/chat/completions",
            "Forwarded: host=evil.example\r\nX-Forwarded-Host: evil.example\r\n"
            "X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX-Custom: kept\r\n")
    assert status == 200
    [request] = fake.requests
    sent = {name.lower() for name in request.headers}
    assert not sent & {"forwarded", "x-forwarded-host", "x-original-url", "x-rewrite-url"}
    assert "x-custom" in sent


async def test_a_metadata_value_with_a_carriage_return_is_refused(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        status, body = await raw_request(gw.url, "POST", "/v1/chat/completions",
                                         'X-Meterline-Metadata: {"customer": "a\\rb"}\r\n')
    assert status == 400 and "control characters" in body["error"]["message"]
    assert not fake.requests
