"""LiteLLM's `guardrail_information` becomes `guardrails`, and what acted on a call besides
plain forwarding (guardrails, fallbacks, LiteLLM's own rate limits, budgets) becomes
`policies`. The entries are shaped as LiteLLM 1.100.5 writes them
(`CustomGuardrail.add_standard_logging_guardrail_information_to_request_data`)."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from meterline.event import Guardrail
from meterline.receivers.decoders import decode_body, decode_item
from tests.test_litellm_decoder import CACHE_HIT, FAILURE, STREAM


def with_guardrails(*entries: Any, base: dict[str, Any] = STREAM) -> dict[str, Any]:
    payload = copy.deepcopy(base)
    payload["guardrail_information"] = list(entries)
    return payload


def entry(name: str = "presidio-pii", mode: Any = "pre_call", status: str = "success",
          **extra: Any) -> dict[str, Any]:
    return {"guardrail_name": name, "guardrail_provider": "presidio", "guardrail_mode": mode,
            "guardrail_response": {}, "guardrail_status": status, "start_time": 1.0,
            "end_time": 1.1, "duration": 0.1, "masked_entity_count": None, **extra}


# --- guardrails -------------------------------------------------------------------------
def test_a_guardrail_that_intervened_before_the_call_blocked_its_input():
    e = decode_item(with_guardrails(entry("lakera-pre", status="guardrail_intervened",
                                          detection_method="llm-judge")))
    assert e.guardrails == [Guardrail(rule="lakera-pre", stage="input", action="block",
                                      detector="llm-judge")]
    assert e.policies == ["guardrails"]


def test_a_guardrail_that_intervened_after_the_call_blocked_its_output():
    e = decode_item(with_guardrails(entry("toxicity", mode="post_call",
                                          status="guardrail_intervened")))
    assert e.guardrails == [Guardrail(rule="toxicity", stage="output", action="block")]


def test_masked_entities_are_a_redaction_one_per_entity_type():
    e = decode_item(with_guardrails(entry(masked_entity_count={
        "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1, "CREDIT_CARD": 0})))
    assert e.guardrails == [
        Guardrail(rule="presidio-pii", stage="input", action="redact", detector="EMAIL_ADDRESS"),
        Guardrail(rule="presidio-pii", stage="input", action="redact", detector="PHONE_NUMBER")]
    assert e.policies == ["guardrails"]


def test_a_custom_code_guardrails_mask_answer_is_a_redaction():
    e = decode_item(with_guardrails(entry("custom", mode="during_call", guardrail_response="mask")))
    assert e.guardrails == [Guardrail(rule="custom", stage="input", action="redact")]


@pytest.mark.parametrize("status", ["success", "guardrail_failed_to_respond", "not_run"])
def test_a_guardrail_that_passed_failed_or_did_not_run_is_not_recorded(status):
    e = decode_item(with_guardrails(entry(status=status)))
    assert (e.guardrails, e.policies) == (None, None)


def test_older_versions_single_object_and_blocked_status_are_read():
    payload = copy.deepcopy(STREAM)
    payload["guardrail_information"] = entry("aporia", status="blocked")
    assert decode_item(payload).guardrails == [
        Guardrail(rule="aporia", stage="input", action="block")]


@pytest.mark.parametrize(("mode", "stage"), [
    ("during_call", "input"), ("pre_mcp_call", "input"), ("post_mcp_call", "output"),
    (["pre_call", "during_call"], "input"), ({"tags": {"x": "post_call"}, "default": "post_call"},
                                             "output")])
def test_the_stage_follows_the_guardrail_mode(mode, stage):
    e = decode_item(with_guardrails(entry(mode=mode, status="guardrail_intervened")))
    assert [g.stage for g in e.guardrails] == [stage]


@pytest.mark.parametrize("mode", [["pre_call", "post_call"], "logging_only", None, 3])
def test_a_guardrail_whose_mode_names_no_single_stage_is_left_out(mode):
    e = decode_item(with_guardrails(entry(mode=mode, status="guardrail_intervened")))
    assert e.guardrails is None


def test_hostile_guardrail_information_is_ignored_never_an_error():
    e = decode_item(with_guardrails(
        "text", 3, None, [], {"guardrail_name": ["x"], "guardrail_status": ["y"]},
        entry(status={"a": 1}, masked_entity_count={"EMAIL": "many"}),
        entry(name="", status="guardrail_intervened")))
    assert (e.guardrails, e.policies) == (None, None)


def test_a_rule_name_with_a_control_character_refuses_the_item_alone_with_the_reason():
    good = with_guardrails(entry(status="guardrail_intervened"))
    bad = with_guardrails(entry(name="pii\x00", status="guardrail_intervened"))
    decoded = decode_body(msgspec.json.encode([good, bad]))
    assert len(decoded.events) == 1
    [(index, reason)] = decoded.rejected
    assert index == 1 and "guardrails" in reason


# --- policies -----------------------------------------------------------------------------
def test_attempted_fallbacks_make_a_fallback():
    payload = copy.deepcopy(CACHE_HIT)
    payload["hidden_params"]["additional_headers"]["x-litellm-attempted-fallbacks"] = 1
    e = decode_item(payload)
    assert (e.fallback, e.policies) == (True, ["fallback"])


def test_no_attempted_fallback_is_no_policy():
    assert CACHE_HIT["hidden_params"]["additional_headers"]["x-litellm-attempted-fallbacks"] == 0
    e = decode_item(CACHE_HIT)
    assert (e.fallback, e.policies) == (None, None)


def failure(**error: Any) -> dict[str, Any]:
    payload = copy.deepcopy(FAILURE)
    payload["error_information"].update(error)
    return payload


def test_litellms_own_rate_limit_is_a_rate_limit_policy():
    e = decode_item(failure(error_rate_limit_category="litellm_rate_limit",
                            error_rate_limit_type="requests"))
    assert e.policies == ["rate_limit"]


def test_a_providers_429_is_no_policy():
    assert FAILURE["error_information"]["error_code"] == "429"
    e = decode_item(failure(error_rate_limit_category="vendor_rate_limit"))
    assert (e.error_type, e.policies) == ("rate_limit_error", None)


@pytest.mark.parametrize("error", [
    {"error_budget_entity_type": "key", "error_class": "BudgetExceededError"},
    {"error_rate_limit_category": "litellm_rate_limit", "error_rate_limit_type": "budget"},
    {"error_class": "BudgetExceededError"}])
def test_an_exceeded_budget_is_a_budget_policy(error):
    assert decode_item(failure(**error)).policies == ["budget"]


def test_a_successful_call_carries_no_error_policy_even_with_stale_error_fields():
    payload = copy.deepcopy(STREAM)
    payload["error_information"]["error_budget_entity_type"] = "key"
    assert decode_item(payload).policies is None


def test_the_providers_rate_limit_headers_fill_the_ratelimit_fields():
    e = decode_item(STREAM)
    assert (e.ratelimit_requests_limit, e.ratelimit_requests_remaining,
            e.ratelimit_tokens_limit, e.ratelimit_tokens_remaining) == (10000, 9999, 200000, 199000)
