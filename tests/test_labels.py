"""The labels processor: static labels, actions, the API-key table, metadata bounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from meterline import config as config_mod
from meterline.config import convert
from meterline.processors.labels import LabelsConfig, LabelsProcessor
from tests.helpers import make_context, make_event, metric_value


def labels(tmp_path: Path, **config: Any) -> tuple[LabelsProcessor, CollectorRegistry]:
    context = make_context(tmp_path, "labels")
    return LabelsProcessor(convert(config, LabelsConfig), context), context.telemetry.registry


def test_static_labels_are_written_into_metadata(tmp_path: Path) -> None:
    p, _ = labels(tmp_path, static={"environment": "prod", "region": "eu-west-1"})
    bare, tagged = p.process([make_event(0), make_event(1, metadata={"environment": "dev",
                                                                      "customer_id": "acme"})])
    assert bare.metadata == {"environment": "prod", "region": "eu-west-1"}
    assert tagged.metadata == {"environment": "prod", "region": "eu-west-1",
                               "customer_id": "acme"}


def test_actions_set_copy_rename_and_delete_in_order(tmp_path: Path) -> None:
    p, _ = labels(tmp_path, actions=[
        {"set": "team", "value": "platform"},
        {"copy": "user_id", "to": "metadata.user"},
        {"rename": "metadata.cust", "to": "metadata.customer_id"},
        {"copy": "status_code", "to": "metadata.status"},
        {"copy": "metadata.customer_id", "to": "organization"},
        {"delete": "metadata.debug"},
        {"rename": "attributes.feature", "to": "metadata.feature"},
    ])
    e = p.process([make_event(user_id="u-17", metadata={"cust": "acme", "debug": "1"},
                              attributes={"feature": "search", "other": 1})])[0]
    assert e.team == "platform"
    assert e.organization == "acme"
    assert e.metadata == {"user": "u-17", "customer_id": "acme", "status": "200",
                          "feature": "search"}
    assert e.attributes == {"other": 1}


def test_copy_of_a_missing_value_does_nothing(tmp_path: Path) -> None:
    p, _ = labels(tmp_path, actions=[{"copy": "session_id", "to": "metadata.session"}])
    assert p.process([make_event()])[0].metadata is None


@pytest.mark.parametrize(("action", "message"), [
    ({"set": "status_code", "value": "x"}, "not a string field"),
    ({"set": "tema", "value": "x"}, "'tema' is not an event field"),
    ({"copy": "user_id"}, "copy takes `to`"),
    ({"delete": "event_id"}, "cannot be removed"),
    ({"set": "team", "delete": "user_id", "value": "x"}, "exactly one of"),
])
def test_bad_action_is_refused_with_the_reason(action: dict[str, str], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        convert({"actions": [action]}, LabelsConfig)


def test_api_key_table_attributes_events_and_counts_unknown_keys(tmp_path: Path) -> None:
    p, registry = labels(tmp_path, api_keys={"keys": {
        "ak_3f9a": {"name": "checkout-prod", "team": "payments", "organization": "acme",
                    "metadata": {"cost_center": "4711"}}}})
    known, unknown, none = p.process([make_event(0, api_key_id="ak_3f9a"),
                                      make_event(1, api_key_id="ak_0000"), make_event(2)])
    assert (known.api_key_name, known.team, known.organization) == (
        "checkout-prod", "payments", "acme")
    assert known.metadata == {"cost_center": "4711"}
    assert unknown.team is None and none.team is None
    assert metric_value(registry, "meterline_labels_unknown_api_key_events_total") == 1


def test_api_key_csv_file_is_read_and_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.csv"
    path.write_text("api_key_id,name,team,organization,cost_center\n"
                    "ak_1,search-prod,search,acme,4711\n")
    p, _ = labels(tmp_path, api_keys={"file": str(path), "check_interval": "0s"})
    first = p.process([make_event(0, api_key_id="ak_1")])[0]
    assert (first.team, first.metadata) == ("search", {"cost_center": "4711"})
    path.write_text("api_key_id,name,team,organization,cost_center\n"
                    "ak_1,search-prod,discovery,acme,4712\n")
    os.utime(path, (1, 1))  # a different mtime even within the same clock tick
    second = p.process([make_event(1, api_key_id="ak_1")])[0]
    assert (second.team, second.metadata) == ("discovery", {"cost_center": "4712"})


def test_api_key_yaml_file_that_breaks_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("ak_1: {name: a, team: search}\n")
    p, _ = labels(tmp_path, api_keys={"file": str(path), "check_interval": "0s"})
    path.write_text("ak_1: [not, a, mapping\n")
    os.utime(path, (2, 2))
    assert p.process([make_event(api_key_id="ak_1")])[0].team == "search"


def test_invalid_api_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.csv"
    path.write_text("id,name\nak_1,x\n")
    text = f"""
receivers: {{webhook: {{}}}}
processors: {{labels: {{api_keys: {{file: {path}}}}}}}
exporters: {{debug: {{}}}}
service: {{pipelines: {{p: {{receivers: [webhook], processors: [labels], exporters: [debug]}}}}}}
"""
    with pytest.raises(config_mod.ConfigError, match="api_key_id column"):
        config_mod.loads(text, "pipeline.yaml")


def test_metadata_allowlist_keeps_only_listed_source_keys(tmp_path: Path) -> None:
    p, registry = labels(tmp_path, metadata_allowlist=["customer_id"],
                         static={"environment": "prod"})
    e = p.process([make_event(metadata={"customer_id": "acme", "prompt": "secret stuff"})])[0]
    assert e.metadata == {"customer_id": "acme", "environment": "prod"}
    assert metric_value(registry, "meterline_labels_trimmed_values_total") == 1


def test_metadata_values_are_capped_at_128_characters(tmp_path: Path) -> None:
    p, _ = labels(tmp_path)
    e = p.process([make_event(metadata={"long": "x" * 500, "short": "ok"})])[0]
    assert e.metadata == {"long": "x" * 128, "short": "ok"}


def test_empty_config_leaves_events_as_they_are(tmp_path: Path) -> None:
    p, _ = labels(tmp_path)
    before = make_event(metadata={"a": "b"}, team="t")
    after = p.process([make_event(metadata={"a": "b"}, team="t")])[0]
    assert after == before
