"""Reading provider streams and errors: the parts the fake upstream does not exercise."""

import json

import pytest
from anthropic.types import CacheCreation
from anthropic.types import Usage as AnthropicUsage
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails

from meterline.event import Event
from meterline.gateway.shapes import (
    DROP,
    TOKEN,
    USAGE_ESTIMATED,
    anthropic,
    input_chars,
    openai,
    read_error,
    shape_for,
)
from meterline.gateway.streams import LineSplitter, SSESplitter, Unread


def test_sse_events_split_across_reads_come_out_whole():
    splitter = SSESplitter()
    assert splitter.feed(b"data: {\"a\"") == []
    assert splitter.feed(b": 1}\n\ndata: [DO") == [b'data: {"a": 1}\n\n']
    assert splitter.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]


def test_sse_with_crlf_and_multiline_data_reads_its_payload():
    splitter = SSESplitter()
    [block] = splitter.feed(b"event: x\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n")
    assert SSESplitter.payload(block) == b'{"a":\n1}'


def test_an_unterminated_last_line_is_handed_back_at_the_end():
    splitter = LineSplitter()
    assert splitter.feed(b'{"done": false}\n{"done": tr') == [b'{"done": false}\n']
    assert splitter.rest() == b'{"done": tr'


def test_a_message_over_many_reads_comes_out_whole():
    splitter = SSESplitter()
    message = b"data: " + b"x" * 3_000_000 + b"\n\n"
    reads = [message[i:i + 1024] for i in range(0, len(message), 1024)]
    assert [block for read in reads for block in splitter.feed(read)] == [message]


def test_a_separator_split_across_two_reads_ends_the_message():
    splitter = SSESplitter()
    assert splitter.feed(b"data: 1\n") == []
    assert splitter.feed(b"\ndata: 2\n\n") == [b"data: 1\n\n", b"data: 2\n\n"]


def test_a_message_longer_than_the_limit_is_relayed_unread_and_the_next_read():
    splitter = SSESplitter(limit=100)
    assert splitter.feed(b"data: " + b"x" * 60) == []
    [start] = splitter.feed(b"x" * 60)
    assert type(start) is Unread and start == b"data: " + b"x" * 120
    [more] = splitter.feed(b"x" * 500)  # not held: relayed as it comes
    assert type(more) is Unread and splitter.pending == b""
    end, after = splitter.feed(b"x\n\ndata: {\"usage\": 1}\n\n")
    assert type(end) is Unread and end == b"x\n\n"
    assert type(after) is bytes and after == b'data: {"usage": 1}\n\n'


def test_an_unread_message_ends_at_a_separator_split_across_two_reads():
    splitter = SSESplitter(limit=10)
    assert [type(b) for b in splitter.feed(b"data: " + b"y" * 20 + b"\n")] == [Unread]
    end, after = splitter.feed(b"\ndata: 1\n\n")
    assert (end, after) == (b"\n", b"data: 1\n\n") and type(end) is Unread


def test_an_ndjson_line_longer_than_the_limit_is_relayed_unread():
    splitter = LineSplitter(limit=10)
    assert [type(b) for b in splitter.feed(b'{"a": "' + b"z" * 20)] == [Unread]
    end, after = splitter.feed(b'"}\n{"done": true}\n')
    assert (type(end), end, after) == (Unread, b'"}\n', b'{"done": true}\n')


@pytest.mark.parametrize(("path", "operation"), [
    ("/openai/deployments/gpt4/chat/completions", "chat"),
    ("/v1/completions", "text_completion"),
    ("/v1/messages", "chat"),
    ("/api/embed", "embeddings"),
])
def test_the_shape_is_chosen_by_the_end_of_the_path(path, operation):
    assert shape_for(path).operation == operation


def test_paths_no_shape_knows_are_passed_through():
    assert shape_for("/v1/messages/count_tokens") is None
    assert shape_for("/v1/files") is None


def test_openai_tool_call_deltas_are_assembled():
    event = Event()
    reader = openai.CHAT.stream(event, capture=True, drop_usage=False)
    deltas = [{"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city": '}},
              {"index": 0, "function": {"arguments": '"Paris"}'}}]
    flags = [reader.feed({"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]})
             for d in deltas]
    reader.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    reader.finish()
    assert flags == [TOKEN] * 3
    assert event.finish_reasons == ["tool_calls"]
    assert event.output_messages == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}]


def test_only_the_usage_chunk_the_gateway_asked_for_is_dropped():
    event = Event()
    reader = openai.CHAT.stream(event, capture=False, drop_usage=True)
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    assert reader.feed({"choices": [{"index": 0, "delta": {"content": "a"}}],
                        "usage": None}) == TOKEN
    assert reader.feed({"choices": [], "usage": usage}) == DROP
    assert (event.input_tokens, event.output_tokens) == (5, 2)


def test_anthropic_tool_use_stream_is_assembled():
    event = Event()
    reader = anthropic.MESSAGES.stream(event, capture=True, drop_usage=False)
    reader.feed({"type": "message_start", "message": {"model": "claude", "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}}})
    reader.feed({"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "search", "input": {}}})
    for part in ('{"q": ', '"cats"}'):
        reader.feed({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "input_json_delta", "partial_json": part}})
    reader.feed({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                 "usage": {"output_tokens": 7}})
    reader.finish()
    assert (event.input_tokens, event.cache_read_tokens, event.output_tokens) == (15, 5, 7)
    assert event.output_messages[0]["tool_calls"] == [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "search", "arguments": '{"q": "cats"}'}}]


def test_an_in_band_stream_error_is_categorised_by_its_name():
    event = Event(status_code=200)
    read_error({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
               event)
    assert (event.error_type, event.error_message) == ("service_unavailable", "busy")


def test_an_ollama_error_string_is_read():
    event = Event(status_code=404)
    read_error({"error": "model 'x' not found"}, event)
    assert (event.error_type, event.error_message) == ("not_found_error", "model 'x' not found")


def test_a_cut_stream_estimates_tool_call_output_from_the_arguments_streamed():
    event = Event()
    reader = openai.CHAT.stream(event, capture=False, drop_usage=True)
    for part in ('{"city": "Paris, ', 'France", "unit": "celsius"}'):  # 44 characters
        reader.feed({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": part}}]}}]})
    reader.cut(lambda: 40)
    assert (event.input_tokens, event.output_tokens) == (10, 11)
    assert event.attributes == {USAGE_ESTIMATED: True}


def test_a_stream_cut_after_the_providers_final_usage_keeps_its_counts_unmarked():
    event = Event()
    reader = anthropic.MESSAGES.stream(event, capture=False, drop_usage=False)
    reader.feed({"type": "message_start", "message": {"usage": {"input_tokens": 10,
                                                                "output_tokens": 1}}})
    reader.feed({"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": "x" * 400}})
    reader.feed({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                 "usage": {"output_tokens": 90}})
    reader.cut(lambda: 0)
    assert (event.input_tokens, event.output_tokens) == (10, 90)
    assert event.attributes is None and event.finish_reasons == ["end_turn"]


def test_the_input_estimate_counts_text_and_tool_definitions_not_images():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 9000}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"model": "gpt-4o", "tools": tools, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]}
    assert input_chars(body) == len("be brief") + len("what is this?") + len(
        json.dumps(tools, separators=(",", ":")))


# gpt-4o-audio-preview's usage: audio heard and spoken, among the prompt and answer tokens
AUDIO_USAGE = CompletionUsage(
    prompt_tokens=1200, completion_tokens=900, total_tokens=2100,
    prompt_tokens_details=PromptTokensDetails(audio_tokens=1000, cached_tokens=0),
    completion_tokens_details=CompletionTokensDetails(audio_tokens=750, reasoning_tokens=0))


def test_an_openai_answer_records_the_audio_tokens_of_its_prompt_and_answer():
    answer = ChatCompletion(
        id="chatcmpl-1", object="chat.completion", created=1_780_000_000,
        model="gpt-4o-audio-preview-2024-12-17", usage=AUDIO_USAGE, choices=[{
            "index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": None, "audio": {
                    "id": "audio_1", "data": "UklGRg==", "expires_at": 1_780_003_600,
                    "transcript": "Hello."}}}])
    event = Event()
    openai.CHAT.read_response(answer.model_dump(mode="json"), event, capture=False)
    assert (event.input_tokens, event.audio_input_tokens, event.output_tokens,
            event.audio_output_tokens) == (1200, 1000, 900, 750)


def test_an_openai_stream_records_the_audio_tokens_of_its_final_usage():
    final = ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk",
                                created=1_780_000_000, model="gpt-4o-audio-preview",
                                choices=[], usage=AUDIO_USAGE)
    event = Event()
    reader = openai.CHAT.stream(event, capture=False, drop_usage=False)
    reader.feed(final.model_dump(mode="json"))
    reader.finish()
    assert (event.audio_input_tokens, event.audio_output_tokens) == (1000, 750)


def test_a_gemini_answer_records_the_audio_tokens_of_its_prompt_and_answer():
    path = "/v1beta/models/gemini-2.5-flash-native-audio-latest:generateContent"
    event = Event(endpoint=path)
    shape_for(path).read_response({"usageMetadata": {
        "promptTokenCount": 700, "candidatesTokenCount": 300,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100},
                                {"modality": "AUDIO", "tokenCount": 600}],
        "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 300}]}},
        event, capture=False)
    assert (event.input_tokens, event.audio_input_tokens, event.output_tokens,
            event.audio_output_tokens) == (700, 600, 300, 300)



def test_an_openai_answer_records_the_tier_that_served_it():
    answer = ChatCompletion(id="chatcmpl-1", object="chat.completion", created=1_780_000_000,
                            model="o3", service_tier="flex", choices=[])
    event = Event()
    openai.CHAT.read_response(answer.model_dump(mode="json"), event, capture=False)
    assert event.service_tier == "flex"


def test_an_openai_stream_records_the_tier_that_served_it():
    chunk = ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk",
                                created=1_780_000_000, model="gpt-5", service_tier="priority",
                                choices=[])
    event = Event()
    reader = openai.CHAT.stream(event, capture=False, drop_usage=False)
    reader.feed(chunk.model_dump(mode="json"))
    reader.finish()
    assert event.service_tier == "priority"


def test_a_responses_stream_records_the_tier_of_its_final_response():
    event = Event()
    reader = openai.RESPONSES.stream(event, capture=False, drop_usage=False)
    reader.feed({"type": "response.completed", "response": {
        "id": "resp_1", "model": "gpt-5", "service_tier": "flex", "status": "completed",
        "usage": {"input_tokens": 10, "output_tokens": 5}}})
    assert (event.service_tier, event.input_tokens) == ("flex", 10)


def test_an_anthropic_answer_records_its_one_hour_cache_writes_tier_and_geography():
    usage = AnthropicUsage(input_tokens=10, output_tokens=5, cache_creation_input_tokens=3000,
                           cache_read_input_tokens=0, service_tier="priority",
                           inference_geo="us",
                           cache_creation=CacheCreation(ephemeral_1h_input_tokens=2000,
                                                        ephemeral_5m_input_tokens=1000))
    event = Event()
    anthropic.MESSAGES.read_response({"model": "claude-sonnet-4-5", "content": [],
                                      "usage": usage.model_dump(mode="json")},
                                     event, capture=False)
    assert (event.input_tokens, event.cache_creation_tokens, event.cache_creation_1h_tokens,
            event.service_tier) == (3010, 3000, 2000, "priority")
    assert event.attributes == {"anthropic.inference_geo": "us"}


def test_an_anthropic_answer_records_the_speed_it_ran_at():
    usage = AnthropicUsage(input_tokens=10, output_tokens=5, speed="fast")
    event = Event()
    anthropic.MESSAGES.read_response({"model": "claude-opus-5", "content": [],
                                      "usage": usage.model_dump(mode="json")},
                                     event, capture=False)
    assert event.attributes == {"anthropic.speed": "fast"}


def test_a_gemini_answer_records_its_traffic_type_as_the_tier_that_served_it():
    path = "/v1beta/models/gemini-3-pro:generateContent"
    event = Event(endpoint=path)
    shape_for(path).read_response({"usageMetadata": {
        "promptTokenCount": 7, "candidatesTokenCount": 3, "trafficType": "ON_DEMAND_PRIORITY"}},
        event, capture=False)
    assert event.service_tier == "ON_DEMAND_PRIORITY"
