"""What every registered component promises, whatever its kind: its empty config validates
or names the keys it requires; every option, nested ones too, has a description; its page
in docs/components is the one its config class generates; and built from a minimal config
(required keys filled, listeners on free ports of 127.0.0.1, servers it talks to absent) it
starts and shuts down cleanly, each within a few seconds.

New components are covered as soon as they are registered (entry points); only
`REQUIRED_VALUES`, `NO_SERVER` and `NAMED` may need a line for them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meterline import describe, registry
from meterline.component import Decode, Received
from meterline.config import SECTIONS, ComponentConfig, PipelineFile, convert
from meterline.delivery import ExporterConfig, ExporterRunner, open_queue
from meterline.event import Event
from meterline.queue import Batch
from meterline.recent import RecentIds
from tests.helpers import ROOT, free_port, make_context, make_event

CASES = [(kind, type_) for kind in describe.KINDS for type_ in sorted(registry.available(kind))]
IDS = [f"{kind}/{type_}" for kind, type_ in CASES]
ENTRIES = {e.name: e for e in describe.entries()}

REQUIRED_VALUES: dict[str, Any] = {
    "receiver/file": lambda tmp: {"path": str(tmp / "events.jsonl")},
    "exporter/http": lambda tmp: {"endpoint": f"http://127.0.0.1:{free_port()}/in"},
    "exporter/s3": lambda tmp: {"bucket": "archive"},
}
"""Test values for the keys a component requires, by component (`tmp` is its tmp_path)."""

NO_SERVER: dict[str, Any] = {
    "receiver/kafka": lambda: {"brokers": f"127.0.0.1:{free_port()}"},
    "exporter/kafka": lambda: {"brokers": f"127.0.0.1:{free_port()}"},
    "exporter/otlp": lambda: {"endpoint": f"http://127.0.0.1:{free_port()}"},
    "exporter/s3": lambda: {"endpoint": f"http://127.0.0.1:{free_port()}", "timeout": "1s"},
}
"""Servers a component talks to, pointed at a free port where nothing listens (so a
server that happens to run on the default port changes nothing). ClickHouse needs none:
its default endpoint is chDB embedded in the data directory (here, tmp_path)."""

NAMED: dict[str, dict[str, dict[str, Any]]] = {
    "extension/finops": {"exporters": {"clickhouse": {}}},
}
"""The other components a component's config names (`Factory.link`), as the sections of
pipeline.yaml that define them, with their minimal configs."""

SKIPPED: dict[str, str] = {}
"""Components that cannot start without external state, with the reason. Empty: every
registered component starts without any."""

START_TIMEOUT = 5.0  # generous on a shared 2-core machine; each case takes well under 2 s


def _minimal(kind: str, type_: str, tmp_path: Path) -> dict[str, Any]:
    """The smallest config that starts: required keys filled, every listener (a top-level
    `host:port` option that is on by default) on a free port of 127.0.0.1."""
    name = f"{kind}/{type_}"
    raw: dict[str, Any] = {}
    for option in describe.options(registry.factory(kind, type_).config):
        if "host:port" in option.type and "." not in option.key and option.default != "null":
            raw[option.key] = f"127.0.0.1:{free_port()}"
    if name in REQUIRED_VALUES:
        raw |= REQUIRED_VALUES[name](tmp_path)
    if name in NO_SERVER:
        raw |= NO_SERVER[name]()
    return raw


def _linked(kind: str, type_: str, config: Any) -> Any:
    """The config `create` gets: linked to the components it names (`NAMED`), if it does."""
    factory = registry.factory(kind, type_)
    if factory.link is None:
        return config
    file = PipelineFile("pipeline.yaml")
    for section, blocks in NAMED.get(f"{kind}/{type_}", {}).items():
        for cid, raw in blocks.items():
            other = registry.factory(SECTIONS[section], cid.partition("/")[0])
            getattr(file, section)[cid] = ComponentConfig(cid, other, convert(raw, other.config))
    return factory.link(config, file)



class _Consumer:
    """A pipeline that takes everything."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def consume(self, events: list[Event]) -> None:
        self.events += events

    async def consume_encoded(self, decode: Decode, body: bytes,
                              once: RecentIds | None = None) -> Received:
        decoded = decode(body)
        self.events += decoded.events
        return decoded.received()

    def refused(self, count: int, reason: str) -> None:
        pass


@pytest.mark.parametrize(("kind", "type_"), CASES, ids=IDS)
def test_the_empty_config_validates_or_names_the_required_keys(kind, type_, tmp_path):
    cls = registry.factory(kind, type_).config
    required = [o.key for o in describe.options(cls) if o.required and "." not in o.key
                and "[" not in o.key]
    raw: dict[str, Any] = {}
    named: list[str] = []
    while True:
        try:
            convert(raw, cls)
            break
        except msgspec.ValidationError as e:
            missing = [k for k in required if f"`{k}`" in str(e) and k not in raw]
            assert missing, f"{kind} {type_}: {{}} is refused without naming a required key: {e}"
            named += missing
            values = REQUIRED_VALUES.get(f"{kind}/{type_}", lambda tmp: {})(tmp_path)
            assert all(k in values for k in missing), (
                f"add test values for {', '.join(missing)} to REQUIRED_VALUES")
            raw |= {k: values[k] for k in missing}
    assert sorted(named) == sorted(required), "every required key is named, and only those"


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_option_has_a_description(name):
    undescribed = [o.key for o in ENTRIES[name].options() if not o.description.strip()]
    assert not undescribed, (
        f"{name}: options without a description: {', '.join(undescribed)} (add a comment "
        "beside the field in its config class, see meterline/describe.py)")


@pytest.mark.parametrize("name", list(ENTRIES))
def test_the_doc_page_is_the_one_the_config_class_generates(name):
    entry = ENTRIES[name]
    page = ROOT / "docs" / "components" / entry.page
    assert page.is_file(), f"no {page.name}: run `{describe.GENERATE}`"
    assert page.read_text(encoding="utf-8") == describe.markdown(entry), (
        f"docs/components/{entry.page} is stale: run `{describe.GENERATE}`")


@pytest.mark.parametrize(("kind", "type_"), CASES, ids=IDS)
async def test_it_starts_and_shuts_down_cleanly(kind, type_, tmp_path):
    name = f"{kind}/{type_}"
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    factory = registry.factory(kind, type_)
    config = _linked(kind, type_, convert(_minimal(kind, type_, tmp_path), factory.config))
    context = make_context(tmp_path / "data", type_)
    began = time.monotonic()
    if kind == "receiver":
        component = factory.create(config, context, _Consumer())
        await asyncio.wait_for(component.start(), START_TIMEOUT)
        await asyncio.wait_for(component.shutdown(), START_TIMEOUT)
    elif kind == "processor":
        component = factory.create(config, context)
        await asyncio.wait_for(component.start(), START_TIMEOUT)
        assert isinstance(component.process([make_event()]), list)
        await asyncio.wait_for(component.shutdown(), START_TIMEOUT)
    elif kind == "extension":
        component = factory.create(config, context)
        await asyncio.wait_for(component.start(), START_TIMEOUT)
        assert isinstance(component.admin_routes(), dict)
        await asyncio.wait_for(component.shutdown(), START_TIMEOUT)
    else:
        assert isinstance(config, ExporterConfig)
        runner = ExporterRunner(factory.create(config, context), config, context,
                                open_queue(config.queue, context), context.telemetry)
        await asyncio.wait_for(runner.start(), START_TIMEOUT)
        # an event in its queue: delivered if it can be, else kept (or, in memory, dropped)
        await runner.put(Batch([make_event()]))
        await asyncio.wait_for(runner.shutdown(grace=0.2), START_TIMEOUT)
    assert time.monotonic() - began < START_TIMEOUT
