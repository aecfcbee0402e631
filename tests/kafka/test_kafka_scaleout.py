"""The two-tier topology: an edge meterline writes Kafka, collector meterlines in one
consumer group read it. A collector stopped (SIGTERM) or killed (SIGKILL) mid-stream
hands its partitions over and no event is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from dataclasses import dataclass

import aiohttp
import msgspec
import pytest

from tests.helpers import Daemon, event_dicts, eventually, free_port, read_jsonl, running
from tests.kafka.conftest import create_topic, group_timeouts

EDGE = """
receivers:
  webhook: {{listen: 127.0.0.1:{port}}}
exporters:
  kafka:
    brokers: {bootstrap}
    topic: {topic}
    key: api_key_id
    batch: {{timeout: 10ms}}
service:
  data_dir: {{data}}
  admin: null
  pipelines:
    edge: {{receivers: [webhook], exporters: [kafka]}}
"""

COLLECTOR = """
receivers:
  kafka:
    brokers: {bootstrap}
    topics: [{topic}]
    group_id: {topic}-collectors
    {timeouts}
exporters:
  file:
    path: {dir}/out.jsonl
    batch: {{timeout: 10ms}}
service:
  data_dir: {dir}/data
  admin: {{listen: "127.0.0.1:{admin}"}}
  pipelines:
    collect: {{receivers: [kafka], exporters: [file]}}
"""


def collector(tmp_path, name, bootstrap, topic):
    directory = tmp_path / name
    directory.mkdir()
    admin = free_port()
    config = directory / "pipeline.yaml"
    config.write_text(COLLECTOR.format(bootstrap=bootstrap, topic=topic, dir=directory,
                                       admin=admin, timeouts=group_timeouts()))
    return Daemon(config, admin, directory)


def owned_partitions(daemon):
    url = f"http://127.0.0.1:{daemon.admin_port}/api/v1/receivers/kafka"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return sorted(p["partition"] for p in json.load(answer)["partitions"])


async def send(url, sent, stop):
    """Post batches of 50 events to the edge until told to stop; record what it took."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            items = event_dicts(len(sent), 50)
            for i, item in enumerate(items):
                item["api_key_id"] = f"k-{i % 16}"
            async with session.post(url, data=msgspec.json.encode(items),
                                    headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
            sent.extend(item["event_id"] for item in items)
            await asyncio.sleep(0.02)


@pytest.fixture
async def collectors(tmp_path, kafka_bootstrap, topic):
    """Two collectors sharing a four-partition topic, each owning two partitions."""
    await create_topic(kafka_bootstrap, topic, 4)
    daemons = [collector(tmp_path, name, kafka_bootstrap, topic) for name in ("first", "second")]
    try:
        for daemon in daemons:
            daemon.start()
        await eventually(lambda: [len(owned_partitions(d)) for d in daemons] == [2, 2],
                         timeout=30, interval=0.2)
        yield daemons
    finally:
        for daemon in daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()


@contextlib.asynccontextmanager
async def under_load(tmp_path, bootstrap, topic):
    """An edge writing the topic and a sender posting to it; yields once the second
    collector has exported 200 events, and stops the sender on the way out."""
    port = free_port()
    load = Load(sent=[], stop=asyncio.Event())
    async with running(EDGE.format(port=port, bootstrap=bootstrap, topic=topic), tmp_path):
        sender = asyncio.create_task(send(f"http://127.0.0.1:{port}/v1/events", load.sent,
                                          load.stop))
        await eventually(lambda: len(read_jsonl(tmp_path / "second/out.jsonl")) >= 200,
                         timeout=30)
        yield load
        load.stop.set()
        await sender


@dataclass
class Load:
    sent: list[str]  # the event ids the edge accepted
    stop: asyncio.Event

    async def more(self, count):
        """Wait until the edge accepted `count` more events."""
        target = len(self.sent) + count
        await eventually(lambda: len(self.sent) >= target, timeout=30)


def exported(tmp_path):
    return {r["event_id"] for name in ("first", "second")
            for r in read_jsonl(tmp_path / name / "out.jsonl")}


async def test_a_collector_stopped_mid_stream_hands_its_partitions_over_and_loses_nothing(
        tmp_path, kafka_bootstrap, topic, collectors):
    first, second = collectors
    async with under_load(tmp_path, kafka_bootstrap, topic) as load:
        assert second.stop() == 0  # SIGTERM mid-stream: it finishes its batch and leaves
        await eventually(lambda: owned_partitions(first) == [0, 1, 2, 3], timeout=30,
                         interval=0.2)
        await load.more(500)
    await eventually(lambda: exported(tmp_path) >= set(load.sent), timeout=30)
    assert len(read_jsonl(tmp_path / "first/out.jsonl")) > 0
    assert first.stop() == 0


async def test_a_collector_killed_mid_stream_loses_nothing_and_the_survivor_takes_over(
        tmp_path, kafka_bootstrap, topic, collectors):
    first, second = collectors
    async with under_load(tmp_path, kafka_bootstrap, topic) as load:
        second.kill()  # SIGKILL: no batch finished, no commit, no leaving the group
        # The group drops it once its session (2s here) runs out.
        await eventually(lambda: owned_partitions(first) == [0, 1, 2, 3], timeout=30,
                         interval=0.2)
        await load.more(500)
    # Restarted on its data directory, the killed collector exports what it had queued
    # but not written; what it had not committed the survivor read again.
    second.start()
    # Every event by its event_id; one read again appears twice, with the same id.
    await eventually(lambda: exported(tmp_path) >= set(load.sent), timeout=30)
    assert len(read_jsonl(tmp_path / "first/out.jsonl")) > 0
    assert first.stop() == 0
