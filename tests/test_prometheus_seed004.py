"""Exporter `prometheus`: seed 004's families (TrueFoundry's names) beside seed 001's, the
policy, agent and MCP metrics, rate-limit utilization, and the `families` option."""

import msgspec
import pytest

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.event import Guardrail
from meterline.exporters.prometheus.exporter import PrometheusConfig
from meterline.exporters.prometheus.metrics import iteration_limit_reached
from tests.helpers import free_port, make_event, pipeline, running
from tests.test_prometheus_exporter import exporter, samples, scrape, value


async def scraped(tmp_path, events, **config):
    """The samples a scrape shows after exporting `events`."""
    async with exporter(tmp_path, **config) as (prom, port, _):
        await prom.export(ExportBatch("b1", events))
        return samples((await scrape(port))[1])


def names(found):
    return {s.name for s in found}


async def test_tokens_and_cost_have_seed_004_names_with_the_model_name_label(tmp_path):
    events = [make_event(i, input_tokens=10, output_tokens=20, cost_usd=0.5) for i in range(3)]
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_input_tokens", model_name="gpt-4o-mini") == 30
    assert value(found, "llm_gateway_output_tokens", model_name="gpt-4o-mini") == 60
    assert value(found, "llm_gateway_request_cost", model_name="gpt-4o-mini") == 1.5
    assert value(found, "llm_gateway_tokens_prompt_total", model="gpt-4o-mini") == 30


async def test_latencies_are_milliseconds_histograms_of_the_same_observations(tmp_path):
    event = make_event(1, streaming=True, duration_ms=150.0, ttft_ms=30.0, itl_ms=20.0)
    found = await scraped(tmp_path, [event])
    assert value(found, "llm_gateway_request_processing_ms_sum") == 150.0
    assert value(found, "llm_gateway_request_processing_ms_bucket", le="80.0") == 0
    assert value(found, "llm_gateway_request_processing_ms_bucket", le="160.0") == 1
    assert value(found, "llm_gateway_first_token_latency_ms_bucket", le="20.0") == 0
    assert value(found, "llm_gateway_first_token_latency_ms_bucket", le="40.0") == 1
    assert value(found, "llm_gateway_inter_token_latency_ms_bucket", le="25.0") == 1
    assert value(found, "llm_gateway_inter_token_latency_ms_count") == 1


async def test_model_inference_failures_are_the_provider_errors_by_error_type(tmp_path):
    events = [make_event(1, status_code=500, error_type="server_error", upstream="openai"),
              make_event(2, status_code=401, error_type="authentication_error"),  # gateway's
              make_event(3)]
    found = await scraped(tmp_path, events)
    failures = {s.labels["error_type"]: s.value for s in found
                if s.name == "llm_gateway_request_model_inference_failure"}
    assert failures == {"server_error": 1}


async def test_each_policy_that_acted_is_counted(tmp_path):
    events = [make_event(1, policies=["rate_limit", "budget"]),
              make_event(2, policies=["load_balanced", "fallback"]),
              make_event(3, policies=["load_balanced"]), make_event(4)]
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_rate_limit_requests_total") == 1
    assert value(found, "llm_gateway_budget_requests_total") == 1
    assert value(found, "llm_gateway_load_balanced_requests_total") == 2
    assert value(found, "llm_gateway_fallback_requests_total") == 1


async def test_a_call_served_by_a_fallback_counts_as_a_fallback_request(tmp_path):
    found = await scraped(tmp_path, [make_event(1, fallback=True),
                                     make_event(2, fallback=True, policies=["fallback"])])
    assert value(found, "llm_gateway_fallback_requests_total") == 2


async def test_guardrails_are_counted_per_rule_that_fired_by_rule_and_action(tmp_path):
    pii = Guardrail(rule="no-pii", stage="input", action="redact", detector="email")
    topic = Guardrail(rule="no-politics", stage="output", action="block")
    events = [make_event(1, guardrails=[pii, topic], policies=["guardrails"]),
              make_event(2, guardrails=[pii]), make_event(3, policies=["guardrails"])]
    found = await scraped(tmp_path, events)
    counts = {(s.labels["rule"], s.labels["action"]): s.value for s in found
              if s.name == "llm_gateway_guardrails_requests_total"}
    assert counts == {("no-pii", "redact"): 2, ("no-politics", "block"): 1, ("", ""): 1}


AGENT = {"provider": None, "request_model": None, "input_tokens": None,
         "output_tokens": None, "agent_name": "support-bot"}


async def test_agent_runs_their_llm_calls_and_mcp_connects_have_their_latencies(tmp_path):
    events = [make_event(1, operation="invoke_agent", duration_ms=4000.0, **AGENT),
              make_event(2, agent_name="support-bot", duration_ms=900.0),
              make_event(3, duration_ms=100.0),  # not an agent's call
              make_event(4, operation="initialize", mcp_method="initialize", duration_ms=30.0,
                         **{**AGENT, "agent_name": None})]
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_agent_request_duration_ms_sum") == 4000.0
    assert value(found, "llm_gateway_agent_llm_latency_ms_sum") == 900.0
    assert value(found, "llm_gateway_agent_llm_latency_ms_count") == 1
    assert value(found, "llm_gateway_agent_mcp_connect_latency_ms_sum") == 30.0


async def test_tool_calls_and_their_latency_are_counted_by_tool(tmp_path):
    events = [make_event(i, operation="execute_tool", tool_name=tool, duration_ms=ms, **AGENT)
              for i, (tool, ms) in enumerate([("search", 200.0), ("search", 400.0),
                                              ("get_weather", 50.0)])]
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_agent_tool_calls_total", tool_name="search") == 2
    assert value(found, "llm_gateway_agent_tool_calls_total", tool_name="get_weather") == 1
    assert value(found, "llm_gateway_agent_tool_latency_ms_sum",
                 tool_name="search") == pytest.approx(600.0)


async def test_tool_names_beyond_max_series_count_under_other(tmp_path):
    events = [make_event(i, operation="execute_tool", tool_name=f"tool-{i}", **AGENT)
              for i in range(5)]
    found = await scraped(tmp_path, events, max_series=3)
    tools = {s.labels["tool_name"]: s.value for s in found
             if s.name == "llm_gateway_agent_tool_calls_total"}
    assert tools == {"tool-0": 1, "tool-1": 1, "tool-2": 1, "__other__": 2}


async def test_agent_runs_stopped_at_their_iteration_limit_are_counted(tmp_path):
    events = [make_event(1, operation="invoke_agent", error_type="max_iterations_exceeded",
                         **AGENT),
              make_event(2, operation="invoke_agent", error_type="timeout", **AGENT),
              make_event(3, operation="chat", error_type="MaxTurnsExceeded")]  # not an agent
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_agent_request_iteration_limit_reached_total") == 1


@pytest.mark.parametrize("error_type, reached", [
    ("iteration_limit_reached", True), ("IterationLimitError", True),
    ("max_iterations", True), ("MaxTurnsExceeded", True), ("max-turns", True),
    ("GraphRecursionError", False), ("timeout", False), (None, False),
])
def test_the_iteration_limit_is_told_by_the_error_type_of_an_agent_run(error_type, reached):
    event = make_event(1, operation="invoke_agent", error_type=error_type)
    assert iteration_limit_reached(event) is reached


@pytest.mark.parametrize("method", ["heuristic", "semantic", "classifier"])
async def test_a_semantic_routers_layers_are_routing_methods_of_their_own(tmp_path, method):
    event = make_event(1, attributes={"meterline.routing_method": method})
    found = await scraped(tmp_path, [event])
    assert value(found, "llm_gateway_routing_decisions_total", method=method) == 1


async def test_rate_limit_utilization_is_the_latest_reported_per_provider_and_key(tmp_path):
    def event(i, at, remaining, **fields):
        return make_event(i, timestamp=at, api_key_id="k1", api_key_name="ci",
                          ratelimit_requests_limit=1000, ratelimit_requests_remaining=remaining,
                          ratelimit_tokens_limit=100_000, ratelimit_tokens_remaining=25_000,
                          **fields)
    now = 1_700_000_000_000_000_000
    events = [event(1, now + 2, 100), event(2, now + 1, 900),  # older, reported later
              event(3, now, 500, provider="anthropic")]
    found = await scraped(tmp_path, events)
    utilization = {(s.labels["provider"], s.labels["limit"]): s.value for s in found
                   if s.name == "llm_gateway_rate_limit_utilization_ratio"}
    assert utilization == {("openai", "requests"): 0.9, ("openai", "tokens"): 0.75,
                           ("anthropic", "requests"): 0.5, ("anthropic", "tokens"): 0.75}
    assert value(found, "llm_gateway_rate_limit_utilization_ratio", provider="openai",
                 limit="requests", api_key_id="k1", api_key_name="ci") == 0.9


async def test_rate_limit_utilization_expires_like_other_series(tmp_path):
    async with exporter(tmp_path, metric_expiration="100ms") as (prom, port, _):
        now = [1000.0]
        prom.clock = lambda: now[0]
        await prom.export(ExportBatch("b1", [make_event(
            1, ratelimit_requests_limit=10, ratelimit_requests_remaining=5)]))
        before = samples((await scrape(port))[1])
        now[0] += 0.2
        after = samples((await scrape(port))[1])
    assert "llm_gateway_rate_limit_utilization_ratio" in names(before)
    assert "llm_gateway_rate_limit_utilization_ratio" not in names(after)


SEED_001 = {"llm_gateway_requests_total", "llm_gateway_tokens_prompt_total",
            "llm_gateway_request_duration_seconds_count"}
SEED_004 = {"llm_gateway_input_tokens", "llm_gateway_request_processing_ms_count",
            "llm_gateway_load_balanced_requests_total", "llm_gateway_config_parsing_failures"}


@pytest.mark.parametrize("families, shown, hidden", [
    (None, SEED_001 | SEED_004, set()),
    (["standard"], SEED_001, SEED_004),
    (["truefoundry"], SEED_004, SEED_001),
])
async def test_families_chooses_which_names_are_exposed(tmp_path, families, shown, hidden):
    config = {} if families is None else {"families": families}
    event = make_event(1, policies=["load_balanced"], ratelimit_tokens_limit=10,
                       ratelimit_tokens_remaining=1)
    found = names(await scraped(tmp_path, [event], **config))
    assert shown <= found and not hidden & found
    assert "llm_gateway_rate_limit_utilization_ratio" in found  # in both sets


@pytest.mark.parametrize("families, message", [
    ([], "at least one of standard, truefoundry"),
    (["standard", "standard"], "families listed twice"),
    (["seed001"], "Invalid enum value 'seed001'"),
])
def test_bad_families_are_refused_with_the_reason(families, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        convert({"families": families}, PrometheusConfig)


async def test_configured_user_and_organization_have_seed_004_names_in_its_families(tmp_path):
    event = make_event(1, user_id="u-7", organization="acme")
    found = await scraped(tmp_path, [event], labels=["model", "user", "organization"])
    assert value(found, "llm_gateway_input_tokens", model_name="gpt-4o-mini",
                 username="u-7", tenant_name="acme") == event.input_tokens
    assert value(found, "llm_gateway_tokens_prompt_total", model="gpt-4o-mini", user="u-7",
                 organization="acme") == event.input_tokens




async def test_reloads_refused_for_an_invalid_config_count_as_config_parsing_failures(
        tmp_path):
    port = free_port()
    body = pipeline({"webhook": {"listen": f"127.0.0.1:{free_port()}"}},
                    exporters={"prometheus": {"listen": f"127.0.0.1:{port}"}})
    async with running(body, tmp_path) as service:
        before = samples((await scrape(port))[1])
        path = tmp_path / "pipeline.yaml"
        valid = path.read_text()
        path.write_text(valid.replace("pipelines:", "pipelines: [oops"))
        assert not await service.reload(str(path))
        path.write_text(valid.replace("receivers: [webhook]", "receivers: [nowhere]"))
        assert not await service.reload(str(path))
        after = samples((await scrape(port))[1])
    assert value(before, "llm_gateway_config_parsing_failures") == 0
    assert value(after, "llm_gateway_config_parsing_failures") == 2


async def test_an_mcp_request_of_a_session_without_a_method_is_no_llm_call_of_its_agent(tmp_path):
    # (the gateway's GET stream of an MCP session, in an agent's trace)
    events = [make_event(1, agent_name="support-bot", duration_ms=900.0),
              make_event(2, mcp_session_id="m1", duration_ms=5000.0, **AGENT)]
    found = await scraped(tmp_path, events)
    assert value(found, "llm_gateway_agent_llm_latency_ms_sum") == 900.0
    assert value(found, "llm_gateway_agent_llm_latency_ms_count") == 1
