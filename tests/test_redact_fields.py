"""The redact processor beyond the messages: with the default `redact: {}`, every string
field of the event is scanned; identifiers get stable pseudonyms, free text is masked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meterline.config import convert
from meterline.event import Event, Guardrail
from meterline.processors.redact import (
    EXCLUDED_FIELDS,
    STRING_FIELDS,
    TEXT_FIELDS,
    RedactConfig,
    RedactProcessor,
)
from meterline.processors.redact.engine import DetectorSet
from tests.helpers import make_context, make_event

EMAIL = "jane.doe@acme-corp.com"
OPENAI_KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78St90Uv12Wx34"
ANTHROPIC_KEY = "sk-ant-api03-" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe" * 3 + "-AbCdEfAA"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PSEUDONYM = re.compile(r"<EMAIL:[0-9a-f]{16}>")


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


def test_every_string_field_but_the_correlation_keys_is_covered(tmp_path: Path) -> None:
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
        if name in EXCLUDED_FIELDS:
            assert EMAIL in str(value), name
        else:
            assert EMAIL not in str(value), f"{name} kept in clear: {value!r}"
            assert ("<EMAIL>" if name in TEXT_FIELDS else "<EMAIL:") in str(value), name
    assert set(EXCLUDED_FIELDS) == {"event_id", "trace_id", "span_id", "parent_span_id"}


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
