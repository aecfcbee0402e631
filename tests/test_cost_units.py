"""The cost processor prices what calls bill besides tokens: images by size and quality,
seconds transcribed, characters spoken, seconds of video, rerank and web searches, batch
calls; a unit without a price leaves the cost null, never 0."""

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meterline.config import convert
from meterline.event import Event
from meterline.processors.cost import CostConfig, CostProcessor
from tests.helpers import make_context, make_event, metric_value


def priced(tmp_path: Path, config: dict[str, Any] | None = None, **fields: Any) -> Event:
    base = {"input_tokens": None, "output_tokens": None, **fields}
    p = CostProcessor(convert(config or {}, CostConfig), make_context(tmp_path, "cost"))
    return p.process([make_event(**base)])[0]


@pytest.mark.parametrize(("size", "quality", "each"), [
    ("1024x1024", "standard", 0.04), ("1024x1792", "hd", 0.12), ("1792x1024", "standard", 0.08),
    (None, None, 0.04),  # OpenAI's defaults: 1024x1024, standard
])
def test_dall_e_3_images_are_priced_by_size_and_quality(
        tmp_path: Path, size: str | None, quality: str | None, each: float) -> None:
    e = priced(tmp_path, request_model="dall-e-3", images=3, image_size=size,
               image_quality=quality)
    assert e.cost_output_usd == pytest.approx(3 * each)
    assert e.cost_usd == pytest.approx(3 * each)
    assert e.pricing_ref == "openai/dall-e-3@bundled"


def test_gpt_image_1_without_tokens_is_priced_per_image_by_quality(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-image-1", images=2, image_size="1024x1536",
               image_quality="high")
    assert e.cost_usd == pytest.approx(2 * 0.25)


def test_gpt_image_1_reporting_tokens_is_priced_by_its_tokens_not_again_per_image(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-image-1", images=1, image_size="1024x1024",
               image_quality="medium", input_tokens=20, output_tokens=1056)
    assert e.cost_input_usd == pytest.approx(20 * 5 / 1e6)
    assert e.cost_output_usd == pytest.approx(1056 * 40 / 1e6)


def test_an_image_of_a_size_the_entry_does_not_price_has_a_null_cost(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-image-1", images=1, image_size="4096x4096",
               image_quality="high")
    assert (e.cost_usd, e.cost_output_usd) == (None, None)


def test_transcription_is_priced_per_minute_of_audio(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="whisper-1", audio_input_seconds=90)
    assert e.cost_input_usd == pytest.approx(1.5 * 0.006)
    assert e.cost_usd == pytest.approx(1.5 * 0.006)


def test_groq_whisper_is_priced_at_groqs_hourly_rate(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="groq", request_model="whisper-large-v3",
               audio_input_seconds=3600)
    assert e.cost_usd == pytest.approx(60 * 0.00185)


def test_a_transcription_model_reporting_tokens_is_priced_by_them(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o-transcribe", audio_input_seconds=60,
               input_tokens=1000, output_tokens=100)
    assert e.cost_usd == pytest.approx((1000 * 6 + 100 * 10) / 1e6)


def test_speech_is_priced_per_character(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="tts-1-hd", characters=2000)
    assert e.cost_input_usd == pytest.approx(2000 * 30 / 1e6)
    assert e.cost_usd == pytest.approx(0.06)


def test_elevenlabs_speech_is_priced_per_character_without_a_provider(tmp_path: Path) -> None:
    e = priced(tmp_path, provider=None, request_model="eleven_flash_v2_5", characters=10_000)
    assert e.cost_usd == pytest.approx(10_000 * 50 / 1e6)
    assert e.pricing_ref == "elevenlabs/eleven_flash_v2_5@bundled"


def test_speech_priced_per_minute_is_priced_by_the_seconds_synthesised(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4o-mini-tts", audio_output_seconds=30)
    assert e.cost_output_usd == pytest.approx(0.5 * 0.015)


def test_video_is_priced_per_second(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="gcp.gemini", request_model="veo-3.0-generate-001",
               video_seconds=8)
    assert e.cost_output_usd == pytest.approx(8 * 0.4)
    assert e.cost_usd == pytest.approx(3.2)


def test_rerank_is_priced_per_search_unit(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="cohere", request_model="rerank-v3.5", search_queries=3)
    assert e.cost_input_usd == pytest.approx(3 * 2 / 1000)


def test_web_searches_are_priced_per_thousand_on_top_of_the_tokens(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="anthropic", request_model="claude-sonnet-4-5",
               input_tokens=1000, output_tokens=100, search_queries=2)
    assert e.cost_input_usd == pytest.approx(1000 * 3 / 1e6 + 2 * 10 / 1000)
    assert e.cost_output_usd == pytest.approx(100 * 15 / 1e6)


def test_a_model_priced_apart_for_web_search_keeps_its_own_rate(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="gcp.gemini", request_model="gemini-2.5-flash",
               input_tokens=0, output_tokens=0, search_queries=1)
    assert e.cost_usd == pytest.approx(35 / 1000)


def test_a_batch_call_gets_the_batch_discount_on_tokens_and_units(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4.1-mini", batch=True, input_tokens=1000,
               output_tokens=1000, search_queries=1)
    assert e.cost_input_usd == pytest.approx((1000 * 0.4 / 1e6 + 10 / 1000) * 0.5)
    assert e.cost_output_usd == pytest.approx(1000 * 1.6 / 1e6 * 0.5)
    assert e.pricing_ref == "openai/gpt-4.1-mini@bundled;batch"


def test_a_call_marked_not_batch_is_not_discounted_whatever_its_endpoint(tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="gpt-4.1-mini", batch=False, endpoint="/v1/batches",
               input_tokens=1000, output_tokens=0)
    assert e.cost_usd == pytest.approx(1000 * 0.4 / 1e6)


def test_embeddings_are_priced_by_their_tokens(tmp_path: Path) -> None:
    e = priced(tmp_path, provider="cohere", request_model="embed-v4.0", input_tokens=10_000)
    assert (e.cost_input_usd, e.cost_output_usd) == (pytest.approx(10_000 * 0.12 / 1e6), None)


def test_a_unit_without_a_price_leaves_the_cost_null_and_counts_as_unpriced(
        tmp_path: Path) -> None:
    context = make_context(tmp_path, "cost")
    p = CostProcessor(CostConfig(), context)
    registry: CollectorRegistry = context.telemetry.registry
    # deepseek-chat prices tokens, and no web search
    e = p.process([make_event(provider="deepseek", request_model="deepseek-chat",
                              input_tokens=1000, output_tokens=100, search_queries=1)])[0]
    assert e.cost_usd is None and e.cost_input_usd is None
    assert e.cost_output_usd == pytest.approx(100 * 0.42 / 1e6)  # the known side is kept
    assert metric_value(registry, "meterline_cost_unpriced_events_total",
                        model="deepseek-chat") == 1


def test_seconds_of_a_model_priced_per_character_are_not_priced_by_guess(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="tts-1", audio_output_seconds=10)
    assert e.cost_usd is None


def test_tokens_of_a_model_that_prices_only_units_are_not_priced_by_guess(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="whisper-1", input_tokens=500)
    assert e.cost_usd is None


def test_a_cache_hit_of_a_unit_priced_call_costs_nothing_and_saves_its_price(
        tmp_path: Path) -> None:
    e = priced(tmp_path, request_model="dall-e-3", images=1, cache_hit=True)
    assert (e.cost_usd, e.saved_cost_usd) == (0.0, pytest.approx(0.04))


def test_unit_prices_written_in_the_config_are_used(tmp_path: Path) -> None:
    config = {"prices": {"runway/gen4_turbo": {"video_second": 0.04},
                         "acme/img": {"images": {"1024X1024/HD": 0.5}, "image": 0.1}}}
    video = priced(tmp_path, config, provider="runway", request_model="gen4_turbo",
                   video_seconds=10)
    assert video.cost_usd == pytest.approx(0.4)
    image = priced(tmp_path, config, provider="acme", request_model="img", images=1,
                   image_size="1024x1024", image_quality="hd")
    assert image.cost_usd == pytest.approx(0.5)


def test_an_entry_with_neither_token_nor_unit_prices_is_refused() -> None:
    with pytest.raises(Exception, match="gives `input`"):
        convert({"prices": {"x": {"output": 1}}}, CostConfig)
