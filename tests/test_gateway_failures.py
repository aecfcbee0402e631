"""The gateway when things go wrong: upstream errors, timeouts, disconnects, fallback,
bad requests, and many streams at once."""

import asyncio
import contextlib
import gzip
import socket

import aiohttp
import anthropic
import msgspec
import openai
import pytest
from aiohttp import web

from meterline.gateway.fakeupstream import FakeUpstream
from meterline.gateway.proxy import _decode
from tests.gateway_helpers import gateway, openai_upstream
from tests.helpers import eventually, free_port, serving

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def fake():
    async with FakeUpstream(tokens=4) as upstream:
        yield upstream


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(("status", "error", "error_type"), [
    (400, openai.BadRequestError, "invalid_request_error"),
    (401, openai.AuthenticationError, "authentication_error"),
    (404, openai.NotFoundError, "not_found_error"),
    (429, openai.RateLimitError, "rate_limit_error"),
    (500, openai.InternalServerError, "server_error"),
])
async def test_openai_errors_reach_the_client_unchanged_and_get_their_category(
        fake, status, error, error_type):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        with pytest.raises(error) as caught:
            await gw.openai().chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-status": str(status)})
        event = gw.event
    assert caught.value.status_code == status
    assert caught.value.message.endswith(f"fake upstream error {status}")
    assert (event.status_code, event.error_type) == (status, error_type)
    assert event.error_message == f"fake upstream error {status}"


async def test_an_anthropic_overload_is_service_unavailable(fake):
    upstreams = {"anthropic": {"base_url": fake.url, "provider": "anthropic"}}
    async with gateway(upstreams) as gw:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await gw.anthropic().messages.create(
                model="claude", max_tokens=5, messages=MESSAGES,
                extra_headers={"x-fake-status": "529"})
        event = gw.event
    assert caught.value.status_code == 529
    assert (event.status_code, event.error_type) == (529, "service_unavailable")


async def test_an_unreachable_upstream_is_a_502_with_a_json_error():
    async with gateway({"openai": openai_upstream(dead_url())}) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
        event = gw.event
    assert caught.value.status_code == 502
    assert "cannot connect" in caught.value.message
    assert (event.status_code, event.error_type) == (502, "service_unavailable")


async def test_an_upstream_slower_than_first_byte_timeout_is_a_504(fake):
    upstream = openai_upstream(fake.url, timeouts={"first_byte": "100ms"})
    async with gateway({"openai": upstream}) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-fake-latency": "2"})
        event = gw.event
    assert caught.value.status_code == 504
    assert "first_byte timeout" in caught.value.message
    assert (event.status_code, event.error_type) == (504, "timeout")


async def test_a_stream_idle_past_the_idle_timeout_is_cut_and_recorded_as_504(fake):
    upstream = openai_upstream(fake.url, timeouts={"idle": "100ms"})
    async with gateway({"openai": upstream}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunk-delay": "2"})
        with pytest.raises(openai.APIConnectionError):
            [chunk async for chunk in stream]
        event = await eventually(lambda: gw.events and gw.events[0])
    assert (event.status_code, event.error_type) == (504, "timeout")
    assert "idle timeout" in event.error_message


async def test_a_stream_longer_than_the_total_timeout_is_cut_and_recorded_as_504(fake):
    upstream = openai_upstream(fake.url, timeouts={"total": "300ms"})
    async with gateway({"openai": upstream}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunk-delay": "0.05", "x-fake-tokens": "100"})
        with pytest.raises(openai.APIConnectionError):
            [chunk async for chunk in stream]
        event = await eventually(lambda: gw.events and gw.events[0])
    assert (event.status_code, event.error_type) == (504, "timeout")
    assert "total timeout" in event.error_message
    assert event.duration_ms < 2000


async def test_an_upstream_not_accepting_within_the_connect_timeout_is_a_504():
    # a listener whose backlog is full: further connection attempts get no answer
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
        try:
            upstream = openai_upstream(url, timeouts={"connect": "200ms"})
            async with gateway({"openai": upstream}) as gw:
                with pytest.raises(openai.APIStatusError) as caught:
                    await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
                event = gw.event
        finally:
            for filler in fillers:
                filler.close()
    assert caught.value.status_code == 504
    assert "within 0.2s" in caught.value.message
    assert (event.status_code, event.error_type) == (504, "timeout")


async def test_an_upstream_breaking_off_mid_stream_is_a_502_and_not_retried(fake):
    async with FakeUpstream() as backup:
        upstreams = {"openai": openai_upstream(fake.url, fallback=["backup"]),
                     "backup": {"base_url": backup.url}}
        async with gateway(upstreams) as gw:
            stream = await gw.openai().chat.completions.create(
                model="m", messages=MESSAGES, stream=True,
                extra_headers={"x-fake-break-after": "2"})
            with pytest.raises(openai.APIConnectionError):
                [chunk async for chunk in stream]
            event = await eventually(lambda: gw.events and gw.events[0])
        assert not backup.requests
    assert (event.status_code, event.error_type, event.attempts) == (502, "service_unavailable",
                                                                    1)


async def test_a_client_leaving_mid_stream_closes_the_upstream_call_and_records_499(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunk-delay": "0.05", "x-fake-tokens": "200"})
        async for _ in stream:
            break
        await stream.close()
        event = await eventually(lambda: gw.events and gw.events[0])
        await eventually(lambda: fake.streams_cut == 1)
    assert event.status_code == 499
    assert event.error_type is None and event.error_message == "client closed the connection"


async def test_a_client_leaving_before_the_answer_closes_the_upstream_call(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        request = asyncio.create_task(gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-fake-latency": "5"}))
        await eventually(lambda: fake.requests)
        request.cancel()
        event = await eventually(lambda: gw.events and gw.events[0])
        # the upstream saw its connection close while it was still preparing the answer
        await eventually(lambda: fake.handlers_cut == 1, timeout=3)
    assert event.status_code == 499


async def test_fallback_serves_when_the_upstream_is_unreachable(fake):
    upstreams = {"primary": openai_upstream(dead_url(), fallback=["backup"]),
                 "backup": {"base_url": fake.url, "provider": "azure"}}
    async with gateway(upstreams) as gw:
        reply = await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
        event = gw.event
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert (event.route, event.upstream, event.provider) == ("primary", "backup",
                                                             "azure.ai.openai")
    assert (event.attempts, event.fallback, event.status_code) == (2, True, 200)
    assert event.policies == ["fallback"]


@pytest.mark.parametrize("status", [429, 503])
async def test_fallback_serves_when_the_upstream_answers_429_or_5xx(fake, status):
    async with FakeUpstream(status=status) as failing:
        upstreams = {"primary": openai_upstream(failing.url, fallback=["backup"]),
                     "backup": {"base_url": fake.url}}
        async with gateway(upstreams) as gw:
            await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
            event = gw.event
    assert (event.upstream, event.attempts, event.fallback) == ("backup", 2, True)


async def test_the_last_fallback_error_reaches_the_client():
    async with FakeUpstream(status=429) as one, FakeUpstream(status=503) as two:
        upstreams = {"one": openai_upstream(one.url, fallback=["two"]),
                     "two": {"base_url": two.url}}
        async with gateway(upstreams) as gw:
            with pytest.raises(openai.APIStatusError) as caught:
                await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
            event = gw.event
    assert caught.value.status_code == 503
    assert (event.upstream, event.attempts, event.error_type) == ("two", 2, "service_unavailable")


async def test_malformed_json_is_a_400_that_never_reaches_the_upstream(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw, aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/chat/completions", data=b'{"model": ',
                          headers={"Content-Type": "application/json"}) as r:
            status, body = r.status, await r.json()
        event = gw.event
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert (event.status_code, event.error_type) == (400, "invalid_request_error")
    assert not fake.requests


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_a_compressed_body_is_a_415_that_never_reaches_the_upstream(fake, encoding):
    # read unread, it would be forwarded past the guardrails and recorded without usage
    async with gateway({"openai": openai_upstream(fake.url)}) as gw, aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/chat/completions", data=gzip.compress(b'{"model": "m"}'),
                          headers={"Content-Type": "application/json",
                                   "Content-Encoding": encoding}) as r:
            status, body = r.status, await r.json()
        event = gw.event
    assert status == 415 and "send it uncompressed" in body["error"]["message"]
    assert (event.status_code, event.error_type) == (415, "invalid_request_error")
    assert not fake.requests


async def test_an_oversized_body_is_a_413_that_never_reaches_the_upstream(fake):
    async with gateway({"openai": openai_upstream(fake.url)}, max_body_mb=0.01) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 20_000}])
        event = gw.event
    assert caught.value.status_code == 413 and "max_body_mb" in caught.value.message
    assert (event.status_code, event.endpoint) == (413, "/v1/chat/completions")
    assert not fake.requests


async def test_a_body_far_over_the_limit_still_gets_the_413_not_a_reset(fake):
    async with gateway({"openai": openai_upstream(fake.url)}, max_body_mb=1) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await gw.openai().chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * (20 << 20)}])
        event = gw.event
    assert caught.value.status_code == 413
    assert caught.value.body["message"].startswith("request body larger than max_body_mb")
    assert event.status_code == 413 and not fake.requests


async def test_a_malformed_http_request_is_a_400(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_a_request_too_slow_to_arrive_is_a_408(fake):
    async with gateway({"openai": openai_upstream(fake.url)}, read_timeout="100ms") as gw:
        with socket.create_connection(("127.0.0.1", gw.proxy.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 100\r\n\r\n{")
            sock.settimeout(5)
            answer = await asyncio.to_thread(sock.recv, 1000)
    assert answer.startswith(b"HTTP/1.1 408 ")


async def test_a_hundred_concurrent_streams_all_complete_with_their_events(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        client = gw.openai()

        async def one(i):
            stream = await client.chat.completions.create(
                model=f"m{i}", messages=MESSAGES, stream=True,
                extra_headers={"x-fake-chunk-delay": "0.005"})
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        texts = await asyncio.gather(*(one(i) for i in range(100)))
        events = gw.events
    assert texts == ["tok0 tok1 tok2 tok3 "] * 100
    assert sorted(e.request_model for e in events) == sorted(f"m{i}" for i in range(100))
    assert all(e.status_code == 200 and e.output_tokens == 4 and e.ttft_ms > 0 for e in events)


async def test_json_nested_too_deeply_is_a_400_that_never_reaches_the_upstream(fake):
    deep = b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    async with gateway({"openai": openai_upstream(fake.url)}) as gw, \
            aiohttp.ClientSession() as s, \
            s.post(f"{gw.url}/v1/chat/completions", data=deep,
                   headers={"Content-Type": "application/json"}) as r:
        status, body = r.status, await r.json()
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    assert not fake.requests


async def test_a_stream_message_longer_than_the_bound_is_relayed_unread_and_usage_still_read():
    # an upstream that sends one 17 MB message (over streams.MESSAGE_MAX) before the usage
    huge = b"data: {\"choices\": [{\"delta\": {\"content\": \"" + b"x" * (17 << 20) + b"\"}}]}\n\n"
    usage = (b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, '
             b'"total_tokens": 16}}\n\ndata: [DONE]\n\n')

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for start in range(0, len(huge), 1 << 16):
            await response.write(huge[start:start + (1 << 16)])
        await response.write(usage)
        return response

    async with serving(answer) as url, gateway({"openai": openai_upstream(url)}) as gw:
        async with aiohttp.ClientSession() as client, client.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": "m", "messages": MESSAGES, "stream": True,
                      "stream_options": {"include_usage": True}}) as response:
            body = await response.read()
        event = await eventually(lambda: gw.events and gw.events[0])
    assert body == huge + usage
    assert (event.status_code, event.input_tokens, event.output_tokens) == (200, 7, 9)


async def test_a_body_of_more_json_containers_than_the_bound_is_a_413_never_read(fake):
    # a million and one empty objects (3 MB): each would be a Python object on the loop
    body = b'{"model": "m", "messages": [' + b",".join([b"{}"] * 1_000_001) + b"]}"
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        async with aiohttp.ClientSession() as client, client.post(
                f"{gw.url}/v1/chat/completions", data=body,
                headers={"Content-Type": "application/json"}) as response:
            status, answer = response.status, await response.json()
        event = gw.event
    assert status == 413
    assert answer["error"]["message"] == ("request body holds more than 1,000,000 JSON "
                                          "objects and arrays: the gateway reads the calls it "
                                          "records")
    assert (event.status_code, event.input_messages) == (413, None)
    assert not fake.requests


def test_an_answer_of_more_json_containers_than_the_bound_is_not_built_on_the_loop():
    # (an upstream's answer is read for the event after it was relayed: read, it would
    # stop every stream while a million objects are built)
    answer = b'{"choices": [' + b",".join([b"{}"] * 1_000_001) + b"]}"
    with pytest.raises(msgspec.DecodeError, match="more than 1,000,000 JSON objects"):
        _decode(answer)
    assert _decode(b'{"choices": [' + b",".join([b"{}"] * 999_998) + b"]}")
