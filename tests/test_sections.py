"""Top-level pipeline.yaml sections contributed by plugins (`meterline.sections`)."""

import textwrap

import pytest

from meterline import registry
from meterline.component import Config
from meterline.config import ConfigError, loads
from tests.helpers import free_port, running


class Quota(Config):
    limit: int
    unit: str = "requests"

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")


BASE = """\
receivers:
  webhook: {listen: 127.0.0.1:0}
exporters:
  debug: {}
service:
  pipelines:
    p: {receivers: [webhook], exporters: [debug]}
"""


@pytest.fixture
def quotas(monkeypatch):
    """A plugin section `quotas:` (name -> Quota), as an entry point would contribute it."""
    monkeypatch.setattr(registry, "sections", lambda: {"quotas": dict[str, Quota]})


def problems(text):
    with pytest.raises(ConfigError) as e:
        loads(textwrap.dedent(text), "pipeline.yaml", {})
    return [str(p) for p in e.value.problems]


def test_a_plugin_section_is_validated_into_its_type(quotas):
    loaded = loads(BASE + "quotas:\n  search: {limit: 5}\n", "pipeline.yaml", {})
    assert loaded.sections["quotas"] == {"search": Quota(limit=5)}


def test_an_absent_plugin_section_holds_its_empty_value(quotas):
    assert loads(BASE, "pipeline.yaml", {}).sections["quotas"] == {}


def test_a_bad_value_in_a_plugin_section_names_line_and_key(quotas):
    [p] = problems(BASE + "quotas:\n  search:\n    limit: 0\n")
    assert p == "pipeline.yaml:9: quotas.search: limit must be at least 1"


def test_an_unknown_key_in_a_plugin_section_lists_the_expected_ones(quotas):
    [p] = problems(BASE + "quotas:\n  search:\n    limit: 3\n    unti: tokens\n")
    assert p.startswith("pipeline.yaml:11: quotas.search.unti: unknown key")
    assert "limit, unit" in p


def test_an_unknown_top_level_key_lists_plugin_sections_too(quotas):
    [p] = problems(BASE + "quota: {}\n")
    assert "quota: unknown top-level key" in p and "quotas" in p


async def test_components_see_the_sections_and_follow_a_reload(quotas, tmp_path):
    text = BASE.replace("127.0.0.1:0", f"127.0.0.1:{free_port()}")
    text = text.replace("  pipelines:", "  admin: null\n  data_dir: {data}\n  pipelines:")
    async with running(text + "quotas: {search: {limit: 5}}\n", tmp_path) as service:
        sections = service.context("debug").sections  # what a component is given
        assert sections["quotas"]["search"].limit == 5
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("limit: 5", "limit: 7"))
        assert await service.reload(str(path))
        assert sections["quotas"]["search"].limit == 7  # the same view, now the new file's
