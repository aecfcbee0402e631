"""Foreign formats decode into the expected event fields."""

import gzip
import json

import msgspec
import pytest

from meterline.event import api_key_id, to_json
from meterline.receivers.decoders import DecodeError, NotAnLLMCall, decode_body, decode_item
from tests.helpers import FIXTURES, make_event

OTOROSHI = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())
LITELLM = json.loads((FIXTURES / "litellm-standard-logging-payload.json").read_text())


def test_otoroshi_fixture_decodes_to_the_expected_fields():
    e = decode_item(OTOROSHI)
    assert e.event_id == "1904913942551986550"
    assert e.source == "otoroshi"
    assert e.provider == "openai"
    assert e.operation == "chat"
    assert e.streaming is False
    assert e.request_model == "gpt-4o-mini"
    assert (e.input_tokens, e.output_tokens, e.reasoning_tokens) == (14, 39, 0)
    assert e.duration_ms == 960
    assert e.timestamp == (1743001850151 - 960) * 1_000_000  # request start
    assert (e.ratelimit_requests_limit, e.ratelimit_requests_remaining) == (10000, 9998)
    assert (e.ratelimit_tokens_limit, e.ratelimit_tokens_remaining) == (200000, 199992)
    assert e.api_key_id == api_key_id("the_client_id")
    assert e.api_key_name == "default-apikey"
    assert e.metadata["llm_tokens_limit"] == "201"
    assert e.route == "demo-llm-events"
    assert e.input_messages == [{"role": "user", "content": "tell me a joke"}]
    assert e.output_messages[0]["role"] == "assistant"
    assert e.status_code == 200 and e.error_type is None
    assert e.actual_cost_usd is None
    assert e.params["max_tokens"] == 10000
    assert e.attributes["server.address"] == "demo-llm-events.oto.tools"


def test_otoroshi_cost_figures_become_actual_cost():
    item = {**OTOROSHI, "output": {**OTOROSHI["output"], "metadata": {
        **OTOROSHI["output"]["metadata"],
        "costs": {"input_cost": 0.0000021, "output_cost": 0.0000234, "reasoning_cost": 0,
                  "total_cost": 0.0000255, "currency": "USD"}}}}
    assert decode_item(item).actual_cost_usd == pytest.approx(0.0000255)


def with_costs(costs, where="output"):
    if where == "top":
        return {**OTOROSHI, "costs": costs}
    return {**OTOROSHI, "output": {**OTOROSHI["output"], "metadata": {
        **OTOROSHI["output"]["metadata"], "costs": costs}}}


def test_otoroshi_top_level_costs_become_actual_cost():
    item = with_costs({"total_cost": 0.5, "currency": "USD"}, where="top")
    assert decode_item(item).actual_cost_usd == pytest.approx(0.5)


def test_otoroshi_cost_parts_are_summed_when_there_is_no_total():
    item = with_costs({"input_cost": 0.25, "output_cost": 0.5, "reasoning_cost": 0.125,
                       "currency": "USD"})
    assert decode_item(item).actual_cost_usd == pytest.approx(0.875)


def test_otoroshi_costs_in_another_currency_are_not_taken_as_usd():
    item = with_costs({"total_cost": 0.5, "currency": "EUR"})
    e = decode_item(item)
    assert e.actual_cost_usd is None
    assert e.attributes["otoroshi.cost_currency"] == "EUR"


def test_otoroshi_api_key_id_is_the_hash_prefix_and_the_client_id_an_attribute():
    e = decode_item(OTOROSHI)
    assert e.api_key_id == api_key_id("the_client_id") != "the_client_id"
    assert e.attributes["otoroshi.apikey.client_id"] == "the_client_id"


def test_otoroshi_key_without_a_name_is_named_by_its_client_id():
    apikey = {k: v for k, v in OTOROSHI["apikey"].items() if k != "clientName"}
    assert decode_item({**OTOROSHI, "apikey": apikey}).api_key_name == "the_client_id"


def test_otoroshi_apikey_metadata_and_tags_map():
    apikey = {**OTOROSHI["apikey"], "metadata": {"customer_id": "acme-42", "long": "x" * 300},
              "tags": ["prod", "search"]}
    e = decode_item({**OTOROSHI, "apikey": apikey})
    assert e.metadata == {"customer_id": "acme-42", "long": "x" * 128}
    assert e.attributes["otoroshi.apikey.tags"] == ["prod", "search"]


def test_otoroshi_user_becomes_user_id():
    user = {"name": "Alice", "email": "alice@example.com", "metadata": {}}
    assert decode_item({**OTOROSHI, "user": user}).user_id == "alice@example.com"
    assert decode_item({**OTOROSHI, "user": {"name": "Alice"}}).user_id == "Alice"


def test_otoroshi_streaming_embeddings_and_errors_map():
    item = {**OTOROSHI, "consumed_using": "chat/completion/streaming",
            "error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}
    e = decode_item(item)
    assert e.streaming is True
    assert e.error_type == "rate_limit_error"
    assert e.error_message == "Rate limit reached"
    assert decode_item({**OTOROSHI, "consumed_using": "embedding_model/embedding"}
                       ).operation == "embeddings"


@pytest.mark.parametrize(("error", "category", "message"), [
    ({"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests",
                "param": None, "code": "rate_limit_exceeded"}},
     "rate_limit_error", "Rate limit reached for gpt-4o-mini"),  # OpenAI's 429 body
    ({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
     "service_unavailable", "Overloaded"),  # Anthropic's 529 body
    ({"exception": "Request timeout to api.openai.com after 30000 ms"},
     "timeout", "Request timeout to api.openai.com after 30000 ms"),
])
def test_an_otoroshi_failure_is_categorised_by_the_providers_error_body(
        error, category, message):
    # Otoroshi's `error` is the provider's own error body (or the exception's message)
    e = decode_item({**OTOROSHI, "error": error})
    assert (e.error_type, e.error_message) == (category, message)


def with_cache(status):
    metadata = {**OTOROSHI["output"]["metadata"],
                "cache": {"status": status, "key": "k1", "ttl": 86400, "age": 12}}
    # the usage slug at the top is the last provider call's: on a hit, an LLM guardrail's
    return {**OTOROSHI, "output": {**OTOROSHI["output"], "metadata": metadata},
            "usage": {"prompt_tokens": 900, "generation_tokens": 2, "reasoning_tokens": 0},
            "model": "guardrail-model", "duration": 310}


def test_an_otoroshi_cache_hit_is_a_cache_hit_with_its_answers_usage_not_another_calls():
    e = decode_item(with_cache("Hit"))
    assert e.cache_hit is True
    assert (e.input_tokens, e.output_tokens) == (14, 39)  # output.metadata.usage
    assert e.request_model == "gpt-4o-mini"  # the provider's, not the guardrail's
    assert (e.duration_ms, e.ratelimit_requests_limit) == (None, None)
    assert e.timestamp == OTOROSHI["@timestamp"] * 1_000_000


def test_an_otoroshi_cache_miss_is_the_provider_call_of_its_slug():
    e = decode_item(with_cache("Miss"))
    assert e.cache_hit is False
    assert (e.input_tokens, e.request_model, e.duration_ms) == (900, "guardrail-model", 310)
    assert decode_item(OTOROSHI).cache_hit is None  # no cache on that provider


def test_other_otoroshi_events_are_not_llm_calls_and_name_the_filter_to_use():
    with pytest.raises(NotAnLLMCall, match=r'include \[\{"audit": "LLMUsageAudit"\}\]'):
        decode_item({"@type": "GatewayEvent", "@id": "1", "@timestamp": 1})


def test_an_llm_usage_audit_without_timestamp_is_undecodable_not_skipped():
    item = {**OTOROSHI}
    del item["@timestamp"]
    with pytest.raises(DecodeError, match="without @timestamp") as caught:
        decode_item(item)
    assert not isinstance(caught.value, NotAnLLMCall)


def test_a_body_counts_otoroshi_events_that_are_not_llm_calls_as_skipped():
    decoded = decode_body(msgspec.json.encode(
        [OTOROSHI, {"@type": "GatewayEvent", "@id": "g"}, {"@type": "AlertEvent"}]))
    assert (len(decoded.events), decoded.skipped, decoded.rejected) == (1, 2, [])


def test_litellm_payload_decodes_to_the_expected_fields():
    e = decode_item(LITELLM)
    assert e.source == "litellm"
    assert e.event_id == LITELLM["id"]
    assert e.provider == "openai"
    assert e.operation == "chat"
    assert e.request_model == "gpt-4o"
    assert e.route == "gpt-4o"  # the model group: the name the client asked for
    assert e.response_model == "gpt-4o-2024-08-06"  # not the model group: the provider's
    assert e.streaming is True
    assert e.timestamp == 1763913600250000000
    assert e.duration_ms == pytest.approx(1500)
    assert e.ttft_ms == pytest.approx(400)
    assert (e.input_tokens, e.output_tokens, e.cache_read_tokens) == (120, 35, 64)
    assert e.api_key_id == "88dc28d0f030c55e"  # a prefix of the hash, never the key
    assert e.api_key_name == "checkout-service"
    assert (e.team, e.organization, e.user_id) == ("team-payments", "org-acme",
                                                   "alice@example.com")
    assert e.metadata == {"customer_id": "acme-42", "feature": "refund-bot"}
    assert e.tags == ["prod"]
    assert e.cache_hit is False and e.saved_cost_usd is None
    assert e.actual_cost_usd == pytest.approx(0.0004125)
    assert e.finish_reasons == ["stop"]
    assert e.params == {"temperature": 0.2, "max_tokens": 256}
    assert e.status_code == 200 and e.error_type is None
    assert len(e.input_messages) == 2


def test_litellm_failure_maps_error_type():
    item = {**LITELLM, "status": "failure", "error_str": "Rate limit",
            "error_information": {"error_code": "429", "error_class": "RateLimitError",
                                  "error_message": "Rate limit exceeded"}}
    e = decode_item(item)
    assert (e.status_code, e.error_type) == (429, "rate_limit_error")
    assert e.error_message == "Rate limit exceeded"


def test_meterline_json_decodes_as_itself():
    event = make_event(3)
    assert decode_item(msgspec.json.decode(to_json(event))) == event


def test_item_matching_no_decoder_is_refused_with_a_reason():
    with pytest.raises(DecodeError, match="matches no decoder"):
        decode_item({"hello": "world"})


def test_invalid_meterline_event_names_the_field():
    with pytest.raises(DecodeError, match="input_tokens"):
        decode_item({"provider": "openai", "input_tokens": "many"})


def test_body_with_an_array_of_mixed_formats_decodes_each_item():
    body = json.dumps([OTOROSHI, LITELLM, {"provider": "anthropic"}, {"x": 1}]).encode()
    decoded = decode_body(body)
    assert [e.source for e in decoded.events] == ["otoroshi", "litellm", None]
    assert [i for i, _ in decoded.rejected] == [3]


def test_ndjson_body_decodes_line_by_line_and_names_the_bad_line():
    body = b"\n".join([to_json(make_event(1)), b"{oops", to_json(make_event(2))])
    decoded = decode_body(body, ndjson=True)
    assert [e.event_id for e in decoded.events] == ["evt-00000001", "evt-00000002"]
    assert decoded.rejected[0][0] == 1 and "line 2" in decoded.rejected[0][1]


def test_json_lines_sent_as_application_json_are_recognised():
    body = b"\n".join([to_json(make_event(1)), to_json(make_event(2))])
    assert len(decode_body(body).events) == 2


def test_malformed_json_body_is_an_error_with_its_position():
    with pytest.raises(DecodeError, match=r"malformed JSON.*byte"):
        decode_body(b'{"provider": nope}')


def test_gzip_is_not_the_decoders_business():
    with pytest.raises(DecodeError):
        decode_body(gzip.compress(b"[]"))


def test_unknown_fields_in_meterline_json_are_refused_by_name():
    with pytest.raises(DecodeError, match="unknown field `colour`"):
        decode_item({"provider": "openai", "colour": "blue"})


def test_an_item_whose_attributes_hold_an_integer_beyond_64_bits_is_refused_alone():
    body = (b'{"event_id": "a", "provider": "openai", "attributes": {"n": %d}}\n'
            b'{"event_id": "b", "provider": "openai"}\n' % 2**70)
    decoded = decode_body(body, ndjson=True)
    assert [e.event_id for e in decoded.events] == ["b"]
    assert decoded.rejected == [(0, "an integer is out of range (more than 64 bits)")]


def test_an_array_item_with_a_number_out_of_range_is_refused_alone():
    body = (b'[{"event_id": "a", "provider": "openai", "cost_usd": 1e999},'
            b' {"event_id": "b", "provider": "openai"}]')
    decoded = decode_body(body)
    assert [e.event_id for e in decoded.events] == ["b"]
    [(index, reason)] = decoded.rejected
    assert index == 0 and reason.startswith("malformed JSON: Number out of range")


def test_an_array_cut_short_is_still_malformed_as_a_whole():
    with pytest.raises(DecodeError, match="malformed JSON: Input data was truncated"):
        decode_body(b'[{"event_id": "a", "provider": "openai"},')


def test_decode_item_refuses_an_integer_beyond_64_bits():
    with pytest.raises(DecodeError, match="out of range"):
        decode_item({"event_id": "a", "provider": "openai", "output_tokens": 2**64})


def test_an_otoroshi_event_with_negative_tokens_is_refused_alone():
    bad = {**OTOROSHI, "@id": "bad", "usage": {**OTOROSHI["usage"], "prompt_tokens": -14}}
    decoded = decode_body(json.dumps([bad, OTOROSHI]).encode())
    assert [e.event_id for e in decoded.events] == [OTOROSHI["@id"]]
    [(index, reason)] = decoded.rejected
    assert index == 0 and "$.input_tokens" in reason


def test_otoroshis_minus_one_counts_are_not_reported_rather_than_refused():
    # Otoroshi's provider clients write -1 for a count the provider did not send: the
    # reasoning tokens of an Anthropic call, the limits of a provider without their headers
    item = {**OTOROSHI, "provider_kind": "anthropic",
            "usage": {"prompt_tokens": 50, "generation_tokens": 400, "reasoning_tokens": -1},
            "rate_limit": dict.fromkeys(OTOROSHI["rate_limit"], -1)}
    e = decode_item(item)
    assert (e.input_tokens, e.output_tokens, e.reasoning_tokens) == (50, 400, None)
    assert (e.ratelimit_requests_limit, e.ratelimit_requests_remaining,
            e.ratelimit_tokens_limit, e.ratelimit_tokens_remaining) == (None, None, None, None)


def test_an_otoroshi_duration_of_zero_is_not_reported():
    # the OpenAI-like clients read it from `openai-processing-ms`, and write 0 without it
    e = decode_item({**OTOROSHI, "duration": 0})
    assert e.duration_ms is None
    assert e.timestamp == OTOROSHI["@timestamp"] * 1_000_000  # (the call ended then)


def test_a_litellm_payload_with_an_infinite_cost_is_refused():
    decoded = decode_body(json.dumps([{**LITELLM, "response_cost": "inf"}]).encode())
    [(index, reason)] = decoded.rejected
    assert index == 0 and not decoded.events and "$.actual_cost_usd" in reason


def test_a_litellm_payload_from_before_2000_is_refused():
    with pytest.raises(DecodeError, match="timestamp"):
        decode_item({**LITELLM, "startTime": 12.5, "endTime": 13.0})
