"""The real LiteLLM proxy in front of the fake upstream, its generic API logger posting to
a real meterline webhook: every event field checked against what the upstream answered.

Two proxies, one per configuration form of docs/howto/litellm.md: `callback_settings`
(here with `log_format: ndjson`, called with the master key) and the environment
variables (the default `json_array`, called with a virtual key that a custom-auth
module defines, as LiteLLM's virtual keys would be without a database). Each is
started once for the module and driven with the official openai SDK: a plain call, a
stream, an alias to an Anthropic model, the same call twice (the second answered by
LiteLLM's in-memory cache), a model LiteLLM's cost map lacks, and upstream 500 and 429.
LiteLLM is installed once per machine (tests/litellm_proxy.py); the tests are skipped,
with the reason, only when it cannot be.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import pytest_asyncio

from meterline.event import api_key_id
from meterline.gateway.fakeupstream import FakeUpstream
from tests import litellm_proxy
from tests.helpers import (
    eventually,
    free_port,
    metric_value,
    read_jsonl,
    running,
    webhook_to_file,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "litellm-to-meterline"
OUTPUT_TOKENS = 7  # the fake upstream's answers: `tok0 … tok6 `
TAGS = ["checkout", "beta"]
# per call: model asked for, its words (the fake upstream's input token count), how
CALLS: dict[str, dict[str, Any]] = {
    "plain": {"model": "gpt-4o-mini", "text": "plain call with six words"},
    "stream": {"model": "gpt-4o-mini", "text": "a streamed call of seven words", "stream": True},
    "alias": {"model": "claude-haiku", "text": "an aliased anthropic call"},
    "cache-miss": {"model": "gpt-4o-mini", "text": "the same call twice"},
    "cache-hit": {"model": "gpt-4o-mini", "text": "the same call twice"},
    "unmapped": {"model": "unmapped", "text": "a model nobody prices at all"},
    "broken-500": {"model": "broken-500", "text": "this one fails", "status": 500},
    "limited-429": {"model": "limited-429", "text": "this one is limited", "status": 429},
}
# what LiteLLM calls for each name the client asks for (tests/litellm_proxy.py's model_list)
DEPLOYED = {"gpt-4o-mini": ("openai", "gpt-4o-mini"),
            "claude-haiku": ("anthropic", "claude-3-5-haiku-20241022"),
            "unmapped": ("openai", "meterline-unmapped-model"),
            "broken-500": ("openai", "gpt-4o-mini"), "limited-429": ("openai", "gpt-4o-mini")}
GPT_4O_MINI = (0.15, 0.6)  # USD per 1M tokens, in LiteLLM's map and meterline's alike
CLAUDE_3_5_HAIKU = (0.8, 4.0)  # in meterline's price table (not in LiteLLM 1.100.5's map)


@dataclass
class Run:
    form: str
    events: dict[str, dict[str, Any]]  # by the call's name (its `metadata.call`)
    upstream: FakeUpstream
    upstream_texts: list[str]  # the user message of every request the upstream got
    refused: float
    startup_s: float
    key: str


def pipeline(port: int) -> str:
    return webhook_to_file(port, webhook={"auth_token": TOKEN}, processors={"cost": {}})


async def drive(proxy: litellm_proxy.Proxy, key: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=key,
                                  max_retries=0) as client:
        for name, call in CALLS.items():
            extra = {"metadata": {"tags": TAGS, "spend_logs_metadata": {
                "call": name, "attempt": 1, "checked": True}}}
            kwargs: dict[str, Any] = {
                "model": call["model"], "messages": [{"role": "user", "content": call["text"]}],
                "extra_body": extra}
            if name == "plain":
                kwargs["user"] = "customer-7"
            if "status" in call:
                with pytest.raises(openai.APIStatusError) as failed:
                    await client.chat.completions.create(**kwargs)
                assert failed.value.status_code == call["status"]
            elif call.get("stream"):
                stream = await client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs)
                text = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
                assert text == OUTPUT
            else:
                answer = await client.chat.completions.create(**kwargs)
                assert answer.choices[0].message.content == OUTPUT
                assert answer.model == call["model"]  # LiteLLM answers with the name asked for


OUTPUT = "".join(f"tok{i} " for i in range(OUTPUT_TOKENS))


@pytest_asyncio.fixture(scope="module", loop_scope="module",
                        params=["callback_settings", "environment"])
async def run(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Any:
    try:
        exe = await asyncio.to_thread(litellm_proxy.ensure_installed)
    except litellm_proxy.Unavailable as e:
        pytest.skip(str(e))
    form = request.param
    tmp = tmp_path_factory.mktemp(form)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/v1/events"
    out = tmp / "data" / "out.jsonl"
    async with FakeUpstream(tokens=OUTPUT_TOKENS) as upstream, \
            running(pipeline(port), tmp) as service:
        workdir = tmp / "litellm"
        workdir.mkdir()
        # One batch holding every call's payload, sent when the last one is queued: LiteLLM
        # 1.100.5's logger empties its queue after each POST, dropping the payloads queued
        # while the POST was under way, so a batch sent between two calls could lose one.
        batching = {"DEFAULT_BATCH_SIZE": str(len(CALLS)),
                    "DEFAULT_FLUSH_INTERVAL_SECONDS": "3600"}
        if form == "callback_settings":
            cfg = litellm_proxy.config(upstream.url, endpoint=endpoint, token=TOKEN,
                                       log_format="ndjson")
            proxy = litellm_proxy.Proxy(exe, workdir, cfg, batching)
            key = litellm_proxy.MASTER_KEY
        else:
            cfg = litellm_proxy.config(upstream.url, endpoint=None, token=TOKEN,
                                       custom_auth=True)
            proxy = litellm_proxy.Proxy(exe, workdir, cfg,
                                        {**litellm_proxy.env(endpoint, TOKEN), **batching})
            key = next(iter(litellm_proxy.VIRTUAL_KEYS))
        await proxy.start()
        try:
            started = time.monotonic()
            await drive(proxy, key)
            rows = await eventually(lambda: len(read_jsonl(out)) >= len(CALLS)
                                    and read_jsonl(out), timeout=30)
            print(f"\n{form}: litellm ready in {proxy.startup_s:.1f} s, "
                  f"{len(CALLS)} calls and their events in {time.monotonic() - started:.1f} s")
        except BaseException:
            print(proxy.output(80))
            raise
        finally:
            proxy.stop()
        refused = metric_value(service.telemetry.registry,
                               "meterline_receiver_refused_events_total")
    events = {r["metadata"]["call"]: r for r in rows}
    assert len(events) == len(rows) == len(CALLS), sorted(events)
    texts = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
             for r in upstream.requests for m in r.body["messages"]]
    yield Run(form, events, upstream, texts, refused, proxy.startup_s, key)


def succeeded(run: Run) -> list[str]:
    return [n for n, c in CALLS.items() if "status" not in c]


async def test_every_call_is_one_event_and_none_is_refused(run: Run) -> None:
    assert sorted(run.events) == sorted(CALLS)
    assert run.refused == 0
    assert len({e["event_id"] for e in run.events.values()}) == len(CALLS)
    # the cache answered the second identical call: the upstream saw it once
    assert run.upstream_texts.count(CALLS["cache-hit"]["text"]) == 1
    assert len(run.upstream_texts) == len(CALLS) - 1


async def test_models_routes_and_providers(run: Run) -> None:
    for name, e in run.events.items():
        asked = CALLS[name]["model"]
        provider, model = DEPLOYED[asked]
        assert (e["source"], e["operation"]) == ("litellm", "chat"), name
        assert (e["provider"], e["request_model"], e["route"]) == (provider, model, asked), name
        # LiteLLM writes the name asked for into the response: that is no response model
        assert "response_model" not in e, name
        suffix = "/v1/messages" if provider == "anthropic" else "/v1"
        assert e["upstream"] == run.upstream.url + suffix, name


async def test_tokens_are_what_the_upstream_answered(run: Run) -> None:
    for name in succeeded(run):
        e = run.events[name]
        words = len(CALLS[name]["text"].split())
        assert (e["input_tokens"], e["output_tokens"]) == (words, OUTPUT_TOKENS), name
        assert e["output_messages"] == [{"role": "assistant", "content": OUTPUT}], name
        assert e["input_messages"] == [{"role": "user", "content": CALLS[name]["text"]}], name
        assert e["finish_reasons"] == ["stop"], name
        assert e["status_code"] == 200 and "error_type" not in e, name
        assert e["duration_ms"] > 0, name


async def test_failures_carry_the_upstream_status_and_no_response(run: Run) -> None:
    for name, kind in (("broken-500", "server_error"), ("limited-429", "rate_limit_error")):
        e = run.events[name]
        assert (e["status_code"], e["error_type"]) == (CALLS[name]["status"], kind)
        assert f"fake upstream error {CALLS[name]['status']}" in e["error_message"]
        for absent in ("input_tokens", "output_tokens", "output_messages", "finish_reasons",
                       "response_model", "saved_cost_usd"):
            assert absent not in e, (name, absent)
        assert e["actual_cost_usd"] == 0.0  # nothing used, nothing billed
        assert e["streaming"] is False and e["cache_hit"] is False


async def test_streaming_is_true_for_the_stream_only(run: Run) -> None:
    for name, e in run.events.items():
        assert e["streaming"] is bool(CALLS[name].get("stream")), name
        assert ("ttft_ms" in e) is bool(CALLS[name].get("stream")), name
    stream = run.events["stream"]
    assert 0 < stream["ttft_ms"] <= stream["duration_ms"]


async def test_a_cache_hit_billed_nothing_and_records_the_saving(run: Run) -> None:
    miss, hit = run.events["cache-miss"], run.events["cache-hit"]
    words = len(CALLS["cache-hit"]["text"].split())
    cost = (words * GPT_4O_MINI[0] + OUTPUT_TOKENS * GPT_4O_MINI[1]) / 1e6
    assert (hit["cache_hit"], hit["actual_cost_usd"]) == (True, 0.0)
    assert hit["saved_cost_usd"] == pytest.approx(cost)
    assert (miss["cache_hit"], miss["actual_cost_usd"]) == (False, pytest.approx(cost))
    assert "saved_cost_usd" not in miss
    assert all(e["cache_hit"] is False for n, e in run.events.items() if n != "cache-hit")


async def test_costs_litellm_knows_are_kept_and_unknown_ones_are_not_zero(run: Run) -> None:
    for name in ("plain", "stream"):
        words = len(CALLS[name]["text"].split())
        assert run.events[name]["actual_cost_usd"] == pytest.approx(
            (words * GPT_4O_MINI[0] + OUTPUT_TOKENS * GPT_4O_MINI[1]) / 1e6), name
    # LiteLLM 1.100.5's local map has no claude-3-5-haiku-20241022 (and no made-up
    # model): it reports 0.0 for both, which is no price
    for name in ("alias", "unmapped"):
        assert "actual_cost_usd" not in run.events[name], name


def price(name: str, rates: tuple[float, float]) -> float:
    words = len(CALLS[name]["text"].split())
    return (words * rates[0] + OUTPUT_TOKENS * rates[1]) / 1e6


async def test_meterline_prices_the_deployed_model_and_bills_a_cache_hit_nothing(
        run: Run) -> None:
    for name in ("plain", "stream", "cache-miss"):  # the estimate meets LiteLLM's own
        e = run.events[name]
        assert e["cost_usd"] == pytest.approx(price(name, GPT_4O_MINI)) == e["actual_cost_usd"]
    assert run.events["alias"]["cost_usd"] == pytest.approx(price("alias", CLAUDE_3_5_HAIKU))
    assert run.events["cache-hit"]["cost_usd"] == 0
    assert "cost_usd" not in run.events["unmapped"]  # nobody prices it: unknown, not $0
    for name in ("broken-500", "limited-429"):  # no tokens reported: no estimate
        assert "cost_usd" not in run.events[name], name


async def test_keys_users_and_teams(run: Run) -> None:
    for name, e in run.events.items():
        if run.form == "callback_settings":  # the master key
            assert e["api_key_name"] == "master", name
            for absent in ("api_key_id", "team", "organization"):
                assert absent not in e, (name, absent)
            # no user of the key: the request's own `user`, when it sent one
            assert e.get("user_id") == ("customer-7" if name == "plain" else None), name
        else:
            who = litellm_proxy.VIRTUAL_KEYS[run.key]
            assert e["api_key_id"] == api_key_id(run.key), name
            assert (e["api_key_name"], e["team"], e["organization"], e["user_id"]) == (
                who["key_alias"], who["team_id"], who["org_id"], who["user_id"]), name
    assert run.events["plain"]["attributes"]["litellm.end_user"] == "customer-7"


async def test_metadata_tags_and_attributes(run: Run) -> None:
    for name, e in run.events.items():
        assert e["metadata"] == {"call": name, "attempt": "1", "checked": "true"}, name
        assert e["attributes"]["litellm.spend_logs_metadata"] == {
            "call": name, "attempt": 1, "checked": True}, name
        assert e["tags"] == TAGS, name  # without LiteLLM's own `User-Agent: …` tags
        assert e["attributes"]["user_agent.original"].startswith("AsyncOpenAI/Python"), name

