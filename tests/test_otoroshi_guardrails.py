"""Otoroshi's LLM extension fails a call its guardrails deny (when the provider's
`guardrails_fail_on_deny` is set) with the error `guardrail_denied` and the phase; the
LLMUsageAudit event of that call records a guardrail that blocked it."""

from __future__ import annotations

import copy
import json
from typing import Any

from meterline.event import Guardrail
from meterline.receivers.decoders import decode_item
from meterline.receivers.decoders.otoroshi import UNKNOWN_RULE
from tests.helpers import FIXTURES

OTOROSHI = json.loads((FIXTURES / "otoroshi-llm-usage-audit.json").read_text())


def denied(phase: Any, *guardrails: dict[str, Any]) -> dict[str, Any]:
    event = copy.deepcopy(OTOROSHI)
    event["error"] = {"error": "guardrail_denied", "error_description": "pif detected",
                      "phase": phase}
    event["output"] = None
    event["provider_details"]["guardrails"] = list(guardrails)
    event["provider_details"]["guardrails_fail_on_deny"] = True
    return event


def guardrail(id_: str, before: bool = True, after: bool = False, enabled: bool = True):
    return {"enabled": enabled, "before": before, "after": after, "id": id_, "config": {}}


def test_a_call_denied_before_is_a_guardrail_that_blocked_its_input():
    e = decode_item(denied("before", guardrail("pif"), guardrail("gibberish", after=True,
                                                                 before=False)))
    assert e.guardrails == [Guardrail(rule="pif", stage="input", action="block")]
    assert e.policies == ["guardrails"]
    assert e.error_message is not None  # still a failed call


def test_a_call_denied_after_is_a_guardrail_that_blocked_its_output():
    e = decode_item(denied("after", guardrail("pif"), guardrail("toxic_language", after=True)))
    assert e.guardrails == [Guardrail(rule="toxic_language", stage="output", action="block")]


def test_a_denial_that_several_guardrails_could_have_made_names_no_rule():
    e = decode_item(denied("before", guardrail("pif"), guardrail("regex"),
                           guardrail("moderation", enabled=False)))
    assert e.guardrails == [Guardrail(rule=UNKNOWN_RULE, stage="input", action="block")]


def test_a_guardrail_that_failed_to_run_is_no_guardrail_outcome():
    event = denied("before", guardrail("pif"))
    event["error"]["error"] = "bad_request"
    e = decode_item(event)
    assert (e.guardrails, e.policies) == (None, None)


def test_a_successful_call_has_no_guardrail_outcome():
    e = decode_item(OTOROSHI)
    assert (e.guardrails, e.policies) == (None, None)


def test_a_hostile_guardrail_error_is_ignored():
    for phase in (None, ["before"], {"a": 1}, "during"):
        e = decode_item(denied(phase, guardrail("pif")))
        assert e.guardrails is None
    event = denied("before", {"id": ["x"], "enabled": True, "before": True}, "pif", None)
    assert decode_item(event).guardrails == [
        Guardrail(rule=UNKNOWN_RULE, stage="input", action="block")]
