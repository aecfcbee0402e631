"""The embedded ClickHouse is bounded: the caps `connection.open_client` sets are those the
chDB engine runs with (read back from `system.server_settings`, `system.merge_tree_settings`,
`getSetting()` and jemalloc's own statistics), and an insert of a default-sized batch fits
in them.

chDB reads its server settings and its allocator's options once, when the engine starts
(one engine per process, whose allocator is set when the library loads), so each check runs
in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meterline.config import convert
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import SERVER_CONFIG

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

PROBE = r"""
import json, re, sys
from pathlib import Path

import msgspec

from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import insert_settings, open_client
from meterline.exporters.clickhouse.schema import Schema, ensure_schema
from meterline.config import convert
from meterline.event import Event

config = convert(json.loads(sys.argv[1]), ClickHouseConfig)
writer = open_client(config, Path(sys.argv[2]))
reader = open_client(config, Path(sys.argv[2]))

def table(sql):
    return {name: int(float(value)) for name, value in writer.query(sql).result_rows}

out = {
    "server": table("SELECT name, value FROM system.server_settings WHERE name IN ("
                    "'mark_cache_size', 'primary_index_cache_size', 'index_mark_cache_size', "
                    "'uncompressed_cache_size', 'index_uncompressed_cache_size', "
                    "'query_condition_cache_size', 'compiled_expression_cache_size')"),
    "merge_tree": table("SELECT name, value FROM system.merge_tree_settings WHERE name IN ("
                        "'vertical_merge_algorithm_min_rows_to_activate', "
                        "'min_bytes_for_wide_part', 'max_compress_block_size')"),
    "query": [client.query("SELECT getSetting('max_memory_usage')").result_rows[0][0]
              for client in (writer, reader)],
    "dirty_decay_ms": int(re.search(
        r"opt\.dirty_decay_ms: (\d+)",
        writer.query("SELECT stats FROM system.jemalloc_stats").result_rows[0][0]).group(1)),
}
events = int(sys.argv[3])
if events:
    schema = Schema.of(config)
    ensure_schema(writer, schema)
    words = ["cost", "token", "model", "prompt", "budget", "latency", "stream", "answer"]
    batch = [Event(
        event_id=f"e-{i:06d}", timestamp=1_700_000_000_000_000_000 + i * 1_000_000,
        source="gateway", provider="openai", operation="chat", request_model="gpt-4o-mini",
        status_code=200, input_tokens=i % 3000, output_tokens=i % 900, team=f"t{i % 12}",
        api_key_id=f"k{i % 40}", user_id=f"u{i % 500}", metadata={"customer": f"c{i % 200}"},
        input_messages=[{"role": "user", "content": " ".join(
            words[(i * 7 + j) % 8] + str(i * j % 997) for j in range(110))}],
        output_messages=[{"role": "assistant", "content": f"answer {i} " * 20}],
        cost_usd=0.001) for i in range(events)]
    writer.insert(schema.qualified(schema.events), schema.column_batch(batch),
                  column_names=[c.name for c in schema.inserted], column_oriented=True,
                  settings=insert_settings(config, "batch-1"))
    out["stored"] = writer.query(f"SELECT count() FROM {schema.qualified(schema.events)}"
                                 ).result_rows[0][0]
    out["event_bytes"] = len(msgspec.json.encode(batch[0]))
out["dataframe_libraries"] = sorted({"pandas", "pyarrow", "numpy"} & set(sys.modules))
writer.close()
reader.close()
print(json.dumps(out))
"""


def probe(tmp_path: Path, config: dict[str, Any] | None = None, events: int = 0,
          environ: dict[str, str] | None = None) -> dict[str, Any]:
    """What a fresh process that opens chDB through `open_client` finds."""
    env = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF"} | (environ or {})
    config = {"endpoint": f"chdb://{tmp_path / 'ch'}", **(config or {})}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(config), str(tmp_path),
                           str(events)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_embedded_engine_runs_with_small_caches_and_bounded_memory(tmp_path: Path):
    found = probe(tmp_path)
    # ClickHouse's own defaults: 5 GiB for each of the first three, 100 MiB, 128 MiB
    assert found["server"] == {
        "mark_cache_size": 32 * MIB,
        "primary_index_cache_size": 16 * MIB,
        "index_mark_cache_size": 8 * MIB,
        "uncompressed_cache_size": 0,
        "index_uncompressed_cache_size": 0,
        "query_condition_cache_size": 8 * MIB,
        "compiled_expression_cache_size": 16 * MIB,
    }
    # defaults: 131,072 rows, 10 MiB, 1 MiB
    assert found["merge_tree"] == {
        "vertical_merge_algorithm_min_rows_to_activate": 1,
        "min_bytes_for_wide_part": 32 * MIB,
        "max_compress_block_size": 256 * 1024,
    }
    assert found["query"] == [256 * MIB, 256 * MIB], "every client's queries (default: none)"
    assert found["dirty_decay_ms"] == 250, "jemalloc hands freed pages back (default: 5 s)"
    assert (tmp_path / "ch" / SERVER_CONFIG).is_file()


def test_max_query_memory_mib_sets_the_limit_of_every_query(tmp_path: Path):
    found = probe(tmp_path, {"max_query_memory_mib": 100})
    assert found["query"] == [100 * MIB, 100 * MIB]


def test_an_operators_own_allocator_options_are_kept(tmp_path: Path):
    found = probe(tmp_path, environ={"JE_MALLOC_CONF": "dirty_decay_ms:1000"})
    assert found["dirty_decay_ms"] == 1000


@pytest.fixture(scope="module")
def inserted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A process that inserted a default-sized batch under a 64 MiB query limit."""
    return probe(tmp_path_factory.mktemp("inserted"), {"max_query_memory_mib": 64},
                 events=10_000)


def test_a_default_sized_batch_is_inserted_within_a_small_query_limit(inserted: dict[str, Any]):
    """10,000 events of ~1.3 KB (the exporter's default batch) in one insert, with the rollup
    views, under a 64 MiB limit: written as one Compact part. As a Wide part (ClickHouse's
    default past 10 MiB) the same insert needs more than 128 MiB, a buffer per column."""
    assert inserted["stored"] == 10_000
    assert 1100 <= inserted["event_bytes"] <= 1600


def test_chdb_and_its_inserts_import_neither_pandas_pyarrow_nor_numpy(inserted: dict[str, Any]):
    """clickhouse-connect asks for them to recognise DataFrames and arrays, chDB for its
    Arrow results; we use neither, and they cost the daemon about 110 MB."""
    assert inserted["dataframe_libraries"] == []


@pytest.mark.parametrize(("block", "message"), [
    ({"endpoint": "http://127.0.0.1:8123", "max_query_memory_mib": 512},
     "max_query_memory_mib applies to the embedded chdb:// ClickHouse; a server's memory "
     "limits are set on the server"),
    ({"max_query_memory_mib": 8}, "max_query_memory_mib must be at least 16, got 8"),
])
def test_invalid_memory_settings_are_refused(block: dict[str, Any], message: str):
    with pytest.raises(msgspec.ValidationError, match=re.escape(message)):
        convert(block, ClickHouseConfig)


def test_a_server_endpoint_gets_no_embedded_caps():
    config = convert({"endpoint": "http://127.0.0.1:8123"}, ClickHouseConfig)
    assert isinstance(config, ClickHouseConfig) and config.max_query_memory_mib is None


STARTED = r"""
import asyncio, json, sys
from pathlib import Path

from meterline import logs
from meterline.component import Context
from meterline.config import MetricsConfig, convert
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
from meterline.telemetry import Telemetry

def library_kib():
    '''Resident KiB of chDB's library in this process (its mappings in smaps).'''
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            inside = line.rstrip().endswith("_chdb.abi3.so")
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total

logs.configure("warning", "console")
config = convert({"endpoint": f"chdb://{sys.argv[1]}/ch", "repair_interval": 0},
                 ClickHouseConfig)
exporter = ClickHouseExporter(config, Context("clickhouse", Path(sys.argv[1]),
                              Telemetry(MetricsConfig()), logs.get(component="clickhouse")))
dropped = asyncio.run(exporter.connect()) and library_kib()
exporter.reader.client.query("SELECT count() FROM meterline.llm_events")
queried = library_kib()
print(json.dumps({"connected": dropped, "queried": queried}))
"""


def test_the_embedded_engine_drops_the_library_pages_only_its_start_touched(tmp_path: Path):
    """chDB's start (every function and format registered, the schema created) leaves about
    180 MB of its library resident; the exporter hands those pages back once connected, and
    work reads back the part it needs."""
    done = subprocess.run([sys.executable, "-c", STARTED, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resident = json.loads(done.stdout.strip().splitlines()[-1])
    assert resident["connected"] < 40 * 1024, resident
    assert resident["queried"] > resident["connected"], "a query reads its code back"
