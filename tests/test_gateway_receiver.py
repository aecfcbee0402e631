"""Receiver `gateway` inside the daemon: events reach the exporters off the request
path, a full buffer drops and counts, self-telemetry, config errors."""

import asyncio

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meterline import config as config_mod
from meterline.config import ConfigError
from meterline.gateway.fakeupstream import FakeUpstream
from tests.helpers import eventually, free_port, metric_value, read_jsonl, running

MESSAGES = [{"role": "user", "content": "hi"}]


def pipeline(port, upstream_url, gateway_extra="", exporter_extra=""):
    return f"""
    receivers:
      gateway:
        listen: 127.0.0.1:{port}
        upstreams:
          openai: {{base_url: "{upstream_url}", provider: openai, default: true}}
        flush_interval: 20ms
        {gateway_extra}
    exporters:
      file:
        path: {{data}}/out.jsonl
        batch: {{timeout: 10ms}}
        {exporter_extra}
    service:
      data_dir: {{data}}
      admin: null
      workers: 1  # no processor to run (tests/helpers.py, INLINE)
      pipelines:
        p: {{receivers: [gateway], exporters: [file]}}
    """


def client(port):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x",
                              max_retries=0)


async def test_gateway_calls_reach_the_exporters_as_events(tmp_path):
    port = free_port()
    async with FakeUpstream(tokens=3) as fake, running(pipeline(port, fake.url), tmp_path):
        for i in range(3):
            await client(port).chat.completions.create(model=f"m{i}", messages=MESSAGES)
        rows = await eventually(lambda: len(read_jsonl(tmp_path / "data/out.jsonl")) == 3
                                and read_jsonl(tmp_path / "data/out.jsonl"))
    assert [r["request_model"] for r in rows] == ["m0", "m1", "m2"]
    assert all(r["source"] == "gateway" and r["output_tokens"] == 3 for r in rows)


async def test_a_full_buffer_drops_and_counts_without_holding_up_responses(tmp_path):
    """The exporter cannot write (its path is a directory), its queue fills, the pipeline
    pushes back, the gateway's buffer of 2 fills: later events are dropped, counted."""
    port = free_port()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    body = pipeline(port, "{url}", "buffer_size: 2\n        drain_timeout: 100ms",
                    f"queue: {{type: memory, max_events: 1}}\n        path: {blocked}")
    body = body.replace("        path: {data}/out.jsonl\n", "").replace(
        "admin: null", "admin: null\n      shutdown_timeout: 100ms")
    async with FakeUpstream() as fake, running(body.replace("{url}", fake.url),
                                               tmp_path) as service:
        gateway_client = client(port)
        for _ in range(8):
            await asyncio.wait_for(gateway_client.chat.completions.create(
                model="m", messages=MESSAGES), timeout=5)
        registry = service.telemetry.registry
        dropped = await eventually(lambda: metric_value(
            registry, "llm_gateway_dropped_events_total"))
        refused = metric_value(registry, "meterline_receiver_refused_events_total",
                               reason="buffer_full")
    assert dropped >= 1 and refused == dropped


async def test_events_stay_buffered_while_the_pipeline_pushes_back(tmp_path):
    port = free_port()
    target = tmp_path / "out.jsonl"
    target.mkdir()  # the exporter fails until this becomes a writable path
    body = pipeline(port, "{url}", "", "queue: {type: memory, max_events: 1}\n"
                    "        retry: {initial_interval: 20ms, max_interval: 50ms}")
    body = body.replace("{data}/out.jsonl", str(target))
    async with FakeUpstream() as fake, running(body.replace("{url}", fake.url), tmp_path):
        for i in range(6):
            await client(port).chat.completions.create(model=f"m{i}", messages=MESSAGES)
        await asyncio.sleep(0.2)
        target.rmdir()
        rows = await eventually(lambda: len(read_jsonl(target)) == 6 and read_jsonl(target))
    assert sorted(r["request_model"] for r in rows) == [f"m{i}" for i in range(6)]


async def test_self_telemetry_shows_requests_in_flight_by_provider(tmp_path):
    port = free_port()
    async with FakeUpstream(latency=0.5) as fake, \
            running(pipeline(port, fake.url), tmp_path) as service:
        registry = service.telemetry.registry
        call = asyncio.create_task(client(port).chat.completions.create(model="m",
                                                                        messages=MESSAGES))
        await eventually(lambda: fake.requests)
        inflight = metric_value(registry, "llm_gateway_requests_inflight")
        active = metric_value(registry, "llm_gateway_active_requests", provider="openai")
        await call
        after = metric_value(registry, "llm_gateway_requests_inflight")
    assert (inflight, active, after) == (1, 1, 0)


async def test_an_upstream_failing_to_connect_is_reported_unhealthy(tmp_path):
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    async with running(pipeline(port, dead), tmp_path) as service:
        registry = service.telemetry.registry
        assert metric_value(registry, "llm_gateway_endpoint_healthy", endpoint="openai") == 1
        for _ in range(3):
            with pytest.raises(openai.APIStatusError):
                await client(port).chat.completions.create(model="m", messages=MESSAGES)
        assert metric_value(registry, "llm_gateway_endpoint_healthy", endpoint="openai") == 0


async def test_requests_in_flight_at_shutdown_finish_within_the_drain_timeout(tmp_path):
    port = free_port()
    async with FakeUpstream(latency=0.3) as fake:
        async with running(pipeline(port, fake.url), tmp_path):
            call = asyncio.create_task(client(port).chat.completions.create(
                model="m", messages=MESSAGES))
            await eventually(lambda: fake.requests)
        reply = await call
        rows = read_jsonl(tmp_path / "data/out.jsonl")
    assert reply.choices[0].message.content
    assert [r["status_code"] for r in rows] == [200]


async def test_requests_still_in_flight_after_the_drain_timeout_are_cut_and_recorded(tmp_path):
    port = free_port()
    async with FakeUpstream(latency=5) as fake:
        async with running(pipeline(port, fake.url, "drain_timeout: 100ms"), tmp_path):
            call = asyncio.create_task(client(port).chat.completions.create(
                model="m", messages=MESSAGES))
            await eventually(lambda: fake.requests)
        with pytest.raises(openai.APIConnectionError):
            await call
        rows = read_jsonl(tmp_path / "data/out.jsonl")
    assert [(r["status_code"], r["error_type"]) for r in rows] == [(503, "service_unavailable")]


@pytest.mark.parametrize(("upstreams", "message"), [
    ('{a: {base_url: "http://x", fallback: [b]}}', "fallback 'b' must name another upstream"),
    ('{a: {base_url: "http://x", default: true}, b: {base_url: "http://y", default: true}}',
     "only one upstream may be the default"),
    ('{v1: {base_url: "http://x"}}', "would capture the root paths"),
    ('{a: {base_url: "ftp://x"}}', "base_url must be http(s)://host"),
    ('{a: {base_url: "https://api.openai.com/v1/"}}',
     "without the API's /v1, which the client's path carries: 'https://api.openai.com'"),
])
def test_invalid_upstreams_are_refused_with_the_line_and_reason(upstreams, message):
    text = f"""receivers:
  gateway:
    upstreams: {upstreams}
exporters:
  debug: {{}}
service:
  pipelines:
    p: {{receivers: [gateway], exporters: [debug]}}
"""
    with pytest.raises(ConfigError) as caught:
        config_mod.loads(text, "pipeline.yaml")
    problem = str(caught.value)
    assert "pipeline.yaml:2" in problem or "pipeline.yaml:3" in problem
    assert message in problem


def test_an_empty_gateway_block_forwards_to_openai_by_default():
    loaded = config_mod.loads("""receivers:
  gateway: {}
exporters:
  debug: {}
service:
  pipelines:
    p: {receivers: [gateway], exporters: [debug]}
""")
    config = loaded.receivers["gateway"].config
    assert config.listen == "127.0.0.1:8080"
    assert config.upstreams["openai"].base_url == "https://api.openai.com"
    assert config.default_upstream == "openai"


async def test_the_prometheus_exporter_shows_gateway_calls_and_live_gauges(tmp_path):
    port, scrape = free_port(), free_port()
    body = f"""
    receivers:
      gateway:
        listen: 127.0.0.1:{port}
        upstreams:
          openai: {{base_url: "{{url}}", provider: openai, default: true}}
        flush_interval: 20ms
    exporters:
      prometheus: {{listen: "127.0.0.1:{scrape}", batch: {{timeout: 10ms}}}}
    service:
      data_dir: {{data}}
      admin: null
      pipelines:
        p: {{receivers: [gateway], exporters: [prometheus]}}
    """
    async with FakeUpstream() as fake, running(body.replace("{url}", fake.url), tmp_path):
        await client(port).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

        async def scraped():
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{scrape}/metrics") as r:
                return [s for f in text_string_to_metric_families(await r.text())
                        for s in f.samples]

        def value(samples, name, **labels):
            return sum(s.value for s in samples if s.name == name
                       and all(s.labels.get(k) == v for k, v in labels.items()))

        samples = await scraped()
        deadline = asyncio.get_running_loop().time() + 10
        while not value(samples, "llm_gateway_routing_decisions_total", method="default"):
            assert asyncio.get_running_loop().time() < deadline, "no routing decision scraped"
            await asyncio.sleep(0.05)
            samples = await scraped()
    assert value(samples, "llm_gateway_routing_decisions_total", method="default") == 1
    assert value(samples, "llm_gateway_endpoint_healthy", endpoint="openai") == 1
    assert {s.name for s in samples} >= {"llm_gateway_requests_inflight",
                                         "llm_gateway_active_requests"}
