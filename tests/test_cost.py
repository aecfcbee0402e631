"""The cost processor: prices from the bundled table, overrides and LiteLLM files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from meterline import config as config_mod
from meterline.cli import main
from meterline.config import convert
from meterline.event import Event
from meterline.genai import INFERENCE_GEO, SPEED, provider_name
from meterline.processors.cost import CostConfig, CostProcessor
from meterline.processors.cost.prices import bundled
from tests.helpers import FIXTURES, make_context, make_event, metric_value

LITELLM_FILE = str(FIXTURES / "litellm-prices.json")


def processor(tmp_path: Path, **config: Any) -> CostProcessor:
    return CostProcessor(convert(config, CostConfig), make_context(tmp_path, "cost"))


def with_registry(tmp_path: Path, **config: Any) -> tuple[CostProcessor, CollectorRegistry]:
    context = make_context(tmp_path, "cost")
    return CostProcessor(convert(config, CostConfig), context), context.telemetry.registry


def priced(tmp_path: Path, config: dict[str, Any] | None = None, **fields: Any) -> Event:
    return processor(tmp_path, **(config or {})).process([make_event(**fields)])[0]


# Real calls, priced by hand from the providers' published prices (USD per 1M tokens).
# input_tokens includes cache reads and writes; output_tokens includes reasoning tokens.
REAL_CALLS = [
    pytest.param(  # gpt-4o: $2.50 in, $1.25 cached, $10 out
        dict(provider="openai", request_model="gpt-4o", response_model="gpt-4o-2024-08-06",
             input_tokens=1000, cache_read_tokens=600, output_tokens=200),
        (400 * 2.50 + 600 * 1.25) / 1e6, 200 * 10.0 / 1e6, "openai/gpt-4o@bundled",
        id="openai-gpt-4o-cached"),
    pytest.param(  # Claude Sonnet 4.5: $3 in, $0.30 cache read, $3.75 cache write, $15 out
        dict(provider="anthropic", request_model="claude-sonnet-4-5-20250929",
             input_tokens=12000, cache_read_tokens=10000, cache_creation_tokens=1500,
             output_tokens=800),
        (500 * 3 + 10000 * 0.30 + 1500 * 3.75) / 1e6, 800 * 15 / 1e6,
        "anthropic/claude-sonnet-4-5@bundled", id="anthropic-sonnet-cache-read-and-write"),
    pytest.param(  # Claude Sonnet 4.5 writing for an hour: $6 (5 minutes: $3.75)
        dict(provider="anthropic", request_model="claude-sonnet-4-5-20250929",
             input_tokens=12000, cache_creation_tokens=10000, cache_creation_1h_tokens=8000,
             output_tokens=800),
        (2000 * 3 + 2000 * 3.75 + 8000 * 6) / 1e6, 800 * 15 / 1e6,
        "anthropic/claude-sonnet-4-5@bundled", id="anthropic-sonnet-one-hour-cache-write"),
    pytest.param(  # GPT-5 on the flex tier: $0.625 in, $0.0625 cached, $5 out (half price)
        dict(provider="openai", request_model="gpt-5", response_model="gpt-5-2025-08-07",
             service_tier="flex", input_tokens=1000, cache_read_tokens=600, output_tokens=200),
        (400 * 0.625 + 600 * 0.0625) / 1e6, 200 * 5.0 / 1e6, "openai/gpt-5@bundled;flex",
        id="openai-gpt-5-flex"),
    pytest.param(  # GPT-5.4 sent to OpenAI's EU host: 10% more ($2.50 in, $15 out)
        dict(provider="openai", request_model="gpt-5.4", input_tokens=1000, output_tokens=200,
             attributes={"server.address": "eu.api.openai.com"}),
        1000 * 2.5 * 1.1 / 1e6, 200 * 15 * 1.1 / 1e6, "openai/gpt-5.4@bundled;eu",
        id="openai-gpt-5.4-eu-data-residency"),
    pytest.param(  # Claude Opus 4.6 run in the US only: 10% more on every token ($5, $25)
        dict(provider="anthropic", request_model="claude-opus-4-6", input_tokens=1000,
             cache_read_tokens=400, output_tokens=200,
             attributes={"anthropic.inference_geo": "us"}),
        (600 * 5 + 400 * 0.5) * 1.1 / 1e6, 200 * 25 * 1.1 / 1e6,
        "anthropic/claude-opus-4-6@bundled;us", id="anthropic-opus-4.6-us-only-inference"),
    pytest.param(  # the same call run anywhere: the standard price
        dict(provider="anthropic", request_model="claude-opus-4-6", input_tokens=1000,
             cache_read_tokens=400, output_tokens=200,
             attributes={"anthropic.inference_geo": "global"}),
        (600 * 5 + 400 * 0.5) / 1e6, 200 * 25 / 1e6, "anthropic/claude-opus-4-6@bundled",
        id="anthropic-opus-4.6-global-inference"),
    pytest.param(  # Claude Opus 5 in fast mode, in the US: twice the price, and 10% more
        dict(provider="anthropic", request_model="claude-opus-5", input_tokens=1000,
             output_tokens=200,
             attributes={"anthropic.speed": "fast", "anthropic.inference_geo": "us"}),
        1000 * 5 * 2 * 1.1 / 1e6, 200 * 25 * 2 * 1.1 / 1e6,
        "anthropic/claude-opus-5@bundled;us;fast", id="anthropic-opus-5-fast-mode-us"),
    pytest.param(  # Claude Opus 4.7 in fast mode: $30 in, $150 out (six times)
        dict(provider="anthropic", request_model="claude-opus-4-7", input_tokens=1000,
             output_tokens=200, attributes={"anthropic.speed": "fast"}),
        1000 * 30 / 1e6, 200 * 150 / 1e6, "anthropic/claude-opus-4-7@bundled;fast",
        id="anthropic-opus-4.7-fast-mode"),
    pytest.param(  # the same call at the standard speed: the standard price
        dict(provider="anthropic", request_model="claude-opus-5", input_tokens=1000,
             output_tokens=200, attributes={"anthropic.speed": "standard"}),
        1000 * 5 / 1e6, 200 * 25 / 1e6, "anthropic/claude-opus-5@bundled",
        id="anthropic-opus-5-standard-speed"),
    pytest.param(  # o3: $2 in, $8 out; its 4,000 reasoning tokens are output tokens
        dict(provider="openai", request_model="o3", input_tokens=2000, output_tokens=5000,
             reasoning_tokens=4000),
        2000 * 2 / 1e6, 5000 * 8 / 1e6, "openai/o3@bundled", id="openai-o3-reasoning"),
    pytest.param(  # Gemini 2.5 Pro above 200k prompt tokens: $2.50 in, $15 out
        dict(provider="gcp.gemini", request_model="gemini-2.5-pro", input_tokens=250_000,
             output_tokens=1000, reasoning_tokens=600),
        250_000 * 2.50 / 1e6, 1000 * 15 / 1e6, "gcp.gemini/gemini-2.5-pro@bundled;above_200000",
        id="gemini-2.5-pro-long-context-tier"),
    pytest.param(  # Claude Haiku 4.5 on Bedrock (us. inference profile id): $1 in, $5 out
        dict(provider="aws.bedrock",
             request_model="us.anthropic.claude-haiku-4-5-20251001-v1:0",
             input_tokens=3000, output_tokens=400),
        3000 * 1 / 1e6, 400 * 5 / 1e6, "aws.bedrock/claude-haiku-4-5@bundled",
        id="bedrock-claude-haiku"),
    pytest.param(  # DeepSeek chat: $0.28 cache miss, $0.028 cache hit, $0.42 out
        dict(provider="deepseek", request_model="deepseek-chat", input_tokens=10_000,
             cache_read_tokens=8000, output_tokens=1000),
        (2000 * 0.28 + 8000 * 0.028) / 1e6, 1000 * 0.42 / 1e6, "deepseek/deepseek-chat@bundled",
        id="deepseek-cache-hit"),
    pytest.param(  # OpenAI Batch API: half of gpt-4.1-mini's $0.40 in, $1.60 out
        dict(provider="openai", request_model="gpt-4.1-mini", endpoint="/v1/batches",
             input_tokens=1000, output_tokens=1000),
        1000 * 0.40 / 2 / 1e6, 1000 * 1.60 / 2 / 1e6, "openai/gpt-4.1-mini@bundled;batch",
        id="openai-batch-api"),
    pytest.param(  # gpt-4o-audio-preview: text $2.50 in, $10 out; audio $40 in, $80 out
        dict(provider="openai", request_model="gpt-4o-audio-preview",
             response_model="gpt-4o-audio-preview-2024-12-17", input_tokens=1200,
             audio_input_tokens=1000, output_tokens=900, audio_output_tokens=750),
        (200 * 2.50 + 1000 * 40) / 1e6, (150 * 10 + 750 * 80) / 1e6,
        "openai/gpt-4o-audio-preview@bundled", id="openai-gpt-4o-audio-preview-audio-tokens"),
    pytest.param(  # Gemini 2.5 Flash: text $0.30 in, audio $1 in, $2.50 out
        dict(provider="gcp.gemini", request_model="gemini-2.5-flash", input_tokens=5000,
             audio_input_tokens=4000, output_tokens=100),
        (1000 * 0.30 + 4000 * 1) / 1e6, 100 * 2.50 / 1e6, "gcp.gemini/gemini-2.5-flash@bundled",
        id="gemini-2.5-flash-audio-input"),
    pytest.param(  # Azure OpenAI global deployment: gpt-4o at $2.50 / $10
        dict(provider="azure.ai.openai", request_model="prod-4o",
             response_model="gpt-4o-2024-11-20", input_tokens=800, output_tokens=100),
        800 * 2.50 / 1e6, 100 * 10 / 1e6, "azure.ai.openai/gpt-4o@bundled", id="azure-gpt-4o"),
]


@pytest.mark.parametrize(("fields", "cost_in", "cost_out", "ref"), REAL_CALLS)
def test_cost_of_real_calls_matches_published_prices(
        tmp_path: Path, fields: dict[str, Any], cost_in: float, cost_out: float,
        ref: str) -> None:
    e = priced(tmp_path, **fields)
    assert e.cost_input_usd == pytest.approx(cost_in, rel=1e-12)
    assert e.cost_output_usd == pytest.approx(cost_out, rel=1e-12)
    assert e.cost_usd == pytest.approx(cost_in + cost_out, rel=1e-12)
    assert e.pricing_ref == ref


def test_audio_tokens_without_an_audio_rate_cost_the_text_rate(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o", input_tokens=1000, audio_input_tokens=800,
               output_tokens=100, audio_output_tokens=60)
    assert (e.cost_input_usd, e.cost_output_usd) == pytest.approx(
        (1000 * 2.50 / 1e6, 100 * 10 / 1e6))


def test_audio_tokens_the_cache_counts_too_are_billed_once_as_cached(tmp_path: Path) -> None:
    # gpt-realtime: 700 audio tokens among 1,000, 600 of them cached: of the 400 uncached,
    # none is text ($4), all audio ($32); the cached ones at $0.40, not at $32 again
    e = priced(tmp_path, request_model="gpt-realtime", input_tokens=1000,
               cache_read_tokens=600, audio_input_tokens=700, output_tokens=0)
    assert e.cost_input_usd == pytest.approx((400 * 32 + 600 * 0.40) / 1e6)


def test_embeddings_without_output_tokens_have_null_output_cost(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="text-embedding-3-small", operation="embeddings",
               input_tokens=5000, output_tokens=None)
    assert e.cost_input_usd == pytest.approx(5000 * 0.02 / 1e6)
    assert e.cost_output_usd is None
    assert e.cost_usd == pytest.approx(5000 * 0.02 / 1e6)


def test_unpriced_model_leaves_cost_null_counts_it_by_model_and_logs_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, registry = with_registry(tmp_path)
    events = [make_event(i, request_model="home-grown-llm-7b") for i in range(3)]
    p.process(events)
    p.process([make_event(9, request_model="home-grown-llm-7b")])
    assert all(e.cost_usd is None and e.cost_input_usd is None and e.pricing_ref is None
               for e in events)
    assert metric_value(registry, "meterline_cost_unpriced_events_total",
                        model="home-grown-llm-7b") == 4
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("no price for this model") == 1


def test_an_email_in_an_unpriced_model_name_is_masked_in_its_label_and_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cost processor runs before `redact`: the model name the client sent is not
    yet redacted when it becomes a self-metrics label and a log line."""
    p, registry = with_registry(tmp_path)
    p.process([make_event(request_model="ft:jane.doe@acme-corp.com:v1")])
    assert metric_value(registry, "meterline_cost_unpriced_events_total",
                        model="ft:<EMAIL>:v1") == 1
    samples = [s for f in registry.collect() for s in f.samples]
    assert not any("jane.doe" in v for s in samples for v in s.labels.values())
    logged = capsys.readouterr()
    assert "no price for this model" in logged.out + logged.err
    assert "jane.doe" not in logged.out + logged.err


def test_reported_actual_cost_is_left_as_the_source_sent_it(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o", input_tokens=1000, output_tokens=0,
               actual_cost_usd=0.5)
    assert e.actual_cost_usd == 0.5
    assert e.cost_usd == pytest.approx(1000 * 2.5 / 1e6)


def test_event_without_token_usage_is_not_priced_nor_counted(tmp_path: Path) -> None:
    p, registry = with_registry(tmp_path)
    e = p.process([make_event(request_model="nope", input_tokens=None, output_tokens=None)])[0]
    assert e.cost_usd is None
    assert metric_value(registry, "meterline_cost_unpriced_events_total") == 0


def test_a_cache_hit_is_billed_nothing_and_saves_the_price_of_its_tokens(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o", input_tokens=1000, output_tokens=200,
               cache_hit=True)
    assert (e.cost_input_usd, e.cost_output_usd, e.cost_usd) == (0.0, 0.0, 0.0)
    assert e.saved_cost_usd == pytest.approx((1000 * 2.5 + 200 * 10.0) / 1e6)
    assert e.pricing_ref == "openai/gpt-4o@bundled;cache_hit"


def test_a_cache_hit_keeps_the_saved_cost_its_source_reported(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o", input_tokens=1000, output_tokens=200,
               cache_hit=True, saved_cost_usd=4.8e-06, actual_cost_usd=0.0)
    assert (e.cost_usd, e.saved_cost_usd, e.actual_cost_usd) == (0.0, 4.8e-06, 0.0)


def test_a_cache_hit_of_an_unpriced_model_costs_0_saves_an_unknown_and_is_not_unpriced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, registry = with_registry(tmp_path)
    e = p.process([make_event(request_model="home-grown-llm-7b", cache_hit=True)])[0]
    assert (e.cost_usd, e.saved_cost_usd, e.pricing_ref) == (0.0, None, None)
    assert metric_value(registry, "meterline_cost_unpriced_events_total") == 0
    logged = capsys.readouterr()
    assert "no price for this model" not in logged.out + logged.err  # its cost is 0


@pytest.mark.parametrize(("provider", "model", "entry"), [
    ("openai", "gpt-4o-2024-08-06", "openai/gpt-4o"),
    ("openai", "gpt-4o-2024-05-13", "openai/gpt-4o-2024-05-13"),  # a snapshot priced apart
    ("openai", "openai/gpt-4o", "openai/gpt-4o"),
    ("openai", "gpt-4-0613", "openai/gpt-4"),
    ("aws.bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic/claude-3-5-sonnet"),
    ("aws.bedrock", "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
     "aws.bedrock/claude-sonnet-4-5"),
    ("aws.bedrock", "amazon.nova-pro-v1:0", "aws.bedrock/nova-pro"),
    ("gcp.vertex_ai", "claude-sonnet-4-5@20250929", "anthropic/claude-sonnet-4-5"),
    ("gcp.gemini", "models/gemini-2.5-flash", "gcp.gemini/gemini-2.5-flash"),
    ("gcp.gemini", "gemini-2.0-flash-001", "gcp.gemini/gemini-2.0-flash"),
    ("mistral_ai", "mistral-large-latest", "mistral_ai/mistral-large"),
    ("mistral_ai", "mistral-large-2411", "mistral_ai/mistral-large-2411"),
    ("groq", "openai/gpt-oss-120b", "groq/gpt-oss-120b"),
    ("x_ai", "grok-4-0709", "x_ai/grok-4"),
    ("cohere", "command-r-plus-08-2024", "cohere/command-r-plus-08-2024"),
    (None, "claude-haiku-4-5", "anthropic/claude-haiku-4-5"),
])
def test_model_names_normalize_to_their_entry(
        tmp_path: Path, provider: str | None, model: str, entry: str) -> None:
    found = CostConfig().table().resolve(provider, model)
    assert found.price is not None and found.price.key == entry


def test_response_model_is_priced_before_the_requested_one(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="openai", request_model="gpt-4o",
               response_model="gpt-4o-mini-2024-07-18", input_tokens=1000, output_tokens=0)
    assert e.pricing_ref == "openai/gpt-4o-mini@bundled"


def test_alias_maps_an_azure_deployment_name_to_its_model(tmp_path: Path) -> None:
    e = priced(tmp_path, {"aliases": {"Prod-Chat": "gpt-4.1"}}, provider="azure.ai.openai",
               request_model="prod-chat", input_tokens=1000, output_tokens=1000)
    assert e.pricing_ref == "azure.ai.openai/gpt-4.1@bundled"
    assert e.cost_usd == pytest.approx((1000 * 2 + 1000 * 8) / 1e6)


def test_config_prices_override_the_bundled_table(tmp_path: Path) -> None:
    config = {"prices": {"gpt-4o": {"input": 2.0, "output": 8.0},
                         "self-hosted/llama-3-70b": {"input": 0.1, "output": 0.1}}}
    e = priced(tmp_path, config, request_model="gpt-4o-2024-08-06", input_tokens=1000,
               cache_read_tokens=500, output_tokens=100)
    # no cache rate given: cached tokens cost the (negotiated) input rate
    assert e.cost_input_usd == pytest.approx(1000 * 2.0 / 1e6)
    assert e.cost_output_usd == pytest.approx(100 * 8.0 / 1e6)
    assert e.pricing_ref == "gpt-4o@config"
    own = priced(tmp_path, config, provider="self-hosted", request_model="llama-3-70b",
                 input_tokens=10_000, output_tokens=1000)
    assert own.cost_usd == pytest.approx(11_000 * 0.1 / 1e6)


SELF_HOSTED = {"prices": {"vllm/*": {"input": 0.2, "output": 0.4},
                          "vllm/llama-3.3-70b": {"input": 1.0, "output": 1.0}}}


def test_a_provider_wide_entry_prices_that_providers_models_no_entry_names(
        tmp_path: Path) -> None:
    e = priced(tmp_path, SELF_HOSTED, provider="vllm", request_model="qwen3-32b",
               input_tokens=10_000, output_tokens=1000)
    assert e.pricing_ref == "vllm/*@config"
    assert e.cost_usd == pytest.approx((10_000 * 0.2 + 1000 * 0.4) / 1e6)


def test_an_entry_naming_the_model_wins_over_the_provider_wide_one(tmp_path: Path) -> None:
    e = priced(tmp_path, SELF_HOSTED, provider="vllm",
               request_model="llama-3.3-70b-2025-01-01", input_tokens=1000, output_tokens=0)
    assert e.pricing_ref == "vllm/llama-3.3-70b@config"  # (its snapshot date dropped)


def test_a_lower_layers_named_entry_wins_over_a_higher_layers_provider_wide_one(
        tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("as_of: '2026-12-01'\nmodels:\n  vllm/qwen3-32b: {input: 0.5, output: 0.5, "
                    "source: 'https://wiki.example/gpu-chargeback'}\n")
    table = convert({"price_files": [str(path)], **SELF_HOSTED}, CostConfig).table()
    assert table.resolve("vllm", "qwen3-32b").price.ref == "vllm/qwen3-32b@fleet.yaml"


def test_a_provider_wide_entry_wins_over_the_makers_price(tmp_path: Path) -> None:
    # gpt-4o served by a vLLM server is not billed at OpenAI's rates, as by an unknown host
    assert priced(tmp_path, SELF_HOSTED, provider="vllm",
                  request_model="gpt-4o").pricing_ref == "vllm/*@config"
    assert priced(tmp_path, SELF_HOSTED, provider="acme",
                  request_model="gpt-4o").pricing_ref == "openai/gpt-4o@bundled"


@pytest.mark.parametrize("provider", ["ollama", "hosted_vllm"])
def test_self_hosted_calls_cost_nothing_rather_than_staying_unpriced(
        tmp_path: Path, provider: str) -> None:
    e = priced(tmp_path, provider=provider_name(provider), request_model="llama3.1:8b",
               input_tokens=1000, output_tokens=100)
    assert e.cost_usd == 0.0 and e.pricing_ref is not None
    assert e.pricing_ref.endswith("/*@bundled")


def test_a_star_entry_without_its_provider_is_a_config_error() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"provider/\*"):
        convert({"prices": {"*": {"input": 1, "output": 1}}}, CostConfig)


def test_litellm_price_file_extends_the_table(tmp_path: Path) -> None:
    p = processor(tmp_path, price_files=[LITELLM_FILE])
    events = p.process([
        make_event(0, request_model="acme-chat-1", input_tokens=1000, cache_read_tokens=400,
                   cache_creation_tokens=100, output_tokens=100),
        make_event(1, provider="gcp.gemini", request_model="gemini/acme-long-1",
                   input_tokens=300_000, output_tokens=1000, reasoning_tokens=400),
        make_event(2, provider="aws.bedrock", request_model="us.acme.chat-2-v1:0",
                   input_tokens=1000, output_tokens=1000),
        make_event(3, request_model="acme-chat-1", endpoint="/v1/batches",
                   input_tokens=1000, output_tokens=1000),
    ])
    chat, long_, bedrock, batch = events
    assert chat.cost_input_usd == pytest.approx((500 * 1 + 400 * 0.1 + 100 * 1.25) / 1e6)
    assert chat.cost_output_usd == pytest.approx(100 * 4 / 1e6)
    assert chat.pricing_ref == "openai/acme-chat-1@litellm-prices.json"
    # above 200k: tier rates; the reasoning rate scales with the tier's output rate
    assert long_.cost_input_usd == pytest.approx(300_000 * 4 / 1e6)
    assert long_.cost_output_usd == pytest.approx((600 * 15 + 400 * 12 * 15 / 10) / 1e6)
    assert bedrock.cost_usd == pytest.approx((1000 * 3 + 1000 * 6) / 1e6)
    assert batch.cost_usd == pytest.approx((1000 * 1 + 1000 * 4) / 2 / 1e6)


def priced_by_litellm(tmp_path: Path, costs: dict[str, float], **fields: Any) -> Event:
    """An event of OpenAI's chat model `acme-1`, priced by a LiteLLM file giving it `costs`."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"acme-1": {"litellm_provider": "openai", "mode": "chat",
                                             **costs}}))
    return priced(tmp_path, {"price_files": [str(prices)]}, request_model="acme-1", **fields)


def test_litellm_output_batch_price_is_read_apart_from_the_input_one(tmp_path: Path) -> None:
    e = priced_by_litellm(
        tmp_path, {"input_cost_per_token": 1e-06, "input_cost_per_token_batches": 5e-07,
                   "output_cost_per_token": 4e-06, "output_cost_per_token_batches": 3e-06},
        endpoint="/v1/batches", input_tokens=1000, output_tokens=1000)
    assert e.cost_input_usd == pytest.approx(1000 * 0.5 / 1e6)
    assert e.cost_output_usd == pytest.approx(1000 * 3 / 1e6)
    assert e.pricing_ref.endswith(";batch")


def test_litellm_audio_token_rates_are_read(tmp_path: Path) -> None:
    e = priced_by_litellm(
        tmp_path, {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06,
                   "input_cost_per_audio_token": 3e-05, "output_cost_per_audio_token": 6e-05},
        input_tokens=1000, audio_input_tokens=400, output_tokens=500, audio_output_tokens=300)
    assert e.cost_input_usd == pytest.approx((600 * 2 + 400 * 30) / 1e6)
    assert e.cost_output_usd == pytest.approx((200 * 8 + 300 * 60) / 1e6)


TIERED = {"acme": {"input": 2.0, "output": 8.0, "cache_read": 0.5, "cache_write": 2.5,
                   "cache_write_1h": 4.0,
                   "service_tiers": {"flex": {"input": 1.0, "output": 4.0},
                                     "priority": {"input": 3.5, "output": 14.0,
                                                  "cache_read": 0.875}}}}


def test_a_call_the_flex_tier_served_is_billed_at_its_rates(tmp_path: Path) -> None:
    e = priced(tmp_path, {"prices": TIERED}, request_model="acme", service_tier="flex",
               input_tokens=1000, cache_read_tokens=400, output_tokens=100)
    # (a rate the tier does not give, its cache reads here, is the entry's)
    assert e.cost_input_usd == pytest.approx((600 * 1.0 + 400 * 0.5) / 1e6)
    assert e.cost_output_usd == pytest.approx(100 * 4.0 / 1e6)
    assert e.pricing_ref == "acme@config;flex"


@pytest.mark.parametrize("served", ["priority", "fast", "PRIORITY", "ON_DEMAND_PRIORITY"])
def test_a_call_the_priority_tier_served_is_billed_at_its_rates(tmp_path: Path,
                                                                served: str) -> None:
    e = priced(tmp_path, {"prices": TIERED}, request_model="acme", service_tier=served,
               input_tokens=1000, cache_read_tokens=400, output_tokens=100)
    assert e.cost_input_usd == pytest.approx((600 * 3.5 + 400 * 0.875) / 1e6)
    assert e.pricing_ref == "acme@config;priority"


@pytest.mark.parametrize("served", ["default", "standard", "auto", "scale", "ON_DEMAND",
                                    "unheard-of"])
def test_a_call_a_tier_without_prices_of_its_own_served_is_billed_at_the_standard_rates(
        tmp_path: Path, served: str) -> None:
    e = priced(tmp_path, {"prices": TIERED}, request_model="acme", service_tier=served,
               input_tokens=1000, output_tokens=100)
    assert (e.cost_input_usd, e.pricing_ref) == (pytest.approx(1000 * 2.0 / 1e6), "acme@config")


def test_cache_writes_kept_for_an_hour_are_billed_at_the_one_hour_rate(tmp_path: Path) -> None:
    e = priced(tmp_path, {"prices": TIERED}, request_model="acme", input_tokens=10_000,
               cache_creation_tokens=3000, cache_creation_1h_tokens=2000, output_tokens=10)
    assert e.cost_input_usd == pytest.approx((7000 * 2.0 + 1000 * 2.5 + 2000 * 4.0) / 1e6)


def test_one_hour_writes_without_a_rate_of_their_own_cost_what_other_writes_cost(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="acme", input_tokens=10_000, cache_creation_tokens=3000,
               cache_creation_1h_tokens=3000, output_tokens=10,
               config={"prices": {"acme": {"input": 2.0, "output": 8.0, "cache_write": 2.5}}})
    assert e.cost_input_usd == pytest.approx((7000 * 2.0 + 3000 * 2.5) / 1e6)


def test_a_long_prompt_on_a_service_tier_takes_its_long_prompt_rates(tmp_path: Path) -> None:
    prices = {"acme": {"input": 2.0, "output": 8.0, "tiers": [
        {"above": 200_000, "input": 4.0, "output": 16.0}], "service_tiers": {
        "priority": {"input": 3.5, "output": 14.0,
                     "tiers": [{"above": 200_000, "input": 7.0}]}}}}
    e = priced(tmp_path, {"prices": prices}, request_model="acme", service_tier="priority",
               input_tokens=250_000, output_tokens=100)
    # the tier's own long-prompt input rate; no output one of its own: the entry's long one
    assert (e.cost_input_usd, e.cost_output_usd) == (
        pytest.approx(250_000 * 7.0 / 1e6), pytest.approx(100 * 16.0 / 1e6))
    assert e.pricing_ref == "acme@config;priority;above_200000"


REGIONAL = {"acme": {"input": 2.0, "output": 8.0, "data_residency": {"eu": 1.1, "us": 1.2},
                     "regional_endpoint": 1.05, "searches": 10.0}}


@pytest.mark.parametrize(("where", "ref"), [
    ({"upstream": "https://eu.api.openai.com/v1"}, "eu"),  # LiteLLM's api_base
    ({"attributes": {"server.address": "us.api.openai.com"}}, "us"),  # the gateway, OTLP
])
def test_a_call_processed_in_a_data_residency_region_costs_its_uplift_more(
        tmp_path: Path, where: dict[str, Any], ref: str) -> None:
    e = priced(tmp_path, {"prices": REGIONAL}, request_model="acme", input_tokens=1000,
               output_tokens=100, search_queries=1000, **where)
    uplift = REGIONAL["acme"]["data_residency"][ref]  # type: ignore[index]
    # the tokens' cost only: searches are billed as they are
    assert e.cost_input_usd == pytest.approx(1000 * 2.0 / 1e6 * uplift + 10.0)
    assert e.cost_output_usd == pytest.approx(100 * 8.0 / 1e6 * uplift)
    assert e.pricing_ref == f"acme@config;{ref}"


@pytest.mark.parametrize("where", [
    {"endpoint": "/v1/projects/p/locations/us-east5/publishers/google/models/acme:predict"},
    {"attributes": {"server.address": "europe-west1-aiplatform.googleapis.com"}},
])
def test_a_call_to_a_vertex_ai_regional_endpoint_costs_its_uplift_more(
        tmp_path: Path, where: dict[str, Any]) -> None:
    e = priced(tmp_path, {"prices": REGIONAL}, request_model="acme", input_tokens=1000,
               output_tokens=100, **where)
    assert e.cost_input_usd == pytest.approx(1000 * 2.0 / 1e6 * 1.05)
    assert e.pricing_ref == "acme@config;regional"


@pytest.mark.parametrize("where", [
    {"upstream": "https://api.openai.com/v1"},
    {"endpoint": "/v1/projects/p/locations/global/publishers/google/models/acme:predict"},
    {"attributes": {"server.address": "aiplatform.googleapis.com"}},
    {"upstream": "openai-eu"},  # a gateway upstream's name says nothing of its host
    {"upstream": "http://[::1", "attributes": {"server.address": 7}},  # (no URL, no host)
])
def test_a_call_processed_globally_costs_the_standard_price(
        tmp_path: Path, where: dict[str, Any]) -> None:
    e = priced(tmp_path, {"prices": REGIONAL}, request_model="acme", input_tokens=1000,
               output_tokens=100, **where)
    assert (e.cost_input_usd, e.pricing_ref) == (pytest.approx(1000 * 2.0 / 1e6), "acme@config")


def test_a_speed_multiple_of_0_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"speeds are multipliers of the token costs"):
        processor(tmp_path, prices={"acme": {"input": 1.0, "speeds": {"fast": 0}}})


def test_a_regional_uplift_of_0_is_refused(tmp_path: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match="multipliers of the token costs"):
        processor(tmp_path, prices={"acme": {"input": 1.0, "data_residency": {"eu": 0}}})


def test_a_negative_service_tier_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match="must be finite numbers, not negative"):
        processor(tmp_path, prices={"acme": {"input": 1.0, "service_tiers": {
            "flex": {"input": -1.0}}}})


@pytest.mark.parametrize("text", ["1e400", "1" + "0" * 400, "NaN", "-Infinity"])
def test_a_litellm_price_that_is_no_finite_number_is_refused_naming_the_entry(
        tmp_path: Path, text: str) -> None:
    prices = tmp_path / "model_prices_and_context_window.json"
    prices.write_text('{"acme-1": {"litellm_provider": "openai", "mode": "chat", '
                      f'"input_cost_per_token": {text}, "output_cost_per_token": 1e-06}}}}')
    with pytest.raises(ValueError, match=r"model_prices_and_context_window\.json: acme-1: "
                                         r"prices must be finite numbers, not negative"):
        processor(tmp_path, price_files=[str(prices)])


def test_a_price_file_nested_too_deeply_is_refused_naming_it(tmp_path: Path) -> None:
    prices = tmp_path / "model_prices_and_context_window.json"
    prices.write_text('{"acme-1": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ValueError, match=r"model_prices_and_context_window\.json is nested "
                                         "too deeply"):
        processor(tmp_path, price_files=[str(prices)])


@pytest.mark.parametrize("text", ["1e400", "1" + "0" * 400, "NaN"])
def test_a_litellm_regional_or_speed_multiple_that_is_no_finite_number_is_refused(
        tmp_path: Path, text: str) -> None:
    prices = tmp_path / "model_prices_and_context_window.json"
    for specific in (f'{{"us": {text}}}', f'{{"fast": {text}}}'):
        prices.write_text('{"acme-1": {"litellm_provider": "anthropic", "mode": "chat", '
                          '"input_cost_per_token": 1e-06, '
                          f'"provider_specific_entry": {specific}}}}}')
        with pytest.raises(ValueError, match=r"acme-1: (data_residency and regional_endpoint|"
                                             r"speeds) are multipliers"):
            processor(tmp_path, price_files=[str(prices)])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_configured_price_that_is_no_finite_number_is_refused(
        tmp_path: Path, value: float) -> None:
    with pytest.raises(ValueError, match="prices must be finite numbers, not negative"):
        processor(tmp_path, prices={"acme": {"input": value}})


def test_litellm_service_tier_and_one_hour_cache_rates_are_read(tmp_path: Path) -> None:
    rates = {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06,
             "cache_creation_input_token_cost": 2.5e-06,
             "cache_creation_input_token_cost_above_1hr": 4e-06,
             "input_cost_per_token_flex": 1e-06, "output_cost_per_token_flex": 4e-06,
             "input_cost_per_token_priority": 3.5e-06}
    flex = priced_by_litellm(tmp_path, rates, service_tier="flex", input_tokens=1000,
                             output_tokens=100)
    assert (flex.cost_input_usd, flex.cost_output_usd) == (
        pytest.approx(1000 * 1.0 / 1e6), pytest.approx(100 * 4.0 / 1e6))
    priority = priced_by_litellm(tmp_path, rates, service_tier="priority", input_tokens=1000,
                                 output_tokens=100)
    assert (priority.cost_input_usd, priority.cost_output_usd) == (
        pytest.approx(1000 * 3.5 / 1e6), pytest.approx(100 * 8.0 / 1e6))
    written = priced_by_litellm(tmp_path, rates, input_tokens=1000, cache_creation_tokens=600,
                                cache_creation_1h_tokens=200, output_tokens=1)
    assert written.cost_input_usd == pytest.approx((400 * 2 + 400 * 2.5 + 200 * 4) / 1e6)


def test_a_litellm_entry_out_of_range_is_refused_naming_it(tmp_path: Path) -> None:
    prices = tmp_path / "model_prices_and_context_window.json"
    prices.write_text(json.dumps({"acme-1": {
        "litellm_provider": "openai", "input_cost_per_token": 1e-06,
        "regional_processing_uplift_multiplier_eu": 0}}))
    with pytest.raises(ValueError, match=r"model_prices_and_context_window\.json: acme-1: "
                                         r"data_residency and regional_endpoint are multipliers"):
        processor(tmp_path, price_files=[str(prices)])


def test_litellm_price_file_overrides_the_bundled_entry(tmp_path: Path) -> None:
    e = priced(tmp_path, {"price_files": [LITELLM_FILE]}, request_model="gpt-4o",
               input_tokens=1000, output_tokens=1000)
    assert e.cost_usd == pytest.approx((1000 * 2 + 1000 * 8) / 1e6)
    assert e.pricing_ref == "openai/gpt-4o@litellm-prices.json"


def test_a_price_file_host_does_not_price_another_hosts_calls(tmp_path: Path) -> None:
    # the file prices gpt-oss-120b as served by Cerebras; Groq's call keeps Groq's price
    e = priced(tmp_path, {"price_files": [LITELLM_FILE]}, provider="groq",
               request_model="openai/gpt-oss-120b", input_tokens=1000, output_tokens=1000)
    assert e.pricing_ref == "groq/gpt-oss-120b@bundled"
    other = priced(tmp_path, {"price_files": [LITELLM_FILE]}, provider="together_ai",
                   request_model="gpt-oss-120b", input_tokens=1000, output_tokens=1000)
    assert other.cost_usd is None


def litellm_map(tmp_path: Path, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A cost config reading `entries` as a LiteLLM price map, and no bundled price."""
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(entries))
    return {"price_files": [str(path)], "bundled": False}


def test_a_litellm_entrys_prices_by_where_and_how_fast_anthropic_ran_a_call_are_read(
        tmp_path: Path) -> None:
    # LiteLLM keeps Anthropic's US-only inference uplift and its fast mode's multiple under
    # `provider_specific_entry`, beside settings that are no price (even numbers)
    config = litellm_map(tmp_path, {"claude-x": {
        "litellm_provider": "anthropic", "mode": "chat", "input_cost_per_token": 5e-06,
        "output_cost_per_token": 2.5e-05,
        "provider_specific_entry": {"us": 1.1, "fast": 2.0, "schema": "v2",
                                    "max_batch": 100}}})
    usage = {"provider": "anthropic", "request_model": "claude-x", "input_tokens": 1000,
             "output_tokens": 100}
    us = priced(tmp_path, config, attributes={INFERENCE_GEO: "us"}, **usage)
    assert us.cost_usd == pytest.approx((1000 * 5 + 100 * 25) / 1e6 * 1.1)
    assert us.pricing_ref == "anthropic/claude-x@model_prices_and_context_window.json;us"
    for place in ("global", "fast", "schema", "max_batch"):
        e = priced(tmp_path, config, attributes={INFERENCE_GEO: place}, **usage)
        assert e.cost_usd == pytest.approx((1000 * 5 + 100 * 25) / 1e6), place
    fast = priced(tmp_path, config, attributes={SPEED: "fast"}, **usage)
    assert fast.cost_usd == pytest.approx((1000 * 5 + 100 * 25) / 1e6 * 2)


def test_litellm_bedrock_mantle_prices_are_not_bedrock_ones(tmp_path: Path) -> None:
    # LiteLLM reports Bedrock's OpenAI-compatible endpoint as `bedrock_mantle`
    config = litellm_map(tmp_path, {
        "openai.gpt-oss-20b": {"litellm_provider": "bedrock_converse", "mode": "chat",
                               "input_cost_per_token": 7e-08, "output_cost_per_token": 3e-07},
        "bedrock_mantle/openai.gpt-oss-20b": {
            "litellm_provider": "bedrock_mantle", "mode": "chat",
            "input_cost_per_token": 7.5e-08, "output_cost_per_token": 3e-07}})
    usage = {"request_model": "openai.gpt-oss-20b", "input_tokens": 1000, "output_tokens": 0}
    bedrock = priced(tmp_path, config, provider=provider_name("bedrock"), **usage)
    mantle = priced(tmp_path, config, provider=provider_name("bedrock_mantle"), **usage)
    assert bedrock.cost_usd == pytest.approx(1000 * 0.07 / 1e6)
    assert mantle.cost_usd == pytest.approx(1000 * 0.075 / 1e6)


def test_litellm_key_naming_the_provider_wins_over_the_bare_model_key(tmp_path: Path) -> None:
    # as LiteLLM looks up `deepseek/deepseek-chat` first, wherever the keys stand in the map
    config = litellm_map(tmp_path, {
        "deepseek/deepseek-chat": {"litellm_provider": "deepseek", "mode": "chat",
                                   "input_cost_per_token": 2.8e-07},
        "deepseek-chat": {"litellm_provider": "deepseek", "mode": "chat",
                          "input_cost_per_token": 2.7e-07}})
    e = priced(tmp_path, config, provider="deepseek", request_model="deepseek-chat",
               input_tokens=1000)
    assert e.cost_usd == pytest.approx(1000 * 0.28 / 1e6)


def test_litellm_colliding_keys_are_not_merged(tmp_path: Path) -> None:
    # the kept entry prices no cache read: the other key's cache rate does not come along
    config = litellm_map(tmp_path, {
        "moonshotai.kimi-k2.5": {"litellm_provider": "bedrock_converse", "mode": "chat",
                                 "input_cost_per_token": 6e-07,
                                 "cache_read_input_token_cost": 1e-07},
        "bedrock/moonshotai.kimi-k2.5": {"litellm_provider": "bedrock", "mode": "chat",
                                         "input_cost_per_token": 6e-07}})
    e = priced(tmp_path, config, provider="aws.bedrock", request_model="moonshotai.kimi-k2.5",
               input_tokens=1000, cache_read_tokens=1000)
    assert e.cost_usd == pytest.approx(1000 * 0.6 / 1e6)


def test_litellm_tiered_pricing_bills_the_whole_call_at_its_prompts_range(
        tmp_path: Path) -> None:
    config = litellm_map(tmp_path, {"dashscope/qwen3-max": {
        "litellm_provider": "dashscope", "mode": "chat", "tiered_pricing": [
            {"input_cost_per_token": 1.2e-06, "output_cost_per_token": 6e-06,
             "range": [0, 32000.0]},
            {"input_cost_per_token": 2.4e-06, "output_cost_per_token": 1.2e-05,
             "range": [32000.0, 128000.0]}]}})
    p = processor(tmp_path, **config)
    usage = {"provider": "dashscope", "request_model": "qwen3-max", "output_tokens": 1000,
             "cache_read_tokens": 10_000}
    end, past = p.process([make_event(0, input_tokens=32_000, **usage),
                           make_event(1, input_tokens=32_001, **usage)])
    assert end.cost_usd == pytest.approx((32_000 * 1.2 + 1000 * 6) / 1e6)
    assert past.cost_usd == pytest.approx((32_001 * 2.4 + 1000 * 12) / 1e6)
    assert past.pricing_ref.endswith(";above_32000")


def test_without_the_bundled_table_only_given_prices_apply(tmp_path: Path) -> None:
    p = processor(tmp_path, bundled=False, price_files=[LITELLM_FILE])
    known, unknown = p.process([make_event(0, request_model="acme-chat-1"),
                                make_event(1, request_model="gpt-4o-mini")])
    assert known.cost_usd is not None
    assert unknown.cost_usd is None


def test_meterline_format_price_file_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "negotiated.yaml"
    path.write_text("as_of: '2026-11-01'\nsources: {contract: 'MSA 2026-114'}\n"
                    "models:\n  openai/gpt-4o: {input: 2.25, output: 9, source: contract}\n")
    found = convert({"price_files": [str(path)]}, CostConfig).table().resolve("openai", "gpt-4o")
    assert found.price is not None
    assert (found.price.rates.input, found.price.source, found.price.as_of) == (
        2.25, "MSA 2026-114", "2026-11-01")


def test_an_edited_price_file_makes_a_new_config_so_a_reload_rebuilds_cost(
        tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"m": {"input_cost_per_token": 1e-06, "litellm_provider": "openai"}}')
    before = convert({"price_files": [str(path)]}, CostConfig)
    assert convert({"price_files": [str(path)]}, CostConfig) == before
    path.write_text('{"m": {"input_cost_per_token": 2e-06, "litellm_provider": "openai"}}')
    after = convert({"price_files": [str(path)]}, CostConfig)
    assert after != before
    assert after.table().resolve("openai", "m").price.rates.input == 2.0  # type: ignore[union-attr]


def test_unreadable_price_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "prices.json"
    bad.write_text("{not json")
    text = f"""
receivers: {{webhook: {{}}}}
processors:
  cost: {{price_files: [{bad}]}}
exporters: {{debug: {{}}}}
service: {{pipelines: {{p: {{receivers: [webhook], processors: [cost], exporters: [debug]}}}}}}
"""
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.loads(text, "pipeline.yaml")
    message = str(e.value)
    assert "processors.cost.price_files" in message and str(bad) in message


def test_negative_price_is_refused(tmp_path: Path) -> None:
    with pytest.raises(msgspec.ValidationError, match="must be finite numbers, not negative"):
        convert({"prices": {"x": {"input": -1, "output": 1}}}, CostConfig)


def test_every_bundled_entry_names_its_source_and_date() -> None:
    spec, layer = bundled()
    prices = [*layer.by_provider.values(), *layer.any_provider.values(),
              *layer.provider_wide.values()]
    assert len(prices) == len(spec.models) > 100
    for price in prices:
        assert price.source.startswith("https://"), price.key
        assert price.as_of, price.key


def test_pricing_command_shows_the_entry_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pricing", "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                 "--provider", "bedrock", "--json"])
    out = msgspec.json.decode(capsys.readouterr().out)
    assert code == 0
    assert out["entry"] == "aws.bedrock/claude-sonnet-4-5"
    assert out["provider"] == "aws.bedrock"
    assert "dropped Bedrock inference profile 'us.'" in out["steps"]
    assert out["usd_per_million_tokens"]["cache_read"] == 0.3
    assert out["tiers"][0]["above"] == 200_000


def test_pricing_command_shows_the_service_tiers_rates(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled table alone
    assert main(["pricing", "gpt-5", "--provider", "openai"]) == 0
    out = capsys.readouterr().out
    assert "  served by the flex tier: input 0.625  output 5  cache read 0.0625" in out
    assert "  served by the priority tier: input 2.5  output 20  cache read 0.25" in out
    assert main(["pricing", "gpt-5", "--provider", "openai", "--json"]) == 0
    tiers = msgspec.json.decode(capsys.readouterr().out)["service_tiers"]
    assert (tiers["flex"]["input"], tiers["priority"]["output"]) == (0.625, 20.0)


def test_pricing_command_shows_what_multiplies_the_token_costs(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled table alone
    assert main(["pricing", "claude-opus-5", "--provider", "anthropic"]) == 0
    assert ("  token costs multiplied: processed in us x1.1, at a Vertex AI regional endpoint "
            "x1.1, run at fast speed x2\n") in capsys.readouterr().out
    assert main(["pricing", "claude-opus-5", "--provider", "anthropic", "--json"]) == 0
    shown = msgspec.json.decode(capsys.readouterr().out)
    assert (shown["data_residency"], shown["regional_endpoint"], shown["speeds"]) == (
        {"us": 1.1}, 1.1, {"fast": 2.0})


def test_pricing_command_names_the_provider_wide_entry_and_why(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the bundled table alone
    assert main(["pricing", "Qwen/Qwen3-32B", "--provider", "hosted_vllm", "--json"]) == 0
    out = msgspec.json.decode(capsys.readouterr().out)
    assert (out["entry"], out["provider"]) == ("vllm/*", "vllm")
    assert out["steps"] == ["no entry names it: the entry of every vllm model"]


def test_pricing_command_reads_overrides_from_the_pipeline_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"""
receivers: {{webhook: {{}}}}
processors:
  cost:
    prices: {{openai/gpt-4o: {{input: 1.5, output: 6}}}}
    price_files: [{LITELLM_FILE}]
exporters: {{debug: {{}}}}
service: {{pipelines: {{p: {{receivers: [webhook], processors: [cost], exporters: [debug]}}}}}}
""")
    assert main(["pricing", "gpt-4o", "--provider", "openai", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "entry      openai/gpt-4o  from pipeline.yaml `prices`" in out
    assert "input 1.5  output 6" in out
    assert main(["pricing", "acme-chat-1", "-c", str(path), "--json"]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["origin"] == "litellm-prices.json"


def test_pricing_command_fails_on_an_unpriced_model_listing_the_names_tried(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no pipeline.yaml here: the bundled table alone
    assert main(["pricing", "home-grown-llm-2025-01-01"]) == 1
    err = capsys.readouterr().err
    assert "no price for 'home-grown-llm-2025-01-01'" in err
    assert "looked up as: home-grown-llm-2025-01-01, home-grown-llm" in err


def test_an_invalid_entry_of_prices_is_reported_at_its_own_key_and_line() -> None:
    text = """
receivers: {webhook: {}}
processors:
  cost:
    prices:
      gpt-4o: {input: 2, output: 8}
      broken: {input: -1, output: 1}
exporters: {debug: {}}
service: {pipelines: {p: {receivers: [webhook], processors: [cost], exporters: [debug]}}}
"""
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.loads(text, "pipeline.yaml")
    assert str(e.value) == ("pipeline.yaml:7: processors.cost.prices.broken: prices must be "
                            "finite numbers, not negative")
