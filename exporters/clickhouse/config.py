"""The `clickhouse` exporter's configuration."""

from __future__ import annotations

import re

import msgspec

from meterline.component import Config
from meterline.delivery import BatchConfig, ExporterConfig, refuse_projection
from meterline.units import Duration

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ClusterConfig(Config):
    """For users who outgrow one ClickHouse: every table is created `ON CLUSTER name` as a
    local `Replicated*MergeTree` (replica paths from the server's `default_replica_path`)
    behind a `Distributed` table sharded by event id, so a re-sent event lands on the
    shard that already holds it."""

    name: str  # the cluster, as the servers' remote_servers name it

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.name):
            raise ValueError(f"cluster name must be a plain identifier, got {self.name!r}")


class ClickHouseConfig(ExporterConfig):
    endpoint: str | None = None  # chdb://PATH or http(s)://HOST:PORT; default chdb://<data_dir>/clickhouse
    database: str = "meterline"  # created when create_schema is on
    table: str = "llm_events"  # the raw events (the rollups are named after it)
    username: str = "default"  # servers only
    password: str = ""  # servers only
    create_schema: bool = True  # create and migrate the tables on start
    ttl: Duration | None = None  # raw events older than this are deleted (rollups are kept)
    # metadata keys answers group or filter by (`--by metadata.customer`, budget scopes):
    # each gets a daily rollup by value, so those answers read no raw events
    rollup_metadata: list[str] = msgspec.field(default_factory=list)
    dedup_window: int = 10_000  # recent insert tokens remembered, so a retried batch lands once
    async_insert: bool = False  # servers only: server-side batching, still waited for
    cluster: ClusterConfig | None = None  # servers only
    connect_timeout: Duration = Duration(10)  # servers only: to open a connection
    query_timeout: Duration = Duration(60)  # for one insert or query
    # How often the rollups of recent hours are checked for events two writers both stored,
    # and those hours rebuilt (0: never); and how far back (see repair.py).
    repair_interval: Duration = Duration(300)
    repair_lookback: Duration = Duration(48 * 3600)  # how far back repair checks hours
    # chdb:// only: the memory one query or insert may take (absent: 256); GROUP BY and
    # ORDER BY spill to disk past half of it (see connection.py for the embedded engine's
    # other bounds). A server's limits are the server's.
    max_query_memory_mib: int | None = None
    batch: BatchConfig = msgspec.field(
        default_factory=lambda: BatchConfig(max_size=10_000, timeout=Duration(1)))

    def __post_init__(self) -> None:
        refuse_projection(self, "clickhouse", "writes the fixed columns of its table")
        endpoint = self.endpoint or "chdb://"
        if not endpoint.startswith(("chdb://", "http://", "https://")):
            raise ValueError(f"endpoint must start with chdb://, http:// or https://, "
                             f"got {self.endpoint!r}")
        if endpoint.startswith("chdb://") and (self.async_insert or self.cluster):
            raise ValueError("async_insert and cluster apply to a ClickHouse server "
                             "(an http(s):// endpoint), not to the embedded chdb://")
        if not endpoint.startswith("chdb://") and self.max_query_memory_mib is not None:
            raise ValueError("max_query_memory_mib applies to the embedded chdb:// ClickHouse; "
                             "a server's memory limits are set on the server")
        if self.max_query_memory_mib is not None and self.max_query_memory_mib < 16:
            raise ValueError(f"max_query_memory_mib must be at least 16, "
                             f"got {self.max_query_memory_mib}")
        for name in (self.database, self.table):
            if not _IDENTIFIER.match(name):
                raise ValueError(f"database and table must be plain identifiers, got {name!r}")
        for key in self.rollup_metadata:
            if not _METADATA_KEY.match(key):
                raise ValueError(f"rollup_metadata keys must be letters, digits and _.:- , "
                                 f"got {key!r}")
        if len(set(self.rollup_metadata)) != len(self.rollup_metadata):
            raise ValueError("rollup_metadata lists a key twice")
        if self.dedup_window < 1:
            raise ValueError("dedup_window must be at least 1")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("ttl must be a positive duration such as 90d")
        if self.repair_interval and self.repair_lookback < 3600:
            raise ValueError("repair_lookback must be at least 1h")
        if self.repair_interval and self.ttl is not None and self.repair_lookback >= self.ttl:
            # past the TTL the raw events are gone: their rollup rows must not be "repaired"
            raise ValueError(f"repair_lookback ({self.repair_lookback:g}s) must be shorter "
                             f"than ttl ({self.ttl:g}s)")
