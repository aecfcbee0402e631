"""Extensions: components beside the pipelines (`extensions:` in pipeline.yaml), validated as
the other sections are, started after them, rebuilt on reload only when their block (or what
they name) changed; and the `finops` extension's link to its `clickhouse` exporter."""

import textwrap

import pytest
from aiohttp import web

from meterline import registry
from meterline.component import Config, Extension, Factory
from meterline.config import ConfigError, loads
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.extensions.finops.config import LinkedConfig
from tests.helpers import free_port, running

BASE = """\
receivers:
  webhook: {listen: 127.0.0.1:0}
exporters:
  debug: {}
service:
  pipelines:
    p: {receivers: [webhook], exporters: [debug]}
"""


class ToyConfig(Config):
    greeting: str = "hello"  # what its admin path answers


class Toy(Extension):
    def __init__(self, config: ToyConfig, context) -> None:
        self.config, self.id, self.events = config, context.id, []

    async def start(self) -> None:
        self.events.append("start")

    async def shutdown(self) -> None:
        self.events.append("shutdown")

    def admin_routes(self):
        async def hello(_):
            return web.json_response({self.id: self.config.greeting})
        return {f"toy/{self.id}": hello}


@pytest.fixture
def toy(monkeypatch):
    """A `toy` extension type, as an entry point would register it."""
    toy_factory = Factory(kind="extension", type="toy", config=ToyConfig, create=Toy)
    real_factory, real_available = registry.factory, registry.available
    monkeypatch.setattr(registry, "factory", lambda kind, type_: toy_factory if (
        kind, type_) == ("extension", "toy") else real_factory(kind, type_))
    monkeypatch.setattr(registry, "available", lambda kind: real_available(kind) | (
        {"toy": "tests.test_extensions:Toy"} if kind == "extension" else {}))


def problems(text):
    with pytest.raises(ConfigError) as e:
        loads(textwrap.dedent(text), "pipeline.yaml", {})
    return [str(p) for p in e.value.problems]


def test_an_extensions_section_validates_each_by_id(toy):
    loaded = loads(BASE + "extensions:\n  toy: {}\n  toy/loud: {greeting: HELLO}\n",
                   "pipeline.yaml", {})
    assert loaded.extensions["toy"].config == ToyConfig()
    assert loaded.extensions["toy/loud"].config == ToyConfig(greeting="HELLO")
    assert loaded.extensions["toy/loud"].kind == "extension"


def test_an_unknown_extension_type_is_named_with_its_line(toy):
    [p] = problems(BASE + "extensions:\n  toy: {}\n  healthcheck: {}\n")
    assert p == ("pipeline.yaml:10: extensions.healthcheck: unknown extension type "
                 "'healthcheck' (available: finops, toy)")


def test_a_bad_key_and_a_bad_id_in_extensions_name_their_lines(toy):
    found = problems(BASE + "extensions:\n  toy:\n    greting: hi\n  Toy/x: {}\n")
    assert found[0].startswith("pipeline.yaml:10: extensions.toy.greting: unknown key")
    assert "greeting" in found[0]
    assert found[1].startswith("pipeline.yaml:11: extensions.Toy/x: invalid extension id")


def test_extensions_are_in_no_pipeline():
    [p] = problems(BASE.replace("exporters: [debug]", "exporters: [debug, finops]")
                   + "extensions: {finops: {}}\n")
    assert "names exporter 'finops', which is not defined under exporters" in p


async def test_a_reload_rebuilds_only_the_extension_whose_block_changed(toy, tmp_path):
    text = BASE.replace("127.0.0.1:0", f"127.0.0.1:{free_port()}").replace(
        "  pipelines:", "  admin: null\n  data_dir: {data}\n  pipelines:")
    text += "extensions:\n  toy/a: {}\n  toy/b: {greeting: hi}\n  toy/c: {}\n"
    async with running(text, tmp_path) as service:
        a, b, c = (service.extensions[f"toy/{n}"].component for n in "abc")
        assert a.events == b.events == c.events == ["start"]
        assert set(service.admin_routes()) >= {"toy/toy/a", "toy/toy/b", "toy/toy/c"}
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("greeting: hi", "greeting: bye").replace(
            "  toy/c: {}\n", ""))
        assert await service.reload(str(path))
        assert service.extensions["toy/a"].component is a and a.events == ["start"]
        assert b.events == ["start", "shutdown"] and c.events == ["start", "shutdown"]
        assert service.extensions["toy/b"].component.config.greeting == "bye"
        assert sorted(service.extensions) == ["toy/a", "toy/b"]
        assert service.status()["extensions"] == ["toy/a", "toy/b"]
    assert a.events == ["start", "shutdown"]


# --- the finops extension names a clickhouse exporter ---------------------------------------
CLICKHOUSE = """\
receivers: {webhook: {}}
exporters: {clickhouse: {database: finops_db}, clickhouse/b: {}, debug: {}}
service: {pipelines: {p: {receivers: [webhook], exporters: [clickhouse, clickhouse/b, debug]}}}
"""


def test_finops_takes_the_settings_of_the_clickhouse_exporter_it_names():
    loaded = loads(CLICKHOUSE + "extensions: {finops: {}, finops/b: {clickhouse: clickhouse/b}}",
                   "pipeline.yaml", {})
    default, other = (loaded.extensions[cid].config for cid in ("finops", "finops/b"))
    assert isinstance(default, LinkedConfig) and default.exporter.database == "finops_db"
    assert other.exporter == ClickHouseConfig()


@pytest.mark.parametrize(("named", "why"), [
    ("clickhouse/c", "names exporter 'clickhouse/c', which is not defined under exporters"),
    ("debug", "names exporter 'debug', which is a debug exporter, not a clickhouse one"),
])
def test_finops_naming_a_missing_or_other_exporter_is_refused_with_its_line(named, why):
    [p] = problems(CLICKHOUSE + f"extensions:\n  finops: {{clickhouse: {named}}}\n")
    assert p == (f"pipeline.yaml:5: extensions.finops: clickhouse: {why} "
                 "(clickhouse exporters here: clickhouse, clickhouse/b)")


async def test_a_changed_clickhouse_exporter_rebuilds_the_finops_extension(tmp_path):
    text = f"""\
receivers: {{webhook: {{listen: "127.0.0.1:{free_port()}"}}}}
exporters:
  clickhouse: {{endpoint: "chdb://{{data}}/ch", batch: {{timeout: 20ms}}}}
  debug: {{}}
service:
  admin: null
  data_dir: {{data}}
  pipelines: {{p: {{receivers: [webhook], exporters: [clickhouse, debug]}}}}
extensions: {{finops: {{}}}}
"""
    async with running(text, tmp_path) as service:
        first = service.extensions["finops"].component
        assert (await first.connect()).schema.database == "meterline"  # tables found
        path = tmp_path / "pipeline.yaml"
        path.write_text(path.read_text().replace("debug: {}", "debug: {verbosity: detailed}"))
        assert await service.reload(str(path))
        assert service.extensions["finops"].component is first  # its exporter unchanged
        path.write_text(path.read_text().replace("timeout: 20ms", "timeout: 30ms"))
        assert await service.reload(str(path))
        second = service.extensions["finops"].component
        assert second is not first and first.reader is None  # closed
        assert (await second.connect()).client is not None


def test_components_lists_the_extensions_by_kind():
    import argparse

    from meterline import describe

    lines: list[str] = []
    assert describe.command(argparse.Namespace(type="extension", markdown=None),
                            out=lines.append) == 0
    assert [line.split()[0] for line in lines] == ["extension/finops"]
