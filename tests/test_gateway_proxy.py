"""The gateway's proxy, driven by the official SDKs against the fake upstream."""

import hashlib
import json
import time

import aiohttp
import openai
import pytest

from meterline.event import to_json
from meterline.gateway.fakeupstream import FakeUpstream
from tests.gateway_helpers import gateway, openai_upstream

MESSAGES = [{"role": "user", "content": "tell me a joke"}]


@pytest.fixture
async def fake():
    async with FakeUpstream(tokens=4, cached_tokens=2, reasoning_tokens=1) as upstream:
        yield upstream


async def test_a_chat_completion_becomes_one_event_with_usage_and_content(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        reply = await gw.openai(key="sk-client").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, temperature=0.2, max_tokens=50)
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
        event = gw.event
    assert (event.source, event.provider, event.operation) == ("gateway", "openai", "chat")
    assert (event.request_model, event.response_model) == ("gpt-4o-mini",
                                                           "gpt-4o-mini-2025-01-01")
    assert (event.streaming, event.status_code, event.finish_reasons) == (False, 200, ["stop"])
    assert (event.input_tokens, event.output_tokens) == (4, 4)
    assert (event.cache_read_tokens, event.reasoning_tokens) == (2, 1)
    assert event.params == {"temperature": 0.2, "max_tokens": 50}
    assert (event.endpoint, event.route, event.upstream) == ("/v1/chat/completions", "openai",
                                                             "openai")
    assert event.attributes["meterline.routing_method"] == "default"
    assert (event.attempts, event.fallback) == (1, False)
    assert event.input_messages == MESSAGES
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]
    assert (event.ratelimit_requests_limit, event.ratelimit_tokens_remaining) == (10000, 199000)
    assert event.ttft_ms is None and event.error_type is None


async def test_durations_split_into_provider_time_and_gateway_overhead(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-fake-latency": "0.05"})
        event = gw.event
    assert event.provider_duration_ms >= 50
    assert event.duration_ms >= event.provider_duration_ms
    assert event.overhead_ms == pytest.approx(event.duration_ms - event.provider_duration_ms)


async def test_api_key_id_is_the_sha256_prefix_of_the_client_key_never_the_key(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai(key="sk-secret-123").chat.completions.create(model="m",
                                                                     messages=MESSAGES)
        event = gw.event
    assert event.api_key_id == hashlib.sha256(b"sk-secret-123").hexdigest()[:16]
    assert b"sk-secret-123" not in to_json(event)


async def test_a_stream_reports_usage_without_the_client_seeing_the_injected_chunk(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunk-delay": "0.01"})
        chunks = [chunk async for chunk in stream]
        event = gw.event
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert (event.streaming, event.input_tokens, event.output_tokens) == (True, 4, 4)
    assert event.finish_reasons == ["stop"]
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]
    assert 0 < event.ttft_ms < event.duration_ms
    assert event.itl_ms >= 5  # the fake paces chunks 10 ms apart


async def test_a_stream_that_asked_for_usage_gets_its_usage_chunk(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        stream = await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        event = gw.event
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert event.output_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_text_completions_are_recorded(fake, stream):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        result = await gw.openai().completions.create(model="davinci", prompt="say a b c",
                                                      stream=stream)
        if stream:
            text = "".join([c.choices[0].text async for c in result if c.choices])
        else:
            text = result.choices[0].text
        event = gw.event
    assert text == "tok0 tok1 tok2 tok3 "
    assert (event.operation, event.input_tokens, event.output_tokens) == ("text_completion", 4, 4)
    assert event.input_messages == [{"role": "user", "content": "say a b c"}]
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]


async def test_embeddings_are_recorded(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        result = await gw.openai().embeddings.create(model="text-embedding-3-small",
                                                     input=["one two", "three"])
        event = gw.event
    assert len(result.data) == 2
    assert (event.operation, event.input_tokens, event.streaming) == ("embeddings", 3, False)


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_api_calls_are_recorded(fake, stream):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        client = gw.openai()
        if stream:
            events = [e async for e in await client.responses.create(
                model="gpt-4.1", input="hello you", instructions="be brief", stream=True)]
            assert events[-1].type == "response.completed"
        else:
            reply = await client.responses.create(model="gpt-4.1", input="hello you",
                                                  instructions="be brief")
            assert reply.output_text == "tok0 tok1 tok2 tok3 "
        event = gw.event
    assert (event.operation, event.input_tokens, event.output_tokens) == ("chat", 4, 4)
    assert (event.cache_read_tokens, event.reasoning_tokens) == (2, 1)
    assert event.finish_reasons == ["completed"]
    assert event.input_messages[0] == {"role": "system", "content": "be brief"}
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]
    assert (event.ttft_ms is not None) == stream


async def test_anthropic_messages_count_cached_input_and_use_the_configured_key(fake):
    fake.cache_creation_tokens = 3
    upstreams = {"anthropic": {"base_url": fake.url, "provider": "anthropic",
                               "api_key": "sk-ant-upstream"}}
    async with gateway(upstreams) as gw:
        reply = await gw.anthropic().messages.create(
            model="claude-sonnet-4", max_tokens=64, system="be nice",
            messages=[{"role": "user", "content": "hi there"}])
        event = gw.event
    assert reply.content[0].text == "tok0 tok1 tok2 tok3 "
    assert fake.requests[-1].headers["x-api-key"] == "sk-ant-upstream"
    assert event.api_key_id == hashlib.sha256(b"sk-ant-client").hexdigest()[:16]
    assert (event.provider, event.endpoint, event.route) == ("anthropic", "/v1/messages",
                                                             "anthropic")
    assert event.attributes["meterline.routing_method"] == "explicit"
    assert (event.input_tokens, event.cache_read_tokens, event.cache_creation_tokens) == (9, 2, 3)
    assert (event.output_tokens, event.finish_reasons) == (4, ["end_turn"])
    assert event.input_messages[0] == {"role": "system", "content": "be nice"}
    assert event.params == {"max_tokens": 64}
    assert event.ratelimit_requests_remaining == 3999


async def test_an_anthropic_stream_is_measured_and_passed_through(fake):
    upstreams = {"anthropic": {"base_url": fake.url, "provider": "anthropic"}}
    async with gateway(upstreams) as gw:
        async with gw.anthropic().messages.stream(
                model="claude-sonnet-4", max_tokens=64, messages=[{"role": "user",
                                                                   "content": "hi"}]) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        event = gw.event
    assert text == "tok0 tok1 tok2 tok3 " and final.usage.output_tokens == 4
    assert (event.streaming, event.input_tokens, event.output_tokens) == (True, 3, 4)
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]
    assert event.ttft_ms > 0


@pytest.mark.parametrize(("path", "body", "operation"), [
    ("/api/chat", {"model": "llama3", "messages": MESSAGES, "options": {"temperature": 0}},
     "chat"),
    ("/api/generate", {"model": "llama3", "prompt": "tell me a joke"}, "text_completion"),
])
async def test_ollama_streams_by_default_and_reports_its_final_counts(fake, path, body,
                                                                      operation):
    upstreams = {"ollama": {"base_url": fake.url, "provider": "ollama"}}
    async with gateway(upstreams) as gw, aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/ollama{path}", json=body) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        event = gw.event
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert (event.provider, event.operation, event.streaming) == ("ollama", operation, True)
    assert (event.input_tokens, event.output_tokens, event.finish_reasons) == (4, 4, ["stop"])
    assert event.output_messages == [{"role": "assistant", "content": "tok0 tok1 tok2 tok3 "}]


async def test_other_paths_pass_through_untouched(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        models = await gw.openai().models.list()
        event = gw.event
    assert [m.id for m in models.data] == ["gpt-4o-mini"]
    assert (event.endpoint, event.status_code, event.operation) == ("/v1/models", 200, None)


async def test_the_path_prefix_names_the_upstream_and_is_stripped(fake):
    async with FakeUpstream() as other:
        upstreams = {"openai": openai_upstream(fake.url), "local": {"base_url": other.url}}
        async with gateway(upstreams) as gw:
            await gw.openai(prefix="/local").chat.completions.create(model="m",
                                                                     messages=MESSAGES)
            event = gw.event
        assert [r.path for r in other.requests] == ["/v1/chat/completions"]
        assert not fake.requests
    assert (event.route, event.upstream) == ("local", "local")
    assert event.attributes["meterline.routing_method"] == "explicit"


async def test_a_base_url_path_is_kept_in_front_of_the_request_path(fake):
    async with gateway({"openai": openai_upstream(fake.url + "/proxy/openai")}) as gw:
        await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
    assert fake.requests[-1].path == "/proxy/openai/v1/chat/completions"


async def test_a_path_no_upstream_serves_is_a_404_naming_the_prefixes(fake):
    upstreams = {"a": {"base_url": fake.url}, "b": {"base_url": fake.url}}
    async with gateway(upstreams) as gw:
        with pytest.raises(openai.NotFoundError, match=r"/a/\.\.\., /b/\.\.\."):
            await gw.openai().chat.completions.create(model="m", messages=MESSAGES)
        assert gw.event.status_code == 404
    assert not fake.requests


async def test_upstream_connections_are_kept_alive_and_reused(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        client = gw.openai()
        for _ in range(5):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert len({r.peer_port for r in fake.requests}) == 1


async def test_attribution_headers_are_recorded_and_not_forwarded(fake):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"X-Meterline-Metadata": json.dumps({"customer_id": "acme-42", "tier": 2}),
               "X-Meterline-User": "u-7", "X-Meterline-Session": "s-9",
               "traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().chat.completions.create(model="m", messages=MESSAGES,
                                                  extra_headers=headers)
        event = gw.event
    assert event.metadata == {"customer_id": "acme-42", "tier": "2"}
    assert (event.user_id, event.session_id) == ("u-7", "s-9")
    assert (event.trace_id, event.parent_span_id) == (trace, "00f067aa0ba902b7")
    sent = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    assert sent["traceparent"] == f"00-{trace}-{event.span_id}-01"
    assert not {"x-meterline-metadata", "x-meterline-user", "x-meterline-session"} & set(sent)


async def test_truefoundry_metadata_header_is_accepted(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"X-TFY-METADATA": '{"env": "prod"}'})
        assert gw.event.metadata == {"env": "prod"}


async def test_malformed_metadata_header_is_a_400_that_says_which_header(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        with pytest.raises(openai.BadRequestError, match="x-meterline-metadata"):
            await gw.openai().chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"X-Meterline-Metadata": "{oops"})
    assert not fake.requests


async def test_openai_upstreams_get_the_configured_key_as_a_bearer_token(fake):
    upstream = openai_upstream(fake.url, api_key="sk-upstream")
    async with gateway({"openai": upstream}) as gw:
        await gw.openai(key="sk-client").chat.completions.create(model="m", messages=MESSAGES)
        event = gw.event
    sent = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    assert sent["authorization"] == "Bearer sk-upstream"
    assert event.api_key_id == hashlib.sha256(b"sk-client").hexdigest()[:16]


async def test_the_metadata_header_name_is_configurable(fake):
    async with gateway({"openai": openai_upstream(fake.url)},
                       metadata_header="X-Team-Labels") as gw:
        await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"X-Team-Labels": '{"team": "search"}'})
        event = gw.event
    assert event.metadata == {"team": "search"}
    assert "x-team-labels" not in {k.lower() for k in fake.requests[-1].headers}


async def test_a_stream_reaches_the_client_chunk_by_chunk_as_it_arrives(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        started = time.monotonic()
        stream = await gw.openai().chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            extra_headers={"x-fake-chunk-delay": "0.2", "x-fake-tokens": "6"})
        arrivals = [time.monotonic() - started async for _ in stream]
    # The upstream sends a chunk every 0.2 s: passed on as they come, they arrive over a
    # second or so; held back, they would arrive together. (Spread rather than the first
    # chunk's time: on a loaded machine the request itself may take half a second.)
    assert arrivals[-1] >= 1.0
    assert arrivals[-1] - arrivals[0] >= 0.8
