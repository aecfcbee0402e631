"""The event record and its versioned JSON form."""

import re

import msgspec
import pytest

from meterline.event import (
    JSONL_PIECE,
    SCHEMA_VERSION,
    Event,
    clone,
    from_json,
    jsonl_pieces,
    list_from_json,
    pack,
    to_json,
    to_jsonl,
    unpack,
    uuid7,
)
from tests.helpers import make_event


def full_event() -> Event:
    return make_event(
        1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
        streaming=True, params={"temperature": 0.2, "max_tokens": 64},
        finish_reasons=["stop"], cache_read_tokens=5, reasoning_tokens=3, ttft_ms=80.0,
        itl_ms=12.5, metadata={"customer": "acme"}, input_messages=[
            {"role": "user", "content": "hi"}], cost_usd=0.00012, sample_weight=4.0,
        redactions={"email": 2}, attributes={"x": [1, 2]})


def test_json_round_trip_is_exact():
    event = full_event()
    assert from_json(to_json(event)) == event


def test_jsonl_in_pieces_is_the_whole_jsonl_a_few_events_a_piece():
    events = [make_event(i) for i in range(JSONL_PIECE * 3 + 5)]
    pieces = list(jsonl_pieces(events))
    assert b"".join(pieces) == to_jsonl(events)
    assert [p.count(b"\n") for p in pieces] == [JSONL_PIECE] * 3 + [5]


def test_jsonl_pieces_are_encoded_as_they_are_taken():
    """A writer holds one piece at a time, never a whole batch as JSON: a piece after the
    first is not encoded (here: would fail) until it is taken."""
    events = [make_event(i) for i in range(JSONL_PIECE + 1)]
    events[-1].attributes = {"unencodable": object()}
    pieces = jsonl_pieces(events)
    assert next(pieces).count(b"\n") == JSONL_PIECE
    with pytest.raises(TypeError):
        next(pieces)


def test_json_form_carries_the_schema_version():
    assert msgspec.json.decode(to_json(make_event()))["schema_version"] == SCHEMA_VERSION


def test_json_form_omits_unreported_fields():
    data = msgspec.json.decode(to_json(Event(event_id="a", timestamp=1)))
    assert data == {"schema_version": 1, "event_id": "a", "timestamp": 1}


def test_decoding_refuses_another_schema_version():
    with pytest.raises(msgspec.ValidationError, match="schema_version"):
        from_json(b'{"schema_version": 2, "event_id": "a"}')


def test_missing_id_and_timestamp_are_generated():
    event = from_json(b'{"provider": "openai"}')
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        event.event_id)
    assert event.timestamp > 1_700_000_000 * 10**9


def test_uuid7_ids_sort_by_creation_time():
    ids = [uuid7() for _ in range(3)]
    assert ids[0][:13] <= ids[1][:13] <= ids[2][:13]
    assert len(set(ids)) == 3


def test_a_batch_decodes_in_one_call():
    events = [make_event(i) for i in range(3)]
    assert list_from_json(b"[" + b",".join(to_json(e) for e in events) + b"]") == events


def test_jsonl_has_one_event_per_line():
    events = [make_event(i) for i in range(3)]
    lines = to_jsonl(events).splitlines()
    assert [from_json(line) for line in lines] == events


def test_packed_form_round_trips():
    events = [full_event(), make_event(2)]
    assert unpack(pack(events)) == events


def test_clone_gives_independent_copies():
    events = [full_event()]
    copies = clone(events)
    copies[0].input_messages[0]["content"] = "changed"
    assert events[0].input_messages[0]["content"] == "hi"
