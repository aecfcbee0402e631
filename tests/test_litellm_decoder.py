"""What each field of LiteLLM's StandardLoggingPayload becomes, on payloads captured from
the real proxy (LiteLLM 1.100.5 in front of gateway/fakeupstream.py, driven by the openai
SDK, as tests/test_litellm_proxy.py runs it; nothing secret is in them: the master key
appears as LiteLLM's own stand-in and a virtual key as its sha256)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from meterline.event import api_key_id
from meterline.genai import INFERENCE_GEO, SPEED
from meterline.processors.cost.prices import PriceTable, bundled
from meterline.receivers.decoders import decode_item
from tests.helpers import FIXTURES


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"litellm-{name}-payload.json").read_text())


ALIAS = payload("alias")  # master key, `claude-haiku` → anthropic/claude-3-5-haiku-20241022
CACHE_HIT = payload("cache-hit")  # the second of two identical gpt-4o-mini calls
FAILURE = payload("failure-429")  # upstream answered 429
STREAM = payload("stream")
UNMAPPED = payload("unmapped")  # a deployment LiteLLM's cost map does not know
VIRTUAL_KEY = payload("virtual-key")  # custom auth: key alias, team, org, user; `user=`


# 1. aliases: the deployed model is the model, the alias is the route ----------------------

def test_an_alias_is_the_route_and_the_deployed_model_is_the_request_model():
    assert (ALIAS["model_group"], ALIAS["model"]) == (
        "claude-haiku", "anthropic/claude-3-5-haiku-20241022")
    e = decode_item(ALIAS)
    assert e.provider == "anthropic"
    assert e.request_model == "claude-3-5-haiku-20241022"  # LiteLLM's provider prefix dropped
    assert e.route == "claude-haiku"


def test_the_deployed_model_finds_its_price_where_the_alias_would_not():
    table = PriceTable([bundled()[1]])
    e = decode_item(ALIAS)
    assert table.resolve(e.provider, e.request_model).price is not None
    assert table.resolve(e.provider, e.route).price is None


def test_a_model_under_its_own_name_is_both_model_and_route():
    e = decode_item(STREAM)
    assert (e.request_model, e.route, e.provider) == ("gpt-4o-mini", "gpt-4o-mini", "openai")


def test_only_a_prefix_naming_the_provider_is_dropped():
    e = decode_item({**ALIAS, "custom_llm_provider": "openrouter",
                     "model": "openrouter/anthropic/claude-3.5-haiku"})
    assert e.request_model == "anthropic/claude-3.5-haiku"


# 2. response_model only from a response ----------------------------------------------------

def test_the_alias_litellm_writes_into_the_response_is_not_a_response_model():
    assert ALIAS["response"]["model"] == "claude-haiku"  # LiteLLM's rewrite, not Anthropic's
    assert decode_item(ALIAS).response_model is None
    assert decode_item(STREAM).response_model is None  # `gpt-4o-mini`: the name asked for


def test_a_response_model_other_than_the_name_asked_for_is_kept():
    item = copy.deepcopy(STREAM)  # after a fallback LiteLLM keeps the provider's answer
    item["response"]["model"] = "gpt-4o-mini-2024-07-18"
    assert decode_item(item).response_model == "gpt-4o-mini-2024-07-18"


def test_a_failed_call_has_no_response_model_and_no_token_counts():
    assert FAILURE["response"] == {} and FAILURE["prompt_tokens"] == 0
    e = decode_item(FAILURE)
    assert (e.status_code, e.error_type) == (429, "rate_limit_error")
    assert e.request_model == "gpt-4o-mini" and e.route == "limited-429"
    assert e.response_model is None
    assert (e.input_tokens, e.output_tokens) == (None, None)
    assert e.output_messages is None and e.finish_reasons is None


# 3. streaming from the call's parameters ---------------------------------------------------

def test_streaming_is_told_by_the_payload_or_the_parameters():
    assert (STREAM["stream"], STREAM["model_parameters"]["stream"]) == (True, True)
    assert (ALIAS["stream"], ALIAS["model_parameters"]["stream"]) == (None, False)
    assert decode_item(STREAM).streaming is True
    assert decode_item(STREAM).ttft_ms == pytest.approx(
        (STREAM["completionStartTime"] - STREAM["startTime"]) * 1000)
    assert decode_item(ALIAS).streaming is False
    assert decode_item(ALIAS).ttft_ms is None
    assert decode_item(FAILURE).streaming is False


def test_a_completion_that_says_nothing_of_streaming_was_not_streamed():
    assert (CACHE_HIT["stream"], CACHE_HIT["model_parameters"]) == (None, {})
    assert decode_item(CACHE_HIT).streaming is False
    embedding = {**CACHE_HIT, "call_type": "aembedding"}  # of other calls nothing is known
    assert decode_item(embedding).streaming is None


# 4. master key and placeholder users -------------------------------------------------------

def test_the_master_key_is_named_master_and_has_no_id():
    meta = ALIAS["metadata"]
    assert (meta["user_api_key_hash"], meta["user_api_key_user_id"]) == (
        "litellm_proxy_master_key", "default_user_id")
    e = decode_item(ALIAS)
    assert (e.api_key_name, e.api_key_id, e.user_id) == ("master", None, None)
    assert (e.team, e.organization) == (None, None)


def test_a_virtual_key_is_its_hash_prefix_alias_team_org_and_user():
    e = decode_item(VIRTUAL_KEY)
    assert e.api_key_id == api_key_id("sk-checkout-key")  # LiteLLM hashes as meterline does
    assert (e.api_key_name, e.team, e.organization, e.user_id) == (
        "checkout-service", "team-payments", "org-acme", "alice")
    assert e.attributes["litellm.end_user"] == "customer-7"  # the request's `user`


def test_without_a_user_of_its_key_the_user_is_the_requests_own():
    e = decode_item({**ALIAS, "end_user": "customer-7"})
    assert (e.api_key_name, e.user_id) == ("master", "customer-7")


# 5. cache hits -----------------------------------------------------------------------------

def test_a_cache_hit_billed_nothing_and_saved_what_litellm_says():
    assert (CACHE_HIT["cache_hit"], CACHE_HIT["response_cost"]) == (True, 0.0)
    e = decode_item(CACHE_HIT)
    assert e.cache_hit is True
    assert e.actual_cost_usd == 0.0  # a real 0: no provider was called
    assert e.saved_cost_usd == pytest.approx(CACHE_HIT["saved_cache_cost"])
    assert e.saved_cost_usd == pytest.approx((3 * 0.15 + 5 * 0.6) / 1e6)
    assert (e.input_tokens, e.output_tokens) == (3, 5)


def test_calls_answered_by_the_provider_are_no_cache_hits():
    assert (ALIAS["cache_hit"], STREAM["cache_hit"]) == (None, False)
    for item in (ALIAS, STREAM, FAILURE):
        e = decode_item(item)
        assert e.cache_hit is False and e.saved_cost_usd is None


# 6. an unknown cost is not $0 --------------------------------------------------------------

def test_a_cost_litellm_could_not_price_is_not_reported():
    for item in (UNMAPPED, ALIAS):  # both are absent from LiteLLM 1.100.5's local map
        info = item["model_map_information"]["model_map_value"]
        assert (item["response_cost"], info["mode"], info["input_cost_per_token"]) == (0.0, None, 0)
        assert decode_item(item).actual_cost_usd is None


def test_a_priced_cost_is_kept():
    assert decode_item(STREAM).actual_cost_usd == pytest.approx((5 * 0.15 + 5 * 0.6) / 1e6)


def test_a_zero_from_a_model_litellm_prices_at_zero_is_a_real_zero():
    item = copy.deepcopy(UNMAPPED)  # a free model: LiteLLM's own entry, mode and all
    item["model_map_information"]["model_map_value"].update(mode="chat")
    assert decode_item(item).actual_cost_usd == 0.0


def test_a_zero_without_map_information_or_with_a_failed_computation_is_not_reported():
    assert decode_item({**STREAM, "response_cost": 0.0,
                        "model_map_information": None}).actual_cost_usd is None
    assert decode_item({**STREAM, "response_cost": 0.0, "response_cost_failure_debug_info": {
        "error_message": "model not mapped"}}).actual_cost_usd is None


def test_a_failed_calls_zero_is_a_real_zero():
    assert decode_item(FAILURE).actual_cost_usd == 0.0  # nothing used, nothing billed


# 7. metadata types, tags, messages ---------------------------------------------------------

def test_spend_logs_metadata_values_are_json_text_with_typed_originals_kept():
    assert ALIAS["metadata"]["spend_logs_metadata"] == {"call": "alias", "n": 1, "ok": True}
    e = decode_item(ALIAS)
    assert e.metadata == {"call": "alias", "n": "1", "ok": "true"}
    assert e.attributes["litellm.spend_logs_metadata"] == {"call": "alias", "n": 1, "ok": True}
    nested = {**STREAM, "metadata": {**STREAM["metadata"], "spend_logs_metadata": {
        "a": {"b": [1, None]}, "c": 1.5, "d": None, "e": "text"}}}
    assert decode_item(nested).metadata == {"a": '{"b":[1,null]}', "c": "1.5", "e": "text"}


def test_string_metadata_needs_no_typed_copy():
    item = copy.deepcopy(STREAM)
    item["metadata"]["spend_logs_metadata"] = {"customer_id": "acme-42"}
    e = decode_item(item)
    assert e.metadata == {"customer_id": "acme-42"}
    assert "litellm.spend_logs_metadata" not in e.attributes


def test_request_tags_are_tags_without_litellms_user_agent_tags():
    assert ALIAS["request_tags"] == ["checkout", "beta", "User-Agent: AsyncOpenAI",
                                     "User-Agent: AsyncOpenAI/Python 3.63.0"]
    e = decode_item(ALIAS)
    assert e.tags == ["checkout", "beta"]
    assert e.attributes["user_agent.original"] == "AsyncOpenAI/Python 3.63.0"
    only_internal = {**ALIAS, "request_tags": ["User-Agent: curl/8.0"]}
    assert decode_item(only_internal).tags is None


def test_output_messages_lose_the_null_fields_litellm_adds():
    message = ALIAS["response"]["choices"][0]["message"]
    assert (message["tool_calls"], message["function_call"]) == (None, None)
    assert decode_item(ALIAS).output_messages == [
        {"content": "tok0 tok1 tok2 tok3 tok4 ", "role": "assistant"}]
    item = copy.deepcopy(STREAM)
    item["response"]["choices"][0]["message"].update(
        content=None, tool_calls=[{"id": "t1", "type": "function",
                                   "function": {"name": "f", "arguments": "{}"}}])
    [out] = decode_item(item).output_messages
    assert out["tool_calls"][0]["id"] == "t1" and "function_call" not in out
    assert out["content"] is None  # the content of a tool call, null in OpenAI's own shape


# 8. token counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cache_write_tokens", "cache_creation_tokens"])
def test_cache_writes_reported_only_in_the_prompt_details_are_counted(name: str):
    # an OpenAI-compatible answer LiteLLM passes on (Kimi, OpenRouter) has no top-level
    # `cache_creation_input_tokens`: its writes are in `prompt_tokens_details` alone
    item = copy.deepcopy(ALIAS)
    item["response"]["usage"] = {"prompt_tokens": 1000, "completion_tokens": 10,
                                 "prompt_tokens_details": {"cached_tokens": 200, name: 300}}
    e = decode_item(item)
    assert (e.cache_read_tokens, e.cache_creation_tokens) == (200, 300)


def test_audio_tokens_of_the_prompt_and_answer_are_counted():
    item = {**copy.deepcopy(STREAM), "prompt_tokens": 1200, "completion_tokens": 900}
    item["response"]["usage"] = {
        "prompt_tokens": 1200, "completion_tokens": 900,
        "prompt_tokens_details": {"audio_tokens": 1000, "cached_tokens": 0},
        "completion_tokens_details": {"audio_tokens": 750, "reasoning_tokens": 0}}
    e = decode_item(item)
    assert (e.input_tokens, e.audio_input_tokens, e.output_tokens, e.audio_output_tokens) == (
        1200, 1000, 900, 750)


def test_where_and_how_fast_anthropic_ran_the_call_are_read_from_its_usage():
    item = copy.deepcopy(ALIAS)
    item["response"]["usage"] = {"prompt_tokens": 50, "completion_tokens": 10,
                                 "inference_geo": "us", "speed": "fast"}  # (Anthropic's)
    attributes = decode_item(item).attributes
    assert (attributes[INFERENCE_GEO], attributes[SPEED]) == ("us", "fast")
    item["response"]["usage"] |= {"inference_geo": None, "speed": None}
    assert not {INFERENCE_GEO, SPEED} & decode_item(item).attributes.keys()


def test_the_tier_that_served_the_call_and_its_one_hour_cache_writes_are_read():
    item = copy.deepcopy(ALIAS)
    item["response"]["service_tier"] = "flex"
    item["response"]["usage"] = {  # LiteLLM's usage of an Anthropic answer
        "prompt_tokens": 5000, "completion_tokens": 10, "cache_creation_input_tokens": 3000,
        "prompt_tokens_details": {"cache_creation_tokens": 3000, "cache_creation_token_details": {
            "ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000}}}
    e = decode_item(item)
    assert (e.service_tier, e.cache_creation_tokens, e.cache_creation_1h_tokens) == (
        "flex", 3000, 2000)
