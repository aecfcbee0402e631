"""The gateway records what media, rerank and search calls are billed for: images, their
size and quality, characters spoken, seconds transcribed, search units, web searches.
Driven by the official openai SDK (and plain HTTP for Cohere and Gemini) against the
fake upstream."""

import io
import struct
import wave

import aiohttp
import pytest

from meterline.event import Event
from meterline.gateway.fakeupstream import FakeUpstream
from meterline.gateway.shapes import anthropic, openai, shape_for
from meterline.gateway.shapes.media import read_form, wav_seconds
from tests.gateway_helpers import gateway, openai_upstream


@pytest.fixture
async def fake():
    async with FakeUpstream(tokens=3) as upstream:
        yield upstream


def wav(seconds: float, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


async def test_an_image_generation_records_the_images_answered_with_size_and_quality(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        result = await gw.openai().images.generate(
            model="dall-e-3", prompt="a lighthouse at dusk", n=2, size="1024x1792",
            quality="hd")
        event = gw.event
    assert len(result.data) == 2
    assert (event.operation, event.request_model) == ("image_generation", "dall-e-3")
    assert (event.images, event.image_size, event.image_quality) == (2, "1024x1792", "hd")
    assert event.params == {"n": 2, "size": "1024x1792", "quality": "hd"}


async def test_gpt_image_1_records_the_size_and_quality_answered_and_its_tokens(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().images.generate(model="gpt-image-1", prompt="a red fox")
        event = gw.event
    assert (event.images, event.image_size, event.image_quality) == (1, "1024x1024", "medium")
    assert (event.input_tokens, event.output_tokens) == (3, 1056)


async def test_an_image_request_without_a_model_is_openais_default_dall_e_2(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().images.generate(prompt="a cat")
        event = gw.event
    assert (event.request_model, event.images, event.image_size) == ("dall-e-2", 1, None)


async def test_speech_records_the_characters_spoken_and_relays_the_audio_unread(fake):
    text = "Hello there, general."
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        audio = await gw.openai().audio.speech.create(model="tts-1", voice="alloy",
                                                      input=text)
        event = gw.event
    assert audio.content == b"ID3" + b"\0" * (100 * len(text))
    assert (event.operation, event.request_model) == ("text_to_speech", "tts-1")
    assert (event.characters, event.audio_output_seconds) == (len(text), None)
    assert event.params == {"voice": "alloy"}
    assert event.status_code == 200 and event.response_bytes is None


async def test_a_transcription_records_the_seconds_whisper_reports_in_its_usage(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        result = await gw.openai().audio.transcriptions.create(
            model="whisper-1", file=("clip.mp3", b"ID3" + b"\1" * 50_000),
            extra_headers={"x-fake-audio-seconds": "12"})
        event = gw.event
    assert result.text == "tok0 tok1 tok2"
    assert (event.operation, event.request_model) == ("speech_to_text", "whisper-1")
    assert event.audio_input_seconds == 12
    assert event.input_tokens is None


async def test_a_verbose_json_transcription_records_its_duration(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().audio.transcriptions.create(
            model="whisper-1", file=("clip.mp3", b"ID3" + b"\1" * 1000),
            response_format="verbose_json", language="en",
            extra_headers={"x-fake-audio-seconds": "7.25"})
        event = gw.event
    assert event.audio_input_seconds == 7.25
    assert event.params == {"language": "en", "response_format": "verbose_json"}


async def test_a_text_transcription_of_a_wav_file_takes_its_seconds_from_the_header(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().audio.transcriptions.create(
            model="whisper-1", file=("clip.wav", wav(2.5)), response_format="text")
        event = gw.event
    assert event.audio_input_seconds == pytest.approx(2.5)


async def test_a_text_transcription_of_another_format_leaves_the_seconds_unknown(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().audio.transcriptions.create(
            model="whisper-1", file=("clip.mp3", b"ID3" + b"\1" * 1000),
            response_format="text")
        event = gw.event
    assert event.audio_input_seconds is None and event.status_code == 200


async def test_gpt_4o_transcribe_records_the_tokens_it_reports(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("clip.wav", wav(1.0)),
            extra_headers={"x-fake-audio-seconds": "4"})
        event = gw.event
    assert (event.input_tokens, event.output_tokens) == (40, 3)
    assert event.audio_input_tokens == 40  # (its `input_token_details`)
    assert event.audio_input_seconds == pytest.approx(1.0)  # (from the file's header)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (the SDK's translations)
async def test_a_translation_is_read_as_a_transcription(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().audio.translations.create(
            model="whisper-1", file=("clip.mp3", b"ID3" + b"\1" * 100),
            extra_headers={"x-fake-audio-seconds": "30"})
        event = gw.event
    assert (event.endpoint, event.audio_input_seconds) == ("/v1/audio/translations", 30)


async def test_embeddings_record_their_input_tokens(fake):
    async with gateway({"openai": openai_upstream(fake.url)}) as gw:
        await gw.openai().embeddings.create(model="text-embedding-3-small",
                                            input=["one two three", "four five"])
        event = gw.event
    assert (event.operation, event.input_tokens, event.output_tokens) == ("embeddings", 5, None)


async def test_a_cohere_rerank_records_the_search_units_billed(fake):
    upstream = {"base_url": fake.url, "provider": "cohere", "default": True}
    body = {"model": "rerank-v3.5", "query": "capital of France", "top_n": 3,
            "documents": [f"document {i}" for i in range(150)]}
    async with gateway({"cohere": upstream}) as gw, aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v2/rerank", json=body) as response:
            answer = await response.json()
        event = gw.event
    assert len(answer["results"]) == 3
    assert (event.operation, event.request_model, event.search_queries) == (
        "rerank", "rerank-v3.5", 2)
    assert event.params == {"top_n": 3}


async def test_gemini_generate_content_records_the_images_it_answers(fake):
    upstream = {"base_url": fake.url, "provider": "gcp.gemini", "default": True}
    body = {"contents": [{"role": "user", "parts": [{"text": "draw a banana"}]}]}
    async with gateway({"gemini": upstream}) as gw, aiohttp.ClientSession() as http:
        async with http.post(
                f"{gw.url}/v1beta/models/gemini-2.5-flash-image:generateContent", json=body,
                headers={"x-fake-images": "2"}) as response:
            assert response.status == 200
        event = gw.event
    assert (event.operation, event.request_model, event.response_model) == (
        "generate_content", "gemini-2.5-flash-image", "gemini-2.5-flash-image")
    assert (event.images, event.input_tokens, event.output_tokens) == (2, 3, 3 + 2 * 1290)


async def test_imagen_predict_records_one_image_per_prediction(fake):
    upstream = {"base_url": fake.url, "provider": "gcp.gemini", "default": True}
    body = {"instances": [{"prompt": "a lighthouse"}],
            "parameters": {"sampleCount": 3, "aspectRatio": "16:9"}}
    async with gateway({"gemini": upstream}) as gw, aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1beta/models/imagen-4.0-generate-001:predict",
                             json=body) as response:
            assert response.status == 200
        event = gw.event
    assert (event.operation, event.request_model, event.images) == (
        "image_generation", "imagen-4.0-generate-001", 3)


def test_veo_records_the_seconds_of_video_it_accepted_to_generate():
    shape = shape_for("/v1beta/models/veo-3.0-generate-001:predictLongRunning")
    event = Event(endpoint="/v1beta/models/veo-3.0-generate-001:predictLongRunning")
    shape.read_request({"instances": [{"prompt": "waves"}],
                        "parameters": {"durationSeconds": 6, "sampleCount": 2}}, event, False)
    shape.read_response({"name": "models/veo-3.0-generate-001/operations/abc"}, event, False)
    assert (shape.operation, event.request_model, event.video_seconds) == (
        "video_generation", "veo-3.0-generate-001", 12)


def test_responses_web_search_calls_are_recorded_as_search_queries():
    event = Event()
    openai.RESPONSES.read_response({"model": "gpt-5", "status": "completed", "output": [
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
        {"type": "web_search_call", "id": "ws_2", "status": "completed"},
        {"type": "message", "content": [{"type": "output_text", "text": "found"}]}],
        "usage": {"input_tokens": 100, "output_tokens": 10}}, event, False)
    assert (event.search_queries, event.input_tokens) == (2, 100)


def test_anthropic_web_search_requests_are_recorded_as_search_queries():
    event = Event()
    anthropic.MESSAGES.read_response({"model": "claude-sonnet-4-5", "content": [], "usage": {
        "input_tokens": 100, "output_tokens": 20,
        "server_tool_use": {"web_search_requests": 3}}}, event, False)
    assert (event.search_queries, event.input_tokens) == (3, 100)


def test_anthropic_streams_report_web_searches_in_their_last_usage():
    event = Event()
    reader = anthropic.MESSAGES.stream(event, False, False)
    reader.feed({"type": "message_start", "message": {"usage": {"input_tokens": 50}}})
    reader.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "output_tokens": 9, "server_tool_use": {"web_search_requests": 1}}})
    reader.finish()
    assert (event.search_queries, event.output_tokens) == (1, 9)


def test_a_form_is_read_without_copying_its_file_and_stops_at_malformed_parts():
    body = (b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + b"x" * 10_000 + b"\r\n--B--\r\n")
    form = read_form(body, b"multipart/form-data; boundary=B")
    assert form is not None
    assert form.fields == {"model": "whisper-1"}
    start, end = form.files["file"]
    assert end - start == 10_000
    assert read_form(body[:60], b"multipart/form-data; boundary=B").fields == {}
    assert read_form(body, b"application/json") is None


def test_a_wav_header_that_does_not_add_up_gives_no_seconds():
    good = wav(1.0)
    assert wav_seconds(good[:64]) == pytest.approx(1.0)
    zero_rate = good[:28] + struct.pack("<I", 0) + good[32:64]
    assert wav_seconds(zero_rate) is None
    assert wav_seconds(b"ID3" + b"\0" * 60) is None
