"""The one field path (meterline/fieldpath.py): parsed once, compiled to getters and
setters, shared by filters, labels, redact, Kafka keys, Prometheus labels and ClickHouse
dimensions."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from meterline.event import Event
from meterline.fieldpath import MISSING, FieldPath, ReadPath


def _event(**fields: object) -> Event:
    return Event(event_id="e1", timestamp=datetime(2025, 1, 1, tzinfo=UTC), **fields)


@pytest.mark.parametrize(("text", "error"), [
    ("tema", "'tema' is not an event field, metadata.KEY or attributes.KEY"),
    ("provider.x", "'provider.x' is not an event field"),
    ("params.temperature", "'params.temperature' is not an event field"),
    ("metadata.", "'metadata.': expected a key after 'metadata.'"),
    ("", "'' is not an event field"),
])
def test_a_parse_error_names_the_path(text: str, error: str) -> None:
    with pytest.raises(ValueError) as raised:
        FieldPath(text)
    assert str(raised.value).startswith(error)


def test_a_read_path_also_names_params_keys() -> None:
    path = ReadPath("params.temperature")
    assert (path.kind, path.key) == ("params", "temperature")
    assert path.get(_event(params={"temperature": 0.2})) == 0.2
    with pytest.raises(ValueError, match=r"^'model' is not an event field, metadata.KEY, "
                                         r"attributes.KEY or params.KEY$"):
        ReadPath("model")


@pytest.mark.parametrize(("cls", "error"), [
    (FieldPath, "expected a field name or metadata.KEY, got 3"),
    (ReadPath, "expected an event field name, got 3"),
])
def test_config_must_write_a_string(cls: type[FieldPath], error: str) -> None:
    with pytest.raises(ValueError, match=f"^{error}$"):
        cls.from_config(3)


def test_getters_on_an_event() -> None:
    e = _event(team="core", metadata={"customer_id": "c1"}, attributes={"tier": 2})
    assert FieldPath("team").get(e) == "core"
    assert FieldPath("metadata.customer_id").get(e) == "c1"
    assert FieldPath("attributes.tier").get(e) == 2
    assert FieldPath("metadata.absent").get(e) is None
    assert FieldPath("organization").get(e) is None
    assert FieldPath("attributes.tier").get(_event()) is None  # no map at all
    # a key with dots is one key of the map
    assert FieldPath("metadata.a.b").get(_event(metadata={"a.b": "x"})) == "x"
    # with another default (Prometheus labels: "" for absent)
    assert FieldPath("metadata.absent").getter("")(e) == ""
    assert FieldPath("organization").getter("")(e) == ""
    assert FieldPath("team").getter("")(e) == "core"


def test_lookup_reads_an_event_and_decoded_json_alike() -> None:
    e = _event(provider="openai", metadata={"env": "prod"})
    as_json = msgspec.to_builtins(e)
    for obj in (e, as_json):
        assert FieldPath("provider").lookup(obj) == "openai"
        assert FieldPath("metadata.env").lookup(obj) == "prod"
        assert FieldPath("metadata.nope").lookup(obj) is MISSING
        assert FieldPath("team").lookup(obj) is MISSING  # null is absent
    # a filter's key: any JSON, a dotted key tried whole before it walks
    raw = {"request": {"headers": {"x-team": "a"}}, "a.b": 1, "a": {"b": 2}}
    assert FieldPath.json("request.headers.x-team").lookup(raw) == "a"
    assert FieldPath.json("a.b").lookup(raw) == 1
    assert FieldPath.json("a.c").lookup(raw) is MISSING
    assert FieldPath.json("request.headers").lookup("not an object") is MISSING
    assert FieldPath.json("anything").lookup(e) is MISSING


def test_the_setter_writes_labels() -> None:
    e = _event()
    FieldPath("metadata.customer_id").set(e, 42)  # metadata holds strings
    FieldPath("attributes.tier").set(e, 2)
    FieldPath("team").set(e, "core")
    assert (e.metadata, e.attributes, e.team) == ({"customer_id": "42"}, {"tier": 2}, "core")
    FieldPath("metadata.region").set(e, "eu")
    assert e.metadata == {"customer_id": "42", "region": "eu"}
    FieldPath("metadata.customer_id").delete(e)
    FieldPath("team").delete(e)
    assert (e.metadata, e.team) == ({"region": "eu"}, None)
    assert not FieldPath("event_id").deletable
    assert FieldPath("metadata.x").holds_string and not FieldPath("input_tokens").holds_string


def test_paths_compare_by_their_text() -> None:
    assert FieldPath("metadata.a") == FieldPath("metadata.a") == ReadPath("metadata.a")
    assert len({FieldPath("team"), FieldPath("team")}) == 1
    assert repr(ReadPath("team")) == "ReadPath('team')"
