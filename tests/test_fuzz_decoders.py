"""Fuzzing the webhook decoders (meterline JSON, Otoroshi `LLMUsageAudit`, LiteLLM
`StandardLoggingPayload`): hostile items are refused with a reason, never an exception,
and the webhook receiver never answers 500."""

from __future__ import annotations

import gzip
import http.client
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline import bounds
from meterline.event import Event, pack, unpack
from meterline.receivers.decoders import Decoded, DecodeError, decode_body, decode_item
from tests.fuzz_helpers import deep, fuzz, items, json_bodies, service_in_thread, within
from tests.helpers import free_port


def _check_events(events: list[Event]) -> None:
    assert all(isinstance(e, Event) for e in events)
    # what the queues store must encode, and decode again on a deeper stack than the
    # decoder's (the main process unpacks a worker's batch in a request handler)
    assert _deeper_by(300, lambda: unpack(pack(events))) == events
    assert bounds.refused(events) == {}  # the decoders keep out-of-bounds events out


def _deeper_by(frames: int, call: Callable[[], Any]) -> Any:
    return call() if frames == 0 else _deeper_by(frames - 1, call)


def _check_reason(reason: str) -> None:
    assert reason.strip(), "a refusal must say why"
    # what `decode_body` and `decode_item` answer for an exception no decoder foresaw (a bug
    # in a decoder, kept from failing the batch): the fuzz suite wants none
    assert not reason.startswith("cannot decode: "), reason


@fuzz(400)
@given(items() | deep(st.integers(100, 3000)))
def test_any_item_becomes_an_event_in_bounds_or_a_decode_error_with_a_reason(item: Any) -> None:
    try:
        event = within(2, decode_item, item)
    except DecodeError as e:
        _check_reason(str(e))
        return
    _check_events([event])


@pytest.mark.parametrize("levels", [99, 300, 600, 800, 950, 3000])
def test_an_item_nested_at_any_depth_is_an_event_that_unpacks_deeper_or_refused(levels):
    body = (b'[{"event_id": "e", "provider": "openai", "params": {"p": ' + b"[" * levels
            + b"]" * levels + b"}}]")
    try:
        decoded = decode_body(body)
    except DecodeError as e:
        _check_reason(str(e))
        return
    _check_events(decoded.events)
    for _, reason in decoded.rejected:
        _check_reason(reason)


@fuzz(200)
@given(json_bodies())
def test_any_body_gets_events_or_reasons_never_an_exception(body_ndjson: tuple[bytes, bool]
                                                            ) -> None:
    body, ndjson = body_ndjson
    try:
        decoded = within(2, decode_body, body, ndjson)
    except DecodeError as e:
        _check_reason(str(e))
        return
    assert isinstance(decoded, Decoded)
    _check_events(decoded.events)
    for index, reason in decoded.rejected:
        assert isinstance(index, int) and index >= 0
        assert isinstance(reason, str)
        _check_reason(reason)


# --- end to end: the webhook receiver ---------------------------------------------------


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Any:
    port = free_port()
    tmp = tmp_path_factory.mktemp("fuzz-webhook")
    with service_in_thread(
            {"webhook": {"listen": f"127.0.0.1:{port}", "max_body_mb": 0.25}}, tmp):
        yield port


_ENCODINGS = st.sampled_from([None, "gzip", "deflate", "gzip-bomb", "gzip-garbage", "br",
                              "zstd", "identity", "gzip, gzip"])
_TYPES = st.sampled_from(["application/json", "application/x-ndjson",
                          "application/json; charset=latin-1", "text/plain", None,
                          "application/JSON", "multipart/form-data; boundary=x"])


def _encode(body: bytes, encoding: str | None) -> tuple[bytes, str | None]:
    if encoding == "gzip":
        return gzip.compress(body), encoding
    if encoding == "deflate":
        return zlib.compress(body), encoding
    if encoding == "gzip-bomb":  # 8 MB of spaces in 8 KB: over max_body_mb once inflated
        return gzip.compress(b" " * (8 << 20), 9), "gzip"
    if encoding == "gzip-garbage":
        return body, "gzip"
    return body, encoding


@fuzz(40)
@given(json_bodies(), _TYPES, _ENCODINGS)
def test_the_webhook_answers_every_body_with_a_status_and_a_json_reason_never_500(
        webhook: int, body_ndjson: tuple[bytes, bool], ctype: str | None,
        encoding: str | None) -> None:
    body, encoding = _encode(body_ndjson[0], encoding)
    headers = {"Content-Type": ctype} if ctype else {}
    if encoding:
        headers["Content-Encoding"] = encoding
    conn = http.client.HTTPConnection("127.0.0.1", webhook, timeout=10)
    try:
        conn.request("POST", "/v1/events", body=body, headers=headers)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status in (200, 400, 413, 415, 429), (status, raw[:300])
    answer = msgspec.json.decode(raw)
    assert isinstance(answer, dict) and ("error" in answer or "accepted" in answer), answer
    if "error" in answer:
        assert isinstance(answer["error"], str) and answer["error"].strip()
    else:
        assert all(r["reason"].strip() for r in answer["rejected"])
