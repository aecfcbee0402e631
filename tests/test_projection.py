"""Projections (`meterline/projection.py`): every operator of Otoroshi's `Projection.project`
as `../shared/FORMATS.md` states it, the blueprints refused at validation, where fixed-schema
exporters refuse one, and a pipeline whose two file exporters write two shapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from meterline.component import ExportBatch
from meterline.config import convert
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.debug import DebugConfig, DebugExporter
from meterline.exporters.file import FileExporterConfig
from meterline.exporters.kafka.exporter import KafkaExporterConfig
from meterline.exporters.kafka.messages import MessageBuilder
from meterline.exporters.otlp.exporter import OtlpExporterConfig
from meterline.exporters.prometheus.exporter import PrometheusConfig
from meterline.projection import Projection, jsonl
from meterline.selectors import SelectorError
from tests.helpers import (
    FILE_OUT,
    event_dicts,
    eventually,
    free_port,
    make_context,
    make_event,
    pipeline,
    post_json,
    read_jsonl,
    running,
)

EVENT: dict[str, Any] = {
    "event_id": "e1",
    "provider": "openai",
    "status_code": 200,
    "streaming": False,
    "metadata": {"team": "search", "tier.name": "gold"},
    "input_messages": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": "hi"}],
    "attributes": {"http": {"headers": [{"key": "X-Request-Id", "value": "r-42"},
                                        {"key": "User-Agent", "value": "curl"}]},
                   "a/b": {"c~d": 7}},
}


def project(blueprint: Any, doc: Any = None) -> Any:
    return Projection(blueprint).apply(EVENT if doc is None else doc)


# --- whole event, true, rename ---------------------------------------------------------

def test_an_empty_blueprint_exports_the_event_unchanged():
    assert project({}) == EVENT


def test_true_copies_a_top_level_field():
    assert project({"provider": True}) == {"provider": "openai"}


def test_true_on_an_absent_field_gives_null():
    assert project({"team": True}) == {"team": None}


def test_true_copies_a_field_whole_not_a_dotted_path():
    assert project({"metadata.team": True}) == {"metadata.team": None}


def test_a_string_renames_the_field():
    assert project({"provider": "vendor"}) == {"vendor": "openai"}


def test_a_renamed_absent_field_gives_null_under_the_new_name():
    assert project({"team": "owner"}) == {"owner": None}


def test_the_result_follows_the_blueprint_order_not_the_event_order():
    assert list(project({"status_code": True, "event_id": True})) == ["status_code",
                                                                      "event_id"]


def test_other_entries_are_ignored():
    assert project({"provider": False, "event_id": 3, "status_code": None,
                    "streaming": [1]}) == {}


# --- $value, $at, $atIf ------------------------------------------------------------------

def test_value_is_a_constant():
    assert project({"source": {"$value": {"kind": "llm", "n": [1]}}}) == {
        "source": {"kind": "llm", "n": [1]}}


def test_at_reads_a_dotted_path():
    assert project({"team": {"$at": "metadata.team"}}) == {"team": "search"}


def test_at_indexes_arrays_with_numbers():
    assert project({"first": {"$at": "input_messages.1.content"}}) == {"first": "hi"}


def test_at_on_an_absent_path_gives_null():
    assert project({"x": {"$at": "metadata.nobody.deeper"}}) == {"x": None}


def test_at_if_gives_the_value_when_the_predicate_holds():
    blueprint = {"team": {"$atIf": {"path": "metadata.team",
                                    "predicate": {"at": "provider", "value": "openai"}}}}
    assert project(blueprint) == {"team": "search"}


def test_at_if_gives_null_when_the_predicate_fails():
    blueprint = {"team": {"$atIf": {"path": "metadata.team",
                                    "predicate": {"at": "provider", "value": "mistral"}}}}
    assert project(blueprint) == {"team": None}


def test_at_if_compares_as_json_false_is_not_zero():
    blueprint = {"p": {"$atIf": {"path": "provider",
                                 "predicate": {"at": "streaming", "value": 0}}}}
    assert project(blueprint) == {"p": None}


# --- $pointer, $pointerIf ----------------------------------------------------------------

def test_pointer_reads_a_json_pointer():
    assert project({"role": {"$pointer": "/input_messages/0/role"}}) == {"role": "system"}


def test_pointer_unescapes_tilde_one_and_tilde_zero():
    assert project({"v": {"$pointer": "/attributes/a~1b/c~0d"}}) == {"v": 7}


def test_pointer_reads_a_key_with_a_dot_whole():
    assert project({"tier": {"$pointer": "/metadata/tier.name"}}) == {"tier": "gold"}


def test_the_empty_pointer_is_the_whole_event():
    assert project({"all": {"$pointer": ""}}) == {"all": EVENT}


def test_pointer_index_with_a_leading_zero_selects_nothing():
    assert project({"v": {"$pointer": "/input_messages/01"}}) == {"v": None}


def test_pointer_if_gives_the_value_when_the_predicate_holds():
    blueprint = {"code": {"$pointerIf": {"path": "/status_code",
                                         "predicate": {"pointer": "/metadata/team",
                                                       "value": "search"}}}}
    assert project(blueprint) == {"code": 200}


def test_pointer_if_gives_null_when_the_predicate_fails():
    blueprint = {"code": {"$pointerIf": {"path": "/status_code",
                                         "predicate": {"pointer": "/metadata/team",
                                                       "value": "ads"}}}}
    assert project(blueprint) == {"code": None}


# --- $path, $pathIf ----------------------------------------------------------------------

def test_path_reads_a_definite_jsonpath():
    assert project({"c": {"$path": "$.input_messages[1].content"}}) == {"c": "hi"}


def test_path_reads_bracketed_names():
    assert project({"t": {"$path": "$['metadata']['tier.name']"}}) == {"t": "gold"}


def test_path_counts_negative_indexes_from_the_end():
    assert project({"c": {"$path": "$.input_messages[-1].role"}}) == {"c": "user"}


def test_path_with_a_wildcard_gives_the_list_of_matches():
    assert project({"roles": {"$path": "$.input_messages[*].role"}}) == {
        "roles": ["system", "user"]}


def test_path_recursive_descent_finds_every_match():
    assert project({"keys": {"$path": "$..key"}}) == {"keys": ["X-Request-Id", "User-Agent"]}


def test_path_slice_gives_a_list():
    assert project({"m": {"$path": "$.input_messages[0:1].role"}}) == {"m": ["system"]}


def test_path_definite_and_absent_gives_null():
    assert project({"x": {"$path": "$.metadata.nobody"}}) == {"x": None}


def test_path_indefinite_and_absent_gives_an_empty_list():
    assert project({"x": {"$path": "$.nothing[*]"}}) == {"x": []}


def test_path_root_is_the_whole_event():
    assert project({"event": {"$path": "$"}}) == {"event": EVENT}


def test_path_if_gives_the_value_when_the_predicate_holds():
    blueprint = {"u": {"$pathIf": {"path": "$.input_messages[1].content",
                                   "predicate": {"path": "$.input_messages[1].role",
                                                 "value": "user"}}}}
    assert project(blueprint) == {"u": "hi"}


def test_path_if_gives_null_when_the_predicate_fails():
    blueprint = {"u": {"$pathIf": {"path": "$.input_messages[1].content",
                                   "predicate": {"path": "$.provider", "value": "x"}}}}
    assert project(blueprint) == {"u": None}


# --- $header -----------------------------------------------------------------------------

def test_header_finds_a_value_case_insensitively():
    blueprint = {"rid": {"$header": {"path": "attributes.http.headers",
                                     "name": "x-request-id"}}}
    assert project(blueprint) == {"rid": "r-42"}


def test_header_absent_gives_null():
    blueprint = {"rid": {"$header": {"path": "attributes.http.headers", "name": "Host"}}}
    assert project(blueprint) == {"rid": None}


def test_header_on_a_path_that_is_no_array_gives_null():
    assert project({"h": {"$header": {"path": "provider", "name": "x"}}}) == {"h": None}


# --- $compose ----------------------------------------------------------------------------

def test_compose_replaces_the_selectors_in_a_template():
    blueprint = {"summary": {"$compose": {
        "who": {"$at": "metadata.team"}, "what": ["llm", {"$pointer": "/provider"}],
        "code": {"$path": "$.status_code"}, "n": 1, "flag": True}}}
    assert project(blueprint) == {"summary": {
        "who": "search", "what": ["llm", "openai"], "code": 200, "n": 1, "flag": True}}


def test_compose_passes_strings_through():
    assert project({"s": {"$compose": "$.provider"}}) == {"s": "$.provider"}


def test_a_blueprint_of_only_compose_makes_the_whole_result():
    blueprint = {"$compose": {"event": {"$path": "$.event_id"}, "sourcetype": "llm"}}
    assert project(blueprint) == {"event": "e1", "sourcetype": "llm"}


def test_a_compose_result_may_be_a_list():
    assert project({"$compose": [{"$at": "provider"}, "x"]}) == ["openai", "x"]


# --- nested blueprints -------------------------------------------------------------------

def test_a_nested_blueprint_applies_to_the_value_at_its_key():
    assert project({"metadata": {"team": True, "owner": {"$value": "me"}}}) == {
        "metadata": {"team": "search", "owner": "me"}}


def test_a_nested_blueprint_applies_to_the_whole_event_when_the_key_is_absent():
    assert project({"call": {"provider": True, "code": {"$at": "status_code"}}}) == {
        "call": {"provider": "openai", "code": 200}}


def test_an_empty_nested_blueprint_copies_the_value_at_its_key():
    assert project({"metadata": {}}) == {"metadata": EVENT["metadata"]}


def test_nested_blueprints_nest():
    assert project({"a": {"b": {"metadata": {"team": "t"}}}}) == {"a": {"b": {"metadata": {
        "t": "search"}}}}


# --- validation --------------------------------------------------------------------------

@pytest.mark.parametrize(("blueprint", "message"), [
    ({"x": {"$nope": 1}}, r"projection\.x: unknown operator \$nope"),
    ({"a": {"b": {"$atx": "c"}}}, r"projection\.a\.b: unknown operator \$atx"),
    ({"x": {"$at": "a", "y": 1}}, r"projection\.x: an operator object holds exactly one"),
    ({"x": {"$at": 3}}, r"projection\.x\.\$at: expected a dotted path"),
    ({"x": {"$pointer": "a/b"}}, r"projection\.x\.\$pointer: expected a JSON Pointer"),
    ({"x": {"$path": "a.b"}}, r"projection\.x\.\$path: expected a JSONPath"),
    ({"x": {"$path": "$.a[?(@.b == 1)]"}}, r"projection\.x\.\$path: JSONPath filters"),
    ({"x": {"$path": "$.a[0"}}, r"projection\.x\.\$path: unclosed \["),
    ({"x": {"$atIf": {"path": "a"}}}, r"projection\.x\.\$atIf: expected an object with "
                                      r"path, predicate"),
    ({"x": {"$pathIf": {"path": "$.a", "predicate": {"at": "b", "value": 1}}}},
     r"projection\.x\.\$pathIf\.predicate: expected an object with path, value"),
    ({"x": {"$header": {"path": "h"}}}, r"projection\.x\.\$header: expected an object"),
    ({"x": {"$compose": {"y": {"$value": 1}}}}, r"projection\.x\.\$compose\.y: inside "
                                                r"\$compose"),
    ({"$compose": {}, "x": True}, r"projection: \$compose makes the whole result"),
    ({"$at": "x"}, r"projection\.\$at: a blueprint's keys are field names"),
    (["provider"], r"projection: expected an object"),
])
def test_a_bad_blueprint_is_refused_naming_its_key_path(blueprint, message):
    with pytest.raises(SelectorError, match=message):
        Projection(blueprint)


def test_a_bad_blueprint_is_a_config_error_of_the_exporter():
    with pytest.raises(msgspec.ValidationError, match=r"unknown operator \$nope"):
        convert({"projection": {"x": {"$nope": 1}}}, FileExporterConfig)


@pytest.mark.parametrize(("cls", "config", "name"), [
    (ClickHouseConfig, {}, "clickhouse"),
    (PrometheusConfig, {}, "prometheus"),
    (OtlpExporterConfig, {}, "otlp"),
    (KafkaExporterConfig, {"encoding": "otlp_json"}, "otlp_json"),
])
def test_fixed_schema_exporters_refuse_a_projection(cls, config, name):
    with pytest.raises(msgspec.ValidationError, match=rf"projection: .*{name}.*"):
        convert({**config, "projection": {"provider": True}}, cls)


def test_the_blueprint_is_compiled_once_and_compares_by_source():
    assert Projection({"a": True}) == Projection({"a": True}) != Projection({"b": True})


# --- exporters ---------------------------------------------------------------------------

def test_no_projection_writes_exactly_the_json_lines_of_the_events():
    events = [make_event(i) for i in range(3)]
    assert jsonl(events, None) == b"".join(msgspec.json.encode(e) + b"\n" for e in events)


def test_a_projection_works_on_the_json_form_the_file_exporter_writes():
    event = make_event(1, metadata={"team": "a"})
    assert jsonl([event], Projection({"v": {"$at": "schema_version"}, "metadata": True})) \
        == b'{"v":1,"metadata":{"team":"a"}}\n'


def test_kafka_messages_carry_the_projected_document_and_the_event_id_header():
    builder = MessageBuilder("llm", None, "json", Projection({"id": {"$at": "event_id"}}))
    [message] = builder.build([make_event(1)])
    assert message.value == b'{"id":"evt-00000001"}'
    assert dict(message.headers)["meterline.event_id"] == b"evt-00000001"


async def test_the_debug_exporter_prints_the_projected_documents(tmp_path, capsys):
    config = convert({"verbosity": "normal", "projection": {"p": {"$at": "provider"}}},
                     DebugConfig)
    await DebugExporter(config, make_context(tmp_path, "debug")).export(
        ExportBatch("b", [make_event(0), make_event(1)]))
    assert capsys.readouterr().out.splitlines()[1:] == ['{"p":"openai"}'] * 2


async def test_two_file_exporters_one_projected_write_the_two_shapes(tmp_path):
    port = free_port()
    blueprint = {"id": {"$at": "event_id"}, "provider": True,
                 "usage": {"$compose": {"in": {"$at": "input_tokens"},
                                        "out": {"$at": "output_tokens"}}}}
    body = pipeline({"webhook": {"listen": f"127.0.0.1:{port}"}}, exporters={
        "file/whole": FILE_OUT,
        "file/shaped": {**FILE_OUT, "path": "{data}/shaped.jsonl", "projection": blueprint}})
    async with running(body, tmp_path):
        status, _, _ = await post_json(f"http://127.0.0.1:{port}/v1/events", event_dicts(0, 3))
        assert status == 200
        out, shaped = tmp_path / "data/out.jsonl", tmp_path / "data/shaped.jsonl"
        await eventually(lambda: len(read_jsonl(out)) == 3 and len(read_jsonl(shaped)) == 3)
    assert [r["event_id"] for r in read_jsonl(out)] == [f"evt-{i:08d}" for i in range(3)]
    assert read_jsonl(out)[0]["request_model"] == "gpt-4o-mini"
    assert read_jsonl(shaped) == [
        {"id": f"evt-{i:08d}", "provider": "openai", "usage": {"in": 10 + i, "out": 20}}
        for i in range(3)]
