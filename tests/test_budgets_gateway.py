"""Budget enforcement in the gateway: a spent hard budget answers 429 `budget_exceeded` in
the provider's shape (the openai and anthropic SDKs), nothing reaches the upstream, the
call is counted as the `budget` policy, and a request outside the scope still passes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import anthropic
import openai
import pytest

from meterline import registry
from meterline.component import ExportBatch
from meterline.config import ComponentConfig, PipelineFile, convert
from meterline.event import Event
from meterline.extensions.finops import budgets, enforce
from meterline.extensions.finops.budgets import Budget
from meterline.extensions.finops.config import FinOpsConfig, link
from meterline.extensions.finops.extension import FinOps
from meterline.gateway.budgets import Block, BudgetBlocks
from meterline.gateway.config import GatewayConfig
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.gateway.receiver import GatewayReceiver
from tests.clickhouse_helpers import clickhouse_exporters
from tests.helpers import eventually, make_event


class Collect:
    """The pipeline as the gateway receiver sees it: keeps what it is handed."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def consume(self, events: list[Event]) -> None:
        self.events += events

    def refused(self, count: int, reason: str) -> None:
        raise AssertionError(f"refused {count}: {reason}")


@pytest.fixture
async def enforced(tmp_path):
    """A gateway receiver before the fake upstream, and a finops extension linked to it
    with a hard per-user daily budget of $5, user ann having spent $6 today."""
    async with FakeUpstream(tokens=3) as upstream, clickhouse_exporters(tmp_path) as make:
        exporter = await make()
        now = datetime.now(UTC).timestamp()
        await exporter.export(ExportBatch("a", [
            make_event(1, timestamp=int(now * 1e9), cost_usd=6.0, user_id="ann")]))
        gateway = convert({"listen": "127.0.0.1:0", "flush_interval": "20ms", "upstreams": {
            "openai": {"base_url": upstream.url, "provider": "openai", "default": True},
            "anthropic": {"base_url": upstream.url, "provider": "anthropic"}}}, GatewayConfig)
        file = PipelineFile("pipeline.yaml", exporters={"clickhouse": ComponentConfig(
            "clickhouse", registry.factory("exporter", "clickhouse"), exporter.config)},
            receivers={"gateway": ComponentConfig(
                "gateway", registry.factory("receiver", "gateway"), gateway)})
        finops = convert({"budget_refresh": "50ms", "budgets": {"daily": {
            "limit_usd": 5, "period": "day", "per": "user", "action": "enforce"}}},
            FinOpsConfig)
        extension = FinOps(link(finops, file),
                           dataclasses.replace(exporter.context, id="finops"))
        pipeline = Collect()
        receiver = GatewayReceiver(gateway, dataclasses.replace(exporter.context, id="gateway"),
                                   pipeline)
        await receiver.start()
        await extension.start()
        await eventually(lambda: receiver.proxy.budgets is not None
                         and receiver.proxy.budgets._index)
        try:
            yield receiver, upstream, pipeline
        finally:
            await extension.shutdown()
            await receiver.shutdown()


def url(receiver: GatewayReceiver) -> str:
    return f"http://127.0.0.1:{receiver.proxy.port}"


async def test_a_spent_hard_budget_answers_429_budget_exceeded_to_the_openai_sdk(enforced):
    receiver, upstream, pipeline = enforced
    client = openai.AsyncOpenAI(base_url=f"{url(receiver)}/v1", api_key="sk-client",
                                max_retries=0)
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**ask, extra_headers={"x-meterline-user": "ann"})
    assert refused.value.status_code == 429
    assert refused.value.body["type"] == "budget_exceeded"  # the SDK's body is the error
    assert refused.value.code == "budget_exceeded"
    assert "budget 'daily' (user ann) exceeded: $6.00 of $5.00 this day" in refused.value.message
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 86400
    assert len(upstream.requests) == 0  # nothing forwarded
    answer = await client.chat.completions.create(**ask,
                                                  extra_headers={"x-meterline-user": "bob"})
    assert answer.choices[0].message.content
    assert len(upstream.requests) == 1
    await client.close()
    await eventually(lambda: len(pipeline.events) == 2)
    blocked = next(e for e in pipeline.events if e.user_id == "ann")
    assert (blocked.status_code, blocked.error_type, blocked.policies) == (
        429, "budget_exceeded", ["budget"])


async def test_the_anthropic_sdk_gets_its_own_error_shape(enforced):
    receiver, upstream, _ = enforced
    client = anthropic.AsyncAnthropic(base_url=f"{url(receiver)}/anthropic", api_key="sk-ant",
                                      max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.create(model="claude-3-5-haiku", max_tokens=16,
                                     messages=[{"role": "user", "content": "hi"}],
                                     extra_headers={"x-meterline-user": "ann"})
    await client.close()
    assert refused.value.body == {"type": "error", "error": {
        "type": "budget_exceeded", "message": refused.value.body["error"]["message"]}}
    assert len(upstream.requests) == 0


def test_blocks_match_every_term_and_lift_when_they_say():
    blocks = BudgetBlocks()
    blocks.publish([Block("b", frozenset({("user_id", "ann"), ("metadata.env", "prod")}),
                          "spent", until=100.0)])
    ann_prod = Event(user_id="ann", metadata={"env": "prod"})
    block = blocks.check(ann_prod, now=40)
    assert block is not None and block.seconds_left(40) == 60  # the Retry-After
    assert blocks.check(Event(user_id="ann", metadata={"env": "dev"}), now=40) is None
    assert blocks.check(ann_prod, now=100) is None  # lifted


async def rolling_block(tmp_path, spends: list[tuple[timedelta, float]]) -> tuple[Block, float]:
    """The block of an enforced rolling 24h budget of $5 for user ann after `spends`
    (how long ago, USD), and the evaluation's time (epoch seconds)."""
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make()
        now = datetime.now(UTC)
        await exporter.export(ExportBatch("a", [
            make_event(i, timestamp=int((now - ago).timestamp() * 1e9), cost_usd=cost,
                       user_id="ann") for i, (ago, cost) in enumerate(spends)]))
        config = {"ann": convert({"limit_usd": 5, "window": "24h", "scope": {"user": "ann"},
                                  "action": "enforce"}, Budget)}
        [block] = enforce.blocks(exporter.reader, config,
                                 budgets.status(exporter.reader, config, now))
        return block, now.timestamp()


def hour_of(t: float) -> float:
    return t // 3600 * 3600


async def test_a_rolling_budget_lifts_once_its_oldest_spend_has_left_the_window(tmp_path):
    """$4 20 hours ago and $3 now: under $5 once the hour of the $4 has left the 24 hours."""
    block, now = await rolling_block(tmp_path, [(timedelta(hours=20), 4.0),
                                                (timedelta(minutes=1), 3.0)])
    lifts = hour_of(now - 20 * 3600) + 3600 + 24 * 3600
    assert block.until == pytest.approx(lifts, abs=1)
    assert block.seconds_left(now) == pytest.approx(lifts - now, abs=1)  # about 5 hours


async def test_a_rolling_budget_spent_in_its_last_hour_waits_for_that_hour_to_leave(tmp_path):
    block, now = await rolling_block(tmp_path, [(timedelta(hours=10), 1.0),
                                                (timedelta(minutes=1), 6.0)])
    assert block.until == pytest.approx(hour_of(now - 60) + 3600 + 24 * 3600, abs=1)
