"""The two-tier topology: an edge meterline writes Kafka, collector meterlines in one
consumer group read it. A collector stopped mid-stream hands its partitions over and
no event is lost."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import msgspec

from tests.conftest import Daemon, event_dicts, eventually, free_port, read_jsonl, running
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


async def test_a_collector_stopped_mid_stream_hands_its_partitions_over_and_loses_nothing(
        tmp_path, kafka_bootstrap, topic):
    await create_topic(kafka_bootstrap, topic, 4)
    first = collector(tmp_path, "first", kafka_bootstrap, topic)
    second = collector(tmp_path, "second", kafka_bootstrap, topic)
    first.start()
    second.start()
    await eventually(lambda: len(owned_partitions(first)) == len(owned_partitions(second)) == 2,
                     timeout=30, interval=0.2)
    port = free_port()
    sent: list[str] = []
    stop = asyncio.Event()
    async with running(EDGE.format(port=port, bootstrap=kafka_bootstrap, topic=topic),
                       tmp_path):
        sender = asyncio.create_task(send(f"http://127.0.0.1:{port}/v1/events", sent, stop))
        await eventually(lambda: len(read_jsonl(tmp_path / "second/out.jsonl")) >= 200,
                         timeout=30)
        assert second.stop() == 0  # SIGTERM mid-stream: it finishes its batch and leaves
        await eventually(lambda: owned_partitions(first) == [0, 1, 2, 3], timeout=30,
                         interval=0.2)
        stopped_at = len(sent)
        await eventually(lambda: len(sent) >= stopped_at + 500, timeout=30)
        stop.set()
        await sender

    def exported():
        return {r["event_id"] for name in ("first", "second")
                for r in read_jsonl(tmp_path / name / "out.jsonl")}

    await eventually(lambda: exported() >= set(sent), timeout=30)
    assert len(read_jsonl(tmp_path / "first/out.jsonl")) > 0
    assert first.stop() == 0
