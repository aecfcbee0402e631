"""The redact processor beyond the messages: with the default `redact: {}`, every string
field of the event is scanned; identifiers get stable pseudonyms, free text is masked."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meterline.config import convert
from meterline.event import Event, Guardrail
from meterline.exporters.otlp.encode import to_traces_request
from meterline.processors.redact import (
    CORRELATION_KEYS,
    STRING_FIELDS,
    TEXT_FIELDS,
    RedactConfig,
    RedactProcessor,
)
from meterline.processors.redact.engine import DetectorSet
from tests.helpers import make_context, make_event, metric_value

EMAIL = "jane.doe@acme-corp.com"
OPENAI_KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78St90Uv12Wx34"
ANTHROPIC_KEY = "sk-ant-api03-" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe" * 3 + "-AbCdEfAA"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PSEUDONYM = re.compile(r"<EMAIL:[0-9a-f]{16}>")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


def redact(tmp_path: Path, events: list[Event], **config: Any) -> list[Event]:
    p = RedactProcessor(convert(config, RedactConfig), make_context(tmp_path, "redact"))
    return p.process(events)


def one(tmp_path: Path, **fields: Any) -> Event:
    return redact(tmp_path, [make_event(**fields)])[0]


def test_an_email_in_the_error_message_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, error_message=f"user {EMAIL} is not allowed")
    assert e.error_message == "user <EMAIL> is not allowed"
    assert e.redactions == {"email": 1}


def test_an_openai_key_echoed_in_an_upstream_error_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, error_message=(
        f"Incorrect API key provided: {OPENAI_KEY}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."))
    assert e.error_message == ("Incorrect API key provided: <OPENAI_KEY>. You can find your "
                               "API key at https://platform.openai.com/account/api-keys.")


def test_a_bearer_token_echoed_in_an_upstream_error_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, error_message="Incorrect API key provided: Bearer 9f8e7d6c5b4a39281706f5e4")
    assert e.error_message == "Incorrect API key provided: Bearer <BEARER_TOKEN>"


def test_an_anthropic_key_next_to_invalid_x_api_key_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, error_message=f'{{"type": "authentication_error", '
                                    f'"message": "invalid x-api-key {ANTHROPIC_KEY}"}}')
    assert ANTHROPIC_KEY not in str(e.error_message)
    assert "<ANTHROPIC_KEY>" in str(e.error_message)


def test_an_aws_key_in_finish_reasons_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, finish_reasons=["stop", f"key {AWS_KEY}"])
    assert e.finish_reasons == ["stop", "key <AWS_KEY>"]


def test_an_email_in_params_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, params={"temperature": 0.2, "user": EMAIL})
    assert e.params == {"temperature": 0.2, "user": "<EMAIL>"}


def test_an_email_nested_in_a_list_of_attributes_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"recipients": ["ops", {"to": [f"mail {EMAIL}"]}]})
    assert e.attributes == {"recipients": ["ops", {"to": ["mail <EMAIL>"]}]}


def test_numbers_and_booleans_in_attributes_are_untouched(tmp_path: Path) -> None:
    attributes = {"n": 4111111111111111, "ok": True, "ratio": 0.5, "none": None,
                  "nested": [1, False, {"x": 123456789}], "mail": EMAIL}
    e = one(tmp_path, attributes=attributes)
    assert e.attributes == {**attributes, "mail": "<EMAIL>"}


def test_an_id_key_in_attributes_is_scanned_unlike_in_messages(tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"id": EMAIL, "type": "ssn 123-45-6789"})
    assert e.attributes == {"id": "<EMAIL>", "type": "ssn <SSN>"}


def test_strings_nested_deeper_than_recursion_allows_are_scanned(tmp_path: Path) -> None:
    deep: Any = f"key {AWS_KEY}"
    for _ in range(5000):
        deep = [deep]
    e = one(tmp_path, attributes={"deep": deep})
    inner = e.attributes["deep"] if e.attributes else None
    while isinstance(inner, list):
        inner = inner[0]
    assert inner == "key <AWS_KEY>"


def test_a_server_sent_event_in_an_error_is_not_taken_for_a_data_uri(tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"body": f'data: {{"error": "bad key {OPENAI_KEY}"}}'})
    assert e.attributes == {"body": 'data: {"error": "bad key <OPENAI_KEY>"}'}


def test_an_email_user_id_becomes_a_stable_pseudonym(tmp_path: Path) -> None:
    first, second = redact(tmp_path, [make_event(1, user_id=EMAIL), make_event(2, user_id=EMAIL)])
    assert first.user_id is not None and PSEUDONYM.fullmatch(first.user_id)
    assert second.user_id == first.user_id
    assert first.redactions == {"email": 1}


def test_two_users_keep_two_pseudonyms(tmp_path: Path) -> None:
    ann, bob = redact(tmp_path, [make_event(1, user_id="ann@corp.example.com"),
                                 make_event(2, user_id="bob@corp.example.com")])
    assert ann.user_id != bob.user_id
    assert "ann@" not in str(ann.user_id) and "bob@" not in str(bob.user_id)


def test_a_pseudonym_survives_a_restart(tmp_path: Path) -> None:
    before = redact(tmp_path, [make_event(user_id=EMAIL)])[0]
    after = redact(tmp_path, [make_event(user_id=EMAIL)])[0]  # a new processor, same data dir
    assert PSEUDONYM.fullmatch(str(before.user_id)) and after.user_id == before.user_id


def test_metadata_values_get_pseudonyms_and_keep_their_keys(tmp_path: Path) -> None:
    e = one(tmp_path, metadata={"customer": EMAIL, "tier": "gold"})
    assert e.metadata is not None and set(e.metadata) == {"customer", "tier"}
    assert PSEUDONYM.fullmatch(e.metadata["customer"]) and e.metadata["tier"] == "gold"


def test_a_secret_in_an_id_is_replaced_by_a_token_not_kept(tmp_path: Path) -> None:
    e = one(tmp_path, session_id=f"s-{AWS_KEY}", api_key_id=OPENAI_KEY)
    assert re.fullmatch(r"s-<AWS_KEY:[0-9a-f]{16}>", str(e.session_id))
    assert re.fullmatch(r"<OPENAI_KEY:[0-9a-f]{16}>", str(e.api_key_id))


def test_identifiers_mask_masks_ids_too(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(user_id=EMAIL)], identifiers="mask")[0]
    assert e.user_id == "<EMAIL>"


def test_a_hashed_email_is_the_same_token_in_a_message_and_in_user_id(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(user_id=EMAIL, input_messages=[
        {"role": "user", "content": f"I am {EMAIL}"}])], detectors={"email": "hash"})[0]
    assert e.input_messages == [{"role": "user", "content": f"I am {e.user_id}"}]


def test_drop_on_a_metadata_value_removes_that_key_only(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(metadata={"card": "4111 1111 1111 1111", "tier": "gold"})],
               detectors={"credit_card": "drop"})[0]
    assert e.metadata == {"tier": "gold"}


def test_a_custom_detector_anchored_on_a_whole_value_matches_an_id(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(user_id="EMP-004217", team="EMP-1")],
               custom=[{"name": "employee_id", "pattern": r"^EMP-\d{6}$"}])[0]
    assert re.fullmatch(r"<EMPLOYEE_ID:[0-9a-f]{16}>", str(e.user_id))
    assert e.team == "EMP-1"


def test_every_string_field_is_covered(tmp_path: Path) -> None:
    """Read from the Event definition: a string field added later is covered too."""
    fields: dict[str, Any] = {}
    for f in msgspec.structs.fields(Event):
        if f.name not in STRING_FIELDS:
            continue
        tp = str(f.type)
        fields[f.name] = (
            [Guardrail(rule=EMAIL, stage="input", action="block")] if f.name == "guardrails"
            else [{"role": "user", "content": EMAIL}] if tp.startswith("list[dict")
            else [EMAIL] if tp.startswith("list[") else {"k": EMAIL} if tp.startswith("dict")
            else EMAIL)
    e = redact(tmp_path, [Event(**fields)])[0]
    for name in STRING_FIELDS:
        value = msgspec.to_builtins(getattr(e, name))
        assert EMAIL not in str(value), f"{name} kept in clear: {value!r}"
        if name not in CORRELATION_KEYS:
            assert ("<EMAIL>" if name in TEXT_FIELDS else "<EMAIL:") in str(value), name
    assert set(CORRELATION_KEYS) == {"event_id", "trace_id", "span_id", "parent_span_id"}


def test_fields_listed_narrow_the_scan(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(error_message=EMAIL, user_id=EMAIL, metadata={"a": EMAIL},
                                     attributes={"a": EMAIL})], fields=["user_id"])[0]
    assert PSEUDONYM.fullmatch(str(e.user_id))
    assert (e.error_message, e.metadata, e.attributes) == (EMAIL, {"a": EMAIL}, {"a": EMAIL})


def test_exclude_leaves_a_whole_field_out_of_the_default(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(upstream="http://10.1.2.3:8000", user_id=EMAIL)],
               exclude=["upstream"])[0]
    assert e.upstream == "http://10.1.2.3:8000"
    assert PSEUDONYM.fullmatch(str(e.user_id))


@pytest.mark.parametrize(("config", "message"), [
    ({"fields": "everything"}, "expected `all` or a list"),
    ({"identifiers": "drop"}, "identifiers: expected hash or mask"),
    ({"exclude": ["metadata.a"]}, "whole fields only"),
    ({"exclude": ["user_id"], "fields": ["error_message"]}, "exclude narrows `fields: all`"),
])
def test_bad_field_config_is_refused_with_the_reason(config: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        convert(config, RedactConfig)


def test_a_batch_with_every_field_filled_is_scanned_in_one_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    find_all = DetectorSet.find_all
    monkeypatch.setattr(DetectorSet, "find_all",
                        lambda self, texts: calls.append(len(texts)) or find_all(self, texts))
    events = [make_event(i, user_id=f"u{i}@corp.example.com", error_message=f"e {AWS_KEY}",
                         metadata={"a": "1", "b": EMAIL}, finish_reasons=["stop"],
                         params={"user": EMAIL}, attributes={"x": [EMAIL]},
                         input_messages=[{"role": "user", "content": EMAIL}])
              for i in range(50)]
    kept = redact(tmp_path, events)
    assert len(calls) == 1
    assert EMAIL not in str([msgspec.to_builtins(e) for e in kept])
    assert AWS_KEY not in str([msgspec.to_builtins(e) for e in kept])


def test_an_email_in_a_metadata_key_becomes_a_pseudonym(tmp_path: Path) -> None:
    e = one(tmp_path, metadata={EMAIL: "1", "tier": "gold"})
    assert e.metadata is not None and EMAIL not in str(e.metadata)
    assert [bool(PSEUDONYM.fullmatch(k)) for k in e.metadata] == [True, False]
    assert e.redactions == {"email": 1}


def test_a_secret_in_a_nested_attribute_key_is_replaced(tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"tools": [{OPENAI_KEY: {"x": 1}}]},
            input_messages=[{"role": "user", "content": "hi", EMAIL: "x"}])
    assert OPENAI_KEY not in str(e.attributes) and EMAIL not in str(e.input_messages)
    assert e.attributes is not None and e.attributes["tools"][0] == {
        next(iter(e.attributes["tools"][0])): {"x": 1}}


def test_drop_on_a_metadata_key_removes_that_entry(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(metadata={EMAIL: "1", "tier": "gold"})],
               detectors={"email": "drop"})[0]
    assert e.metadata == {"tier": "gold"}


def test_an_email_in_a_guardrail_rule_becomes_a_pseudonym(tmp_path: Path) -> None:
    e = one(tmp_path, guardrails=[Guardrail(rule=EMAIL, stage="input", action="block",
                                            detector=f"sent by {EMAIL}")])
    assert e.guardrails is not None and EMAIL not in str(msgspec.to_builtins(e.guardrails))
    assert PSEUDONYM.fullmatch(e.guardrails[0].rule)
    assert e.guardrails[0].stage == "input" and e.redactions == {"email": 2}


# --- the correlation keys: replaced whole, shaped as ids, when they hold a finding ----


def test_an_email_trace_id_becomes_32_hex_the_same_for_every_event_of_the_trace(
        tmp_path: Path) -> None:
    first, second = redact(tmp_path, [make_event(1, trace_id=EMAIL),
                                      make_event(2, trace_id=EMAIL)])
    assert first.trace_id is not None and HEX32.fullmatch(first.trace_id)
    assert second.trace_id == first.trace_id


def test_an_api_key_event_id_becomes_a_uuid_the_same_on_a_retry(tmp_path: Path) -> None:
    sent = redact(tmp_path, [make_event(event_id=OPENAI_KEY)])[0]
    retried = redact(tmp_path, [make_event(event_id=OPENAI_KEY)])[0]
    assert OPENAI_KEY not in sent.event_id and uuid.UUID(sent.event_id).version == 8
    assert str(uuid.UUID(sent.event_id)) == sent.event_id  # lowercase, with its dashes
    assert retried.event_id == sent.event_id


def test_span_ids_with_a_finding_become_16_hex_and_keep_the_parent_link(
        tmp_path: Path) -> None:
    parent, child = redact(tmp_path, [make_event(1, span_id=EMAIL),
                                      make_event(2, span_id=AWS_KEY, parent_span_id=EMAIL)])
    assert parent.span_id is not None and HEX16.fullmatch(parent.span_id)
    assert child.span_id is not None and HEX16.fullmatch(child.span_id)
    assert child.parent_span_id == parent.span_id


def test_ordinary_ids_are_untouched(tmp_path: Path) -> None:
    ids = {"event_id": "0190f3a2-7c4e-7b1d-9a2f-3c5e8d1b6a40", "trace_id": TRACE_ID,
           "span_id": SPAN_ID, "parent_span_id": "b7ad6b7169203331"}
    e = one(tmp_path, **ids)
    assert {name: getattr(e, name) for name in ids} == ids and e.redactions is None


def test_a_numeric_event_id_that_passes_the_card_checksum_is_kept(tmp_path: Path) -> None:
    snowflake = "4904913942551986555"  # 19 digits, as Otoroshi's `@id`; a Visa-like prefix
    e = one(tmp_path, event_id=snowflake)
    assert e.event_id == snowflake and e.redactions is None


def test_a_hex_trace_id_holding_a_card_like_run_of_digits_is_kept(tmp_path: Path) -> None:
    trace_id = "ab4111111111111111cdef0123456789"
    e = one(tmp_path, trace_id=trace_id, span_id="4111111111111111")
    assert (e.trace_id, e.span_id) == (trace_id, "4111111111111111") and e.redactions is None


def test_a_replaced_id_is_counted_on_the_event_and_in_self_telemetry(tmp_path: Path) -> None:
    context = make_context(tmp_path, "redact")
    p = RedactProcessor(convert({}, RedactConfig), context)
    e = p.process([make_event(trace_id=EMAIL, event_id=OPENAI_KEY)])[0]
    assert e.redactions == {"email": 1, "openai_key": 1}
    registry = context.telemetry.registry
    assert metric_value(registry, "meterline_redact_redactions_total", detector="email") == 1


def test_drop_on_an_id_replaces_it_as_the_id_cannot_be_dropped(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(trace_id=EMAIL)], detectors={"email": "drop"})[0]
    assert e.trace_id is not None and HEX32.fullmatch(e.trace_id)


def test_drop_event_on_an_id_drops_the_event(tmp_path: Path) -> None:
    assert redact(tmp_path, [make_event(trace_id=EMAIL)], detectors={"email": "drop_event"}) == []


def test_an_id_listed_in_fields_is_replaced_whole(tmp_path: Path) -> None:
    e = redact(tmp_path, [make_event(trace_id=f"t-{EMAIL}")], fields=["trace_id"])[0]
    assert e.trace_id is not None and HEX32.fullmatch(e.trace_id)


def test_a_replaced_trace_id_is_the_exported_span_s_trace_id(tmp_path: Path) -> None:
    e = one(tmp_path, trace_id=EMAIL, span_id=EMAIL)
    span = to_traces_request([e]).resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id.hex(), span.span_id.hex()) == (e.trace_id, e.span_id)


MISTRAL_KEY = "Xq7LmN2pR9sT4vW8yZ1aB3cD5eF6gH0j"  # no marker: known only by its name


def test_a_key_without_a_marker_under_a_secret_naming_param_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, params={"api_key": MISTRAL_KEY, "temperature": 0.2})
    assert e.params == {"api_key": "<SECRET>", "temperature": 0.2}
    assert e.redactions == {"secret": 1}


def test_a_captured_header_attribute_naming_a_key_is_masked_item_by_item(
        tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"http.request.header.api-key": [MISTRAL_KEY],
                                  "http.request.header.accept": ["application/json"]})
    assert e.attributes == {"http.request.header.api-key": ["<SECRET>"],
                            "http.request.header.accept": ["application/json"]}


def test_a_metadata_value_under_a_secret_naming_key_gets_a_pseudonym(tmp_path: Path) -> None:
    e = one(tmp_path, metadata={"db_password": "hunter2", "customer": "acme"})
    assert re.fullmatch(r"<SECRET:[0-9a-f]{16}>", e.metadata["db_password"])
    assert e.metadata["customer"] == "acme"
    assert e.redactions == {"secret": 1}  # (its placeholder is not found again)


def test_a_bare_token_key_masks_only_a_value_that_reads_as_a_key(tmp_path: Path) -> None:
    e = one(tmp_path, attributes={"llm.token": MISTRAL_KEY, "token": "Hello"})
    assert e.attributes == {"llm.token": "<SECRET>", "token": "Hello"}


def test_a_drop_action_drops_the_entry_named_as_a_secret(tmp_path: Path) -> None:
    [e] = redact(tmp_path, [make_event(params={"api_key": MISTRAL_KEY, "top_p": 1.0})],
                 detectors={"secret": "drop"})
    assert e.params == {"top_p": 1.0}


def test_a_value_under_a_secret_naming_key_deeper_in_params_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, params={"extra_headers": {"api-key": MISTRAL_KEY, "x-trace": "on"}})
    assert e.params == {"extra_headers": {"api-key": "<SECRET>", "x-trace": "on"}}
    assert e.redactions == {"secret": 1}


def test_a_list_under_a_secret_naming_key_deeper_in_params_is_masked_item_by_item(
        tmp_path: Path) -> None:
    e = one(tmp_path, params={"extra_headers": {"api-key": [MISTRAL_KEY, MISTRAL_KEY[::-1]],
                                                "x-trace": ["on"]}})
    assert e.params == {"extra_headers": {"api-key": ["<SECRET>", "<SECRET>"],
                                          "x-trace": ["on"]}}
    assert e.redactions == {"secret": 2}


def test_a_key_naming_secrets_in_the_plural_is_a_secret_naming_key(tmp_path: Path) -> None:
    e = one(tmp_path, params={"api_keys": [MISTRAL_KEY], "tokens": ["Hello", "world"]})
    assert e.params == {"api_keys": ["<SECRET>"], "tokens": ["Hello", "world"]}


def test_a_list_of_lists_under_a_secret_naming_key_in_a_message_is_masked(
        tmp_path: Path) -> None:
    e = one(tmp_path, input_messages=[{"role": "tool",
                                       "content": {"api_keys": [[MISTRAL_KEY], MISTRAL_KEY]}}])
    assert e.input_messages == [{"role": "tool",
                                 "content": {"api_keys": [["<SECRET>"], "<SECRET>"]}}]
    assert e.redactions == {"secret": 2}


def test_a_list_under_an_ordinary_key_inside_a_secret_named_dict_is_not_taken_as_named(
        tmp_path: Path) -> None:
    e = one(tmp_path, params={"extra": {"password": {"hints": ["Xq7LmN2pR9sT4vW8"]}}})
    assert e.params == {"extra": {"password": {"hints": ["Xq7LmN2pR9sT4vW8"]}}}


def test_a_value_under_a_secret_naming_key_in_a_message_is_masked(tmp_path: Path) -> None:
    e = one(tmp_path, input_messages=[{"role": "tool", "content": {"password": "hunter2"}}])
    assert e.input_messages == [{"role": "tool", "content": {"password": "<SECRET>"}}]
