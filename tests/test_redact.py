"""The redact processor: detectors measured on the labelled corpus, and the actions."""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from meterline.config import convert
from meterline.event import Event
from meterline.processors.redact import RedactConfig, RedactProcessor
from meterline.processors.redact.detectors import (
    _MARKED_KEYS,
    BUILTIN,
    NAMES,
    _token,
    iban_valid,
    luhn,
)
from meterline.processors.redact.engine import DetectorSet
from tests.helpers import FIXTURES, make_context, make_event, metric_value

CORPUS = FIXTURES / "redact-corpus.yaml"


def redactor(tmp_path: Path, **config: Any) -> tuple[RedactProcessor, CollectorRegistry]:
    context = make_context(tmp_path, "redact")
    return RedactProcessor(convert(config, RedactConfig), context), context.telemetry.registry


def chat(text: str, **fields: Any) -> Event:
    return make_event(input_messages=[{"role": "user", "content": text}], **fields)


@cache
def corpus_counts() -> tuple[Counter[str], Counter[str], Counter[str]]:
    """True positives, false positives and false negatives by detector. A finding is
    right when it covers a labelled value of its own detector."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    detectors = DetectorSet(list(BUILTIN))
    for item in yaml.safe_load(CORPUS.read_text(encoding="utf-8")):
        text = item["text"]
        expected = []
        for detector, values in (item.get("pii") or {}).items():
            for value in set(values):
                start = text.find(value)
                assert start >= 0, f"labelled value not in its text: {value!r}"
                while start >= 0:
                    expected.append((start, start + len(value), detector))
                    start = text.find(value, start + 1)
        found = [(f.start, f.end, NAMES[f.detector]) for f in detectors.find(text)]
        for start, end, detector in found:
            hit = any(d == detector and start <= s and end >= e for s, e, d in expected)
            (tp if hit else fp)[detector] += 1
        for s, e, d in expected:
            if not any(d == detector and start <= s and end >= e
                       for start, end, detector in found):
                fn[d] += 1
    return tp, fp, fn


@pytest.mark.parametrize("detector", NAMES)
def test_detector_recall_and_precision_on_the_labelled_corpus(detector: str) -> None:
    tp, fp, fn = corpus_counts()
    assert tp[detector] + fn[detector] >= 15, "too few labelled values to measure"
    recall = tp[detector] / (tp[detector] + fn[detector])
    precision = tp[detector] / (tp[detector] + fp[detector])
    assert recall >= 0.98, f"{detector}: recall {recall:.3f} ({fn[detector]} missed)"
    assert precision >= 0.95, f"{detector}: precision {precision:.3f} ({fp[detector]} wrong)"


@pytest.mark.parametrize("joiner", ["-", "_"])
def test_a_key_joined_to_the_word_before_it_is_masked(tmp_path: Path, joiner: str) -> None:
    p, _ = redactor(tmp_path)
    key = "sk-proj-bqDTSOmRm5KnZa4ypm09T3BlbkFJSEinwyr0vjvnCIno4esc"
    e = p.process([chat(f"cache key req{joiner}{key} missed")])[0]
    assert e.input_messages == [
        {"role": "user", "content": f"cache key req{joiner}<OPENAI_KEY> missed"}]


ENGINE = DetectorSet(list(BUILTIN))


@pytest.mark.parametrize(("marker", "rest"), _MARKED_KEYS, ids=[m for m, _ in _MARKED_KEYS])
def test_a_key_known_by_its_marker_is_found_in_a_sentence(marker: str, rest: str) -> None:
    @settings(max_examples=3, derandomize=True, database=None, deadline=None)
    @given(st.from_regex(f"(?:{marker}){rest}", fullmatch=True).filter(_token))
    def found(key: str) -> None:
        text = f"the deploy log shows {key} before the 401"
        assert [(f.start, f.end, NAMES[f.detector]) for f in ENGINE.find(text)] == [
            (21, 21 + len(key), "api_key")]

    found()


@pytest.mark.parametrize(("text", "secret"), [
    ("the app registration's secret is Yk28Q~Zq9_Lm2.Xv7~Tn4-Pw1.Ks6_Rd3.Yh8~Cj (expires)",
     "Yk28Q~Zq9_Lm2.Xv7~Tn4-Pw1.Ks6_Rd3.Yh8~Cj"),  # an Entra ID client secret: Q~ inside
    ("POST https://acme.webhook.office.com/webhookb2/3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b@"
     "9e8d7c6b-5a49-4382-8716-a5b4c3d2e1f0/IncomingWebhook/0f9e8d7c6b5a49382716a5b4c3d2e1f0/"
     "7c6b5a49-3827-416a-b4c3-d2e1f00f9e8d fails",
     "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b@9e8d7c6b-5a49-4382-8716-a5b4c3d2e1f0/IncomingWebhook/"
     "0f9e8d7c6b5a49382716a5b4c3d2e1f0/7c6b5a49-3827-416a-b4c3-d2e1f00f9e8d"),  # Teams
])
def test_a_key_known_by_its_place_is_found(text: str, secret: str) -> None:
    start = text.index(secret)
    assert [(f.start, f.end, NAMES[f.detector]) for f in ENGINE.find(text)] == [
        (start, start + len(secret), "api_key")]


@pytest.mark.parametrize("written", [
    "export AUTH_BEARER_TOKEN='{}'", "ingest_bearer: {}", "bearer={}", "Bearer {}"])
def test_a_bearer_token_named_by_a_variable_or_a_key_is_masked(tmp_path: Path,
                                                                 written: str) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([chat(written.format("q8W3nZt5vYb2Lk9Pd7Rx4Mc6Hs1Jf0Ge"))])[0]
    assert e.input_messages[0]["content"] == written.format("<BEARER_TOKEN>")


@pytest.mark.parametrize(("line", "redacted"), [
    ("MISTRAL_API_KEY=Xq7LmN2pR9sT4vW8yZ1aB3cD5eF6gH0j", "MISTRAL_API_KEY=<SECRET>"),
    ('{"api-key": "0f9e8d7c6b5a49382716a5b4c3d2e1f0"}', '{"api-key": "<SECRET>"}'),
    ("SECRET_KEY=CHANGE_ME_BEFORE_PRODUCTION_2024", None),  # a name, not a key
    ('"NextToken": "9f4d9f69-275a-41fe-b58e-2b837bd9ba48"', None),  # AWS's pagination
])
def test_a_value_named_as_a_secret_is_masked_unless_it_reads_as_a_name(
        tmp_path: Path, line: str, redacted: str | None) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([chat(line)])[0]
    assert e.input_messages[0]["content"] == (redacted or line)


@pytest.mark.parametrize("suffix", ["_old", "-prod"])
def test_a_google_key_joined_to_the_word_after_it_is_masked(tmp_path: Path,
                                                            suffix: str) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([chat(f"key AIzaSyB7rq2LmX9vTn4Kd8Wc1Yp6Hs3Jf0Ge5Qa{suffix} in the app")])[0]
    assert e.input_messages[0]["content"] == f"key <GOOGLE_API_KEY>{suffix} in the app"


def test_mask_replaces_each_finding_with_a_typed_placeholder(tmp_path: Path) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([chat("Mail jane.doe@acme-corp.com or call +44 20 7946 0958 today.")])[0]
    assert e.input_messages == [
        {"role": "user", "content": "Mail <EMAIL> or call <PHONE> today."}]
    assert e.redactions == {"email": 1, "phone": 1}


def test_every_string_inside_messages_is_scanned(tmp_path: Path) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([make_event(
        input_messages=[{"role": "user", "content": [
            {"type": "text", "text": "card 4111 1111 1111 1111"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUtJQTEyMzQ1"}}]}],
        output_messages=[{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "email", "arguments": '{"to": "bob@example.org"}'}}]}],
    )])[0]
    assert e.input_messages is not None and e.output_messages is not None
    parts = e.input_messages[0]["content"]
    assert parts[0]["text"] == "card <CREDIT_CARD>"
    assert parts[1]["image_url"]["url"] == "data:image/png;base64,QUtJQTEyMzQ1"
    call = e.output_messages[0]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"to": "<EMAIL>"}'
    assert call["id"] == "call_1"


def test_a_list_of_fields_narrows_the_scan_to_the_messages_and_those(tmp_path: Path) -> None:
    p, _ = redactor(tmp_path, fields=["error_message", "metadata.note"])
    e = p.process([chat("mail ann@corp.example.com",
                        error_message="user ann@corp.example.com not allowed",
                        user_id="bob@corp.example.com",
                        metadata={"note": "ssn 123-45-6789", "customer": "a@b.co"})])[0]
    assert e.input_messages == [{"role": "user", "content": "mail <EMAIL>"}]
    assert e.error_message == "user <EMAIL> not allowed"
    assert e.metadata is not None and e.metadata["customer"] == "a@b.co"
    assert e.metadata["note"].startswith("ssn <SSN:")  # a metadata value is a label
    assert e.user_id == "bob@corp.example.com"


def test_hash_gives_the_same_token_for_the_same_value_across_events(tmp_path: Path) -> None:
    config = {"detectors": {"email": "hash"}, "hash_key": "k" * 32}
    p, _ = redactor(tmp_path, **config)
    first, second, other = p.process([chat("from ann@corp.example.com"),
                                      chat("cc ann@corp.example.com"),
                                      chat("from bob@corp.example.com")])
    token = first.input_messages[0]["content"].removeprefix("from ")  # type: ignore[index]
    assert token.startswith("<EMAIL:") and len(token) == len("<EMAIL:>") + 16
    assert second.input_messages[0]["content"] == f"cc {token}"  # type: ignore[index]
    assert other.input_messages[0]["content"] != f"from {token}"  # type: ignore[index]
    again, _ = redactor(tmp_path / "elsewhere", **config)  # another daemon, same key
    assert again.process([chat("ann@corp.example.com")])[0].input_messages == [
        {"role": "user", "content": token}]


def test_hash_key_is_kept_in_the_data_dir_when_not_configured(tmp_path: Path) -> None:
    first, _ = redactor(tmp_path, detectors={"email": "hash"})
    second, _ = redactor(tmp_path, detectors={"email": "hash"})  # a restart
    a = first.process([chat("ann@corp.example.com")])[0]
    b = second.process([chat("ann@corp.example.com")])[0]
    assert a.input_messages == b.input_messages
    key_file = tmp_path / "redact" / "redact.key"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_drop_removes_the_field_that_held_the_finding(tmp_path: Path) -> None:
    p, _ = redactor(tmp_path, detectors={"private_key": "drop"})
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    e = p.process([chat(f"use {key}", output_messages=[
        {"role": "assistant", "content": "mail ops@corp.example.com"}])])[0]
    assert e.input_messages is None
    assert e.output_messages == [{"role": "assistant", "content": "mail <EMAIL>"}]
    assert e.redactions == {"private_key": 1, "email": 1}


def test_drop_event_keeps_the_event_out_and_counts_it(tmp_path: Path) -> None:
    p, registry = redactor(tmp_path, detectors={"credit_card": "drop_event"})
    kept = p.process([chat("card 5555 5555 5555 4444"), chat("nothing here")])
    assert [e.input_messages for e in kept] == [[{"role": "user", "content": "nothing here"}]]
    assert metric_value(registry, "meterline_redact_dropped_events_total") == 1
    assert metric_value(registry, "meterline_redact_redactions_total",
                        detector="credit_card") == 1


def test_redactions_are_counted_by_detector_in_the_event_and_self_telemetry(
        tmp_path: Path) -> None:
    p, registry = redactor(tmp_path)
    e = p.process([chat("a@corp.example.com b@corp.example.com 10.1.2.30",
                        redactions={"email": 2})])[0]
    assert e.redactions == {"email": 4, "ipv4": 1}
    assert metric_value(registry, "meterline_redact_redactions_total", detector="email") == 2
    assert metric_value(registry, "meterline_redact_redactions_total", detector="ipv4") == 1


@pytest.mark.parametrize("off", ["off", False])  # YAML reads a bare `off` as false
def test_off_disables_a_detector(tmp_path: Path, off: str | bool) -> None:
    p, _ = redactor(tmp_path, detectors={"ipv4": off})
    e = p.process([chat("server 203.0.113.9")])[0]
    assert e.input_messages == [{"role": "user", "content": "server 203.0.113.9"}]
    assert e.redactions is None


def test_custom_regex_detector_runs_before_the_built_ins(tmp_path: Path) -> None:
    p, _ = redactor(tmp_path, custom=[{"name": "employee_id", "pattern": r"EMP-\d{6}"}])
    e = p.process([chat("badge EMP-004217, mail x@corp.example.com")])[0]
    assert e.input_messages == [{"role": "user", "content": "badge <EMPLOYEE_ID>, mail <EMAIL>"}]


@pytest.mark.parametrize(("config", "message"), [
    ({"detectors": {"emails": "mask"}}, "unknown detector emails"),
    ({"detectors": {"email": "blur"}}, "detector email: unknown action 'blur' \\(expected mask"),
    ({"custom": [{"name": "x", "pattern": "("}]}, "invalid regular expression"),
    ({"custom": [{"name": "email", "pattern": "x"}]}, "is a built-in detector"),
    ({"hash_key": "short"}, "at least 16 characters"),
])
def test_bad_config_is_refused_with_the_reason(config: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        convert(config, RedactConfig)


def test_what_was_found_never_reaches_the_logs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, _ = redactor(tmp_path, detectors={"email": "drop_event"})
    p.process([chat("secret-person@corp.example.com")])
    captured = capsys.readouterr()
    assert "secret-person" not in captured.out + captured.err


def test_luhn_and_iban_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83WEST12345698765432")



def test_an_email_in_a_message_role_is_masked_while_tool_call_ids_are_kept(
        tmp_path: Path) -> None:
    p, _ = redactor(tmp_path)
    e = p.process([make_event(
        input_messages=[{"role": "jane.doe@acme-corp.com", "content": "hi"}],
        output_messages=[{"role": "assistant", "tool_calls": [
            {"id": "call_4111111111111111", "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]}])])[0]
    assert e.input_messages == [{"role": "<EMAIL>", "content": "hi"}]
    assert e.output_messages is not None
    assert e.output_messages[0]["tool_calls"][0]["id"] == "call_4111111111111111"
