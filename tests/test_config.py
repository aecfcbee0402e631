"""Loading pipeline.yaml: shape, env substitution, and errors that name line and key."""

import textwrap

import pytest

from meterline.config import ConfigError, loads
from meterline.delivery import ExporterConfig
from meterline.units import Duration

GOOD = """\
receivers:
  webhook:
    listen: 127.0.0.1:8090
processors:
  filter/no-health:
    exclude: [{endpoint: {$regex: "^/health"}}]
exporters:
  file:
    path: ./out.jsonl
    batch: {max_size: 50, timeout: 50ms}
  file/archive: {}
service:
  pipelines:
    usage:
      receivers: [webhook]
      processors: [filter/no-health]
      exporters: [file, file/archive]
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        loads(textwrap.dedent(text), "pipeline.yaml", environ or {})
    return [str(p) for p in e.value.problems]


def test_a_good_file_loads_with_defaults_filled_in():
    loaded = loads(GOOD, "pipeline.yaml", {})
    file_cfg = loaded.exporters["file"].config
    assert isinstance(file_cfg, ExporterConfig)
    assert file_cfg.batch.max_size == 50
    assert file_cfg.batch.timeout == Duration(0.05)
    assert file_cfg.queue.type == "persistent"
    assert loaded.exporters["file/archive"].factory.type == "file"
    assert loaded.service.pipelines["usage"].processors == ["filter/no-health"]


def test_env_variables_are_substituted():
    text = GOOD.replace("./out.jsonl", "${env:OUT_PATH}").replace(
        "batch: {max_size: 50, timeout: 50ms}", "batch:\n      max_size: ${env:N:-7}")
    loaded = loads(text, "pipeline.yaml", {"OUT_PATH": "/tmp/x.jsonl"})
    assert loaded.exporters["file"].config.path == "/tmp/x.jsonl"
    assert loaded.exporters["file"].config.batch.max_size == 7


def test_an_unset_env_variable_without_default_is_an_error():
    [p] = problems(GOOD.replace("./out.jsonl", "${env:NOPE}"))
    assert p.startswith("pipeline.yaml:9:")
    assert "NOPE is not set" in p


def test_double_dollar_is_a_literal_dollar():
    loaded = loads(GOOD.replace("./out.jsonl", "./$${env:X}.jsonl"), "p.yaml", {})
    assert loaded.exporters["file"].config.path == "./${env:X}.jsonl"


def test_unknown_component_type_names_line_and_available_types():
    [p] = problems(GOOD.replace("  file/archive: {}", "  nosuch: {}").replace(
        "exporters: [file, file/archive]", "exporters: [file, nosuch]"))
    assert p.startswith("pipeline.yaml:11: exporters.nosuch: unknown exporter type 'nosuch'")
    assert "file" in p and "debug" in p


def test_unknown_key_names_line_key_and_expected_keys():
    [p] = problems(GOOD.replace("    path: ./out.jsonl", "    path: ./out.jsonl\n    pth: x"))
    assert p.startswith("pipeline.yaml:10: exporters.file.pth: unknown key")
    assert "path" in p and "queue" in p


def test_unknown_nested_key_names_its_full_path():
    [p] = problems(GOOD.replace("{max_size: 50, timeout: 50ms}", "{max_size: 50, tmeout: 1s}"))
    assert p.startswith("pipeline.yaml:10: exporters.file.batch.tmeout: unknown key")
    assert "timeout" in p


def test_wrong_type_names_line_key_and_expected_type():
    [p] = problems(GOOD.replace("max_size: 50", "max_size: lots"))
    assert p == "pipeline.yaml:10: exporters.file.batch.max_size: expected int, got str"


def test_bad_duration_says_what_a_duration_looks_like():
    [p] = problems(GOOD.replace("timeout: 50ms", "timeout: soon"))
    assert "exporters.file.batch.timeout" in p
    assert "expected a duration such as 200ms" in p


def test_a_bare_number_is_not_a_duration_and_the_error_says_which_units():
    [p] = problems(GOOD.replace("timeout: 50ms", "timeout: 200"))
    assert p == ("pipeline.yaml:10: exporters.file.batch.timeout: a duration needs a unit: "
                 "write 200ms, 200s or 200m, got the bare number 200")


def test_zero_is_a_duration_without_a_unit():
    loaded = loads(GOOD.replace("timeout: 50ms", "timeout: 0"), "pipeline.yaml", {})
    assert loaded.exporters["file"].config.batch.timeout == 0


def test_a_components_own_check_is_reported_beside_its_bad_keys():
    sampled = GOOD.replace("    exclude: [{endpoint: {$regex: \"^/health\"}}]\n",
                           "    exclude: [{endpoint: {$regex: \"^/health\"}}]\n"
                           "  sample: {rate: 1.5, keep_slower_than: fast}\n")
    sampled = sampled.replace("processors: [filter/no-health]",
                              "processors: [filter/no-health, sample]")
    assert problems(sampled) == [
        "pipeline.yaml:7: processors.sample.keep_slower_than: expected a duration such as "
        "200ms, 1s or 10m, got 'fast'",
        "pipeline.yaml:7: processors.sample: rate is a probability between 0 and 1, got 1.5"]


def test_bad_filter_operator_names_the_pattern_line():
    [p] = problems(GOOD.replace("$regex", "$regx"))
    assert p.startswith("pipeline.yaml:6: processors.filter/no-health.exclude[0]:")
    assert "unknown operator $regx" in p


def test_pipeline_naming_a_missing_component_is_an_error():
    [p] = problems(GOOD.replace("exporters: [file, file/archive]",
                                "exporters: [file, file/archive, kafka]"))
    assert p.startswith("pipeline.yaml:17: service.pipelines.usage.exporters[2]: names exporter "
                        "'kafka', which is not defined under exporters")


def test_component_no_pipeline_uses_is_an_error():
    [p] = problems(GOOD.replace("exporters: [file, file/archive]", "exporters: [file]"))
    assert p == ("pipeline.yaml:11: exporters.file/archive: exporter 'file/archive' is "
                 "defined but no pipeline uses it")


def test_every_problem_is_reported_at_once():
    found = problems(GOOD.replace("max_size: 50", "max_size: x").replace("$regex", "$nope"))
    assert len(found) == 2


def test_invalid_component_id_is_an_error():
    [p, *_] = problems(GOOD.replace("file/archive", "File Archive"))
    assert "invalid exporter id 'File Archive'" in p


def test_missing_service_is_an_error():
    found = problems("receivers: {webhook: {}}\n")
    assert any("missing required key 'service'" in p for p in found)


def test_yaml_syntax_error_names_the_line():
    [p] = problems("receivers:\n  webhook: {listen: [\n")
    assert p.startswith("pipeline.yaml:3: invalid YAML")


def test_flows_nested_past_a_hundred_deep_are_refused_before_the_parser_sees_them():
    # (PyYAML's scanner costs the square of the depth: 5,000 took seconds)
    [p] = problems("service: " + "[" * 5000 + "]" * 5000)
    assert p == "pipeline.yaml: invalid YAML: nested too deeply (more than 100 levels of [ and {)"


def test_duplicate_key_is_an_error():
    [p] = problems(GOOD.replace("  file/archive: {}", "  file/archive: {}\n  file/archive: {}"))
    assert "duplicate key 'file/archive'" in p


def test_unknown_top_level_key_is_an_error():
    [p] = problems(GOOD + "extras: {}\n")
    assert "extras: unknown top-level key" in p


def test_every_unknown_key_of_a_block_is_reported_at_every_depth():
    found = problems(GOOD.replace("    path: ./out.jsonl", "    path: ./out.jsonl\n    pth: x")
                     .replace("{max_size: 50, timeout: 50ms}", "{max_size: 50, tmeout: 1s}"))
    assert [p.split(": ")[:2] for p in found] == [
        ["pipeline.yaml:10", "exporters.file.pth"],
        ["pipeline.yaml:11", "exporters.file.batch.tmeout"],
    ]
    assert all("unknown key" in p for p in found)


def test_every_wrong_typed_field_of_a_block_is_reported():
    found = problems(GOOD.replace("{max_size: 50, timeout: 50ms}",
                                  "{max_size: many, timeout: 50ms}\n    retry: "
                                  "{initial_interval: soon}\n    queue: {fsync: maybe}"))
    assert found == [
        "pipeline.yaml:10: exporters.file.batch.max_size: expected int, got str",
        "pipeline.yaml:11: exporters.file.retry.initial_interval: expected a duration such as "
        "200ms, 1s or 10m, got 'soon'",
        "pipeline.yaml:12: exporters.file.queue.fsync: expected bool, got str",
    ]


def test_an_enum_error_says_which_values_are_expected():
    [p] = problems(GOOD.replace("{max_size: 50, timeout: 50ms}",
                                "{max_size: 50}\n    queue: {when_full: explode}"))
    assert p == ("pipeline.yaml:11: exporters.file.queue.when_full: invalid enum value "
                 "'explode' (expected one of: block, drop_newest)")


def with_admin(admin: str) -> str:
    return ("receivers: {webhook: {}}\nexporters: {debug: {}}\n"
            f"service: {{admin: {admin}, pipelines: {{p: {{receivers: [webhook], "
            "exporters: [debug]}}}\n")


@pytest.mark.parametrize("listen", ["0.0.0.0:8888", ":8888", "10.0.0.5:8888", "[::]:8888"])
def test_admin_beyond_loopback_without_a_token_is_refused(listen):
    with pytest.raises(ConfigError, match="beyond loopback: set auth_token"):
        loads(with_admin(f'{{listen: "{listen}"}}'))


@pytest.mark.parametrize("listen", ["127.0.0.1:8888", "localhost:8888", "[::1]:8888"])
def test_admin_on_loopback_needs_no_token(listen):
    loads(with_admin(f'{{listen: "{listen}"}}'))


def test_admin_beyond_loopback_with_a_token_is_accepted():
    loads(with_admin('{listen: "0.0.0.0:8888", auth_token: t0k}'))


def test_a_listen_port_of_digits_int_refuses_is_refused_as_an_address():
    found = problems(GOOD.replace("listen: 127.0.0.1:8090", "listen: \"127.0.0.1:\u00b2\""))
    assert any("expected a listen address host:port" in p for p in found), found
