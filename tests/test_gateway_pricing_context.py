"""What a call's price depends on besides its tokens, from the openai SDK through the
gateway to the cost processor: the tier that served it (the fake upstream answers the tier
asked for, `flex` or `priority`, or `default`, as OpenAI does) and the host that processed
it (`server.address`: OpenAI's regional hosts cost more)."""

import pytest

from meterline.config import convert
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.processors.cost import CostConfig, CostProcessor
from tests.gateway_helpers import gateway, openai_upstream
from tests.helpers import eventually, make_context

MESSAGES = [{"role": "user", "content": "summarise the report"}]


@pytest.fixture
async def fake():
    async with FakeUpstream() as upstream:
        yield upstream


async def first_event(fake, call):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await call(gw.openai())
        return await eventually(lambda: gw.events and gw.events[0])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_flex_call_is_recorded_as_served_by_flex_and_billed_at_its_rates(
        fake, tmp_path, stream):
    async def call(client):
        answer = await client.chat.completions.create(
            model="gpt-5", messages=MESSAGES, service_tier="flex", stream=stream)
        if stream:
            async for _ in answer:
                pass

    event = await first_event(fake, call)
    assert event.service_tier == "flex"
    [priced] = CostProcessor(convert({}, CostConfig), make_context(tmp_path, "cost")).process(
        [event])
    assert priced.pricing_ref == "openai/gpt-5@bundled;flex"
    # gpt-5 on flex: $0.625 in, $5 out per 1M tokens, half the standard price
    assert priced.cost_usd == pytest.approx(
        (event.input_tokens * 0.625 + event.output_tokens * 5) / 1e6)


async def test_a_call_asking_for_auto_is_billed_as_the_default_tier_served_it(fake, tmp_path):
    async def call(client):
        await client.chat.completions.create(model="gpt-5", messages=MESSAGES,
                                             service_tier="auto")

    event = await first_event(fake, call)
    assert (event.service_tier, event.params["service_tier"]) == ("default", "auto")
    [priced] = CostProcessor(convert({}, CostConfig), make_context(tmp_path, "cost")).process(
        [event])
    assert priced.pricing_ref == "openai/gpt-5@bundled"


async def test_a_responses_call_records_the_tier_that_served_it(fake):
    async def call(client):
        await client.responses.create(model="gpt-5", input="hello", service_tier="priority")

    assert (await first_event(fake, call)).service_tier == "priority"


async def test_the_host_that_processed_a_call_is_its_server_address(fake):
    async def call(client):
        await client.embeddings.create(model="text-embedding-3-small", input="hello")

    assert (await first_event(fake, call)).attributes["server.address"] == "127.0.0.1"
