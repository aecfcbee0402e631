"""Streams cut short (the client left, the upstream broke off, the gateway stopped) still
record the usage known so far, marked as an estimate, so that they get a cost.

Each test cuts after receiving a given number of output chunks, never after a sleep: the
gateway has read every chunk the client received (it forwards a chunk once read)."""

import json

import aiohttp
import openai
import pytest

from meterline.config import convert
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.gateway.shapes import USAGE_ESTIMATED
from meterline.processors.cost import CostConfig, CostProcessor
from tests.gateway_helpers import gateway, openai_upstream
from tests.helpers import eventually, make_context

MESSAGES = [{"role": "user", "content": "tell me a joke"}]  # 14 characters: 4 tokens
SLOW = {"x-fake-chunk-delay": "0.05", "x-fake-tokens": "200"}  # 10 s if left to run


@pytest.fixture
async def fake():
    async with FakeUpstream() as upstream:
        yield upstream


async def openai_chunks_then_close(gw, n, **options):
    """Stream a chat completion and close it after `n` chunks with content."""
    stream = await gw.openai(**options).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=SLOW)
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == n:
            break
    await stream.close()
    return await eventually(lambda: gw.events and gw.events[0])


async def test_an_openai_stream_cancelled_after_three_chunks_records_estimated_usage_and_a_cost(
        fake, tmp_path):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        event = await openai_chunks_then_close(gw, 3)
    assert event.status_code == 499 and event.error_type is None
    assert event.attributes[USAGE_ESTIMATED] is True
    # each chunk holds at least one token ("tok0 " is 5 characters: 2 by the 4-per-token rule)
    assert 3 <= event.output_tokens < 200
    assert event.input_tokens == 4  # not reported before the end: the request's text / 4
    assert event.finish_reasons is None
    cost = CostProcessor(convert({}, CostConfig), make_context(tmp_path, "cost"))
    [priced] = cost.process([event])
    assert priced.cost_output_usd > 0 and priced.cost_usd > priced.cost_output_usd


async def test_an_anthropic_stream_cancelled_after_message_start_records_its_input_tokens(fake):
    upstreams = {"anthropic": {"base_url": fake.url, "provider": "anthropic"}}
    async with gateway(upstreams) as gw:
        stream = await gw.anthropic().messages.create(
            model="claude-haiku-4-5", max_tokens=500, stream=True, extra_headers=SLOW,
            messages=[{"role": "user", "content": "one two three four five six"}])
        async for message in stream:
            assert message.type == "message_start"
            break
        await stream.close()
        event = await eventually(lambda: gw.events and gw.events[0])
    assert event.status_code == 499
    assert event.input_tokens == 6  # the provider's count (an estimate from the text is 7)
    assert event.output_tokens >= 1 and event.attributes[USAGE_ESTIMATED] is True
    assert event.finish_reasons is None


async def test_a_responses_stream_cancelled_mid_way_records_estimated_usage(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().responses.create(
            model="gpt-4o-mini", input="tell me a joke", stream=True, extra_headers=SLOW)
        deltas = 0
        async for message in stream:
            deltas += message.type == "response.output_text.delta"
            if deltas == 3:
                break
        await stream.close()
        event = await eventually(lambda: gw.events and gw.events[0])
    assert event.status_code == 499
    assert (event.input_tokens, event.attributes[USAGE_ESTIMATED]) == (4, True)
    assert 3 <= event.output_tokens < 200


async def test_an_ollama_stream_cancelled_mid_way_records_estimated_usage(fake):
    upstreams = {"ollama": {"base_url": fake.url, "provider": "ollama"}}
    body = {"model": "llama3", "messages": MESSAGES}
    async with gateway(upstreams) as gw, aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/ollama/api/chat", json=body, headers=SLOW) as r:
            lines = [json.loads(await r.content.readline()) for _ in range(3)]
            r.close()
        event = await eventually(lambda: gw.events and gw.events[0])
    assert not any(line["done"] for line in lines)
    assert event.status_code == 499
    assert (event.input_tokens, event.attributes[USAGE_ESTIMATED]) == (4, True)
    assert 3 <= event.output_tokens < 200


async def test_an_upstream_breaking_off_mid_stream_records_the_usage_so_far(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-break-after": "4"})  # the role chunk, then 3 tokens
        with pytest.raises(openai.APIConnectionError):
            [chunk async for chunk in stream]
        event = await eventually(lambda: gw.events and gw.events[0])
    assert (event.status_code, event.error_type) == (502, "service_unavailable")
    assert (event.input_tokens, event.output_tokens) == (4, 4)  # 3 chunks of 5 characters
    assert event.attributes[USAGE_ESTIMATED] is True


async def test_a_stream_cut_by_the_gateway_stopping_records_the_usage_so_far(fake):
    async with gateway({"openai": openai_upstream(fake.url)}, drain_timeout="10ms") as gw:
        stream = await gw.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=SLOW)
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 2:
                break
        await gw.proxy.shutdown()
        event = await eventually(lambda: gw.events and gw.events[0])
    assert event.status_code == 503
    assert 2 <= event.output_tokens < 200 and event.attributes[USAGE_ESTIMATED] is True


async def test_a_stream_read_to_its_end_keeps_the_providers_counts_unmarked(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True)
        [chunk async for chunk in stream]
        event = gw.event
    assert (event.input_tokens, event.output_tokens) == (4, 5)
    assert USAGE_ESTIMATED not in event.attributes
