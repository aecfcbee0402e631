"""Opening ClickHouse through clickhouse-connect, and telling failures apart.

`chdb://PATH` is the embedded engine (chDB, in-process; a relative PATH is
relative to the working directory, as other paths in pipeline.yaml are);
`http(s)://HOST:PORT` is a server. Both give the same clickhouse-connect
`Client`, so everything above this module is one code path.

chDB hosts one data directory per process and locks it against other
processes: while the daemon runs, `meterline finops` asks the daemon's admin
API rather than opening the directory (see `cli.py`).

The embedded engine is bounded: small caches, merges column by column, small
parts in one file, freed memory handed back soon, a memory limit per query
(`max_query_memory_mib`). chDB takes server settings in three ways, each
honoured differently: the query parameters of its connection string (clickhouse-
connect's `chdb_options`) are the engine's startup arguments, so server settings
there count only for the connection that starts the engine (later ones are
silently ignored while it runs) and `merge_tree.*` keys are not read at all; a
`config-file` parameter names a ClickHouse XML configuration, `<merge_tree>`
defaults included; and session settings (`SET`, the client's `settings`) hold
per connection. A `chdb://PATH?key=value` DSN passes no server setting
(clickhouse-connect drops unknown keys). So the server settings are written to
`<PATH>/meterline-server.xml`, rewritten at every open, and the query limits are
the clients' settings. chDB's allocator (jemalloc) reads only the
`JE_MALLOC_CONF` environment variable, once, when the library loads.

Measured (RSS of one process that opens chDB, creates the exporter's tables and
inserts events of 1.3 KB as the exporter does, with its "already stored?" check
and the rollup views): idle 295-300 MB either way, 175 MB of it (190 MB once
used) pages of chDB's 555 MB library mapped from disk, which no setting changes
(most of them touched by its start alone: `drop_start_up_pages` hands those back),
and 210 MB file-backed in all; 100,000 events in batches of 1,000: peak 610-670
MB before, 435-440 MB after; 60,000 in batches of 10,000: 530-550 MB before, 465
MB after; the same CPU, and the same query times on the 10-million-event bench.
Most of the peak was merges of the ~60-column `llm_events`, made row-wise with
every column stream open at once (up to 270 MB tracked in one merge), and
jemalloc keeping freed pages for 5 s after each. Merges now go column by column,
small parts are written in one file, and jemalloc hands freed pages back after
250 ms (0 ms would save another 25 MB at 30% more CPU per insert). In the whole
daemon (`bench/default_pipeline_bench.py --only ingest`: 60,000 events through
the default pipeline) the main process peaked at 690 MB rather than 705-785 MB
(the process tree at 765-780 MB rather than 750-845): the rest of its memory is
not chDB's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)

from meterline.component import PermanentError, RetryableError
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.memory import page_out

# Server error codes that say "later" rather than "never": overload, timeouts, network,
# queries cancelled or aborted (a server restarting, a replica switching), replicas or
# ZooKeeper away, too many parts waiting to merge, a full disk, an exhausted quota.
# (tests check each name against ClickHouse's own table, errorCodeToName.)
RETRYABLE_CODES = {
    3: "UNEXPECTED_END_OF_FILE",
    32: "ATTEMPT_TO_READ_AFTER_EOF",
    95: "CANNOT_READ_FROM_SOCKET",
    96: "CANNOT_WRITE_TO_SOCKET",
    159: "TIMEOUT_EXCEEDED",
    164: "READONLY",
    173: "CANNOT_ALLOCATE_MEMORY",
    198: "DNS_ERROR",
    201: "QUOTA_EXCEEDED",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    243: "NOT_ENOUGH_SPACE",
    252: "TOO_MANY_PARTS",
    279: "ALL_CONNECTION_TRIES_FAILED",
    285: "TOO_FEW_LIVE_REPLICAS",
    289: "REPLICA_IS_NOT_IN_QUORUM",
    319: "UNKNOWN_STATUS_OF_INSERT",
    369: "ALL_REPLICAS_ARE_STALE",
    373: "SESSION_IS_LOCKED",
    394: "QUERY_WAS_CANCELLED",
    415: "ALL_REPLICAS_LOST",
    416: "REPLICA_STATUS_CHANGED",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    473: "DEADLOCK_AVOIDED",
    735: "QUERY_WAS_CANCELLED_BY_CLIENT",
    745: "SERVER_OVERLOADED",
    999: "KEEPER_EXCEPTION",
}
# Codes of a value ClickHouse cannot store (one bad row, not a bad statement): the exporter
# then looks for the rows at fault and stores the others.
ROW_CODES = {
    6: "CANNOT_PARSE_TEXT",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    41: "CANNOT_PARSE_DATETIME",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    395: "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",  # the embedded insert's range checks
}
# A gateway, proxy or load balancer in front of the server, answering without a ClickHouse
# error code: the server is away or busy, not refusing the statement.
RETRYABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
_NAMED_COLUMN = re.compile(r"column `?'?([A-Za-z0-9_.]+)")

# Big enough for the "already stored?" check of a 100,000-event batch (ids inlined in SQL).
_MAX_QUERY_SIZE = 16 << 20

_MIB = 1 << 20
SERVER_CONFIG = "meterline-server.xml"  # in the chDB directory, written at every open
DEFAULT_QUERY_MEMORY_MIB = 256  # max_query_memory_mib, absent
# The engine's caches (ClickHouse's defaults are sized for a server: 5 GiB each for marks,
# primary indexes and index marks). Our tables' marks and primary keys are a few MB even at
# 10 million events; the uncompressed-block caches stay off. No max_server_memory_usage:
# set to 512 MiB, or even 2 GiB (not 8 GiB), it made the queries on raw events of the
# 10-million-event bench twice as slow, for no lower RSS (chDB 26.9).
SERVER_SETTINGS = {
    "mark_cache_size": 32 * _MIB,
    "primary_index_cache_size": 16 * _MIB,
    "index_mark_cache_size": 8 * _MIB,
    "uncompressed_cache_size": 0,
    "index_uncompressed_cache_size": 0,
    "query_condition_cache_size": 8 * _MIB,
    "compiled_expression_cache_size": 16 * _MIB,
}
MERGE_TREE = {
    # Merge column by column (vertical) whatever the size of the parts: a row-wise merge of
    # llm_events opens every one of its ~60 columns in every part at once.
    "vertical_merge_algorithm_min_rows_to_activate": 1,
    # A part written as one file per column stream (Wide) holds a compression buffer per
    # stream (~150 for llm_events) while it is written: an insert of 10,000 events of
    # 1.4 KB took over 256 MiB so. Parts under 32 MiB (an insert of ~25,000 events) are
    # written Compact, in one file (that insert: 48 MiB), and stream buffers are 256 KiB
    # rather than 1 MiB.
    "min_bytes_for_wide_part": 32 * _MIB,
    "max_compress_block_size": 256 << 10,
}
# jemalloc's default keeps freed pages for 5 s (dirty_decay_ms:5000), so the transient
# memory of each insert and merge piles up; 250 ms costs no measurable CPU.
ALLOCATOR_ENV = "JE_MALLOC_CONF"
ALLOCATOR_CONF = "dirty_decay_ms:250"


def chdb_path(endpoint: str) -> Path | None:
    """The data directory of a `chdb://` endpoint, or None for a server."""
    if not endpoint.startswith("chdb://"):
        return None
    return Path(endpoint.removeprefix("chdb://")).resolve()


def endpoint_of(config: ClickHouseConfig, data_dir: Path) -> str:
    return config.endpoint or f"chdb://{data_dir / 'clickhouse'}"


def open_client(config: ClickHouseConfig, data_dir: Path) -> Any:
    """A clickhouse-connect client for the configured endpoint (blocking)."""
    endpoint = endpoint_of(config, data_dir)
    settings: dict[str, Any] = {"max_query_size": _MAX_QUERY_SIZE}
    without_pandas()
    path = chdb_path(endpoint)
    if path is not None:
        without_arrow()
        path.mkdir(parents=True, exist_ok=True)
        server_config = write_server_config(path)
        tune_allocator()
        return clickhouse_connect.get_client(
            interface="chdb", path=str(path), chdb_options={"config-file": str(server_config)},
            settings=settings | query_limits(config))
    return clickhouse_connect.get_client(
        dsn=endpoint, username=config.username, password=config.password,
        connect_timeout=float(config.connect_timeout),
        send_receive_timeout=float(config.query_timeout),
        autogenerate_session_id=False,  # concurrent queries from the API and the exporter
        settings=settings)


def query_limits(config: ClickHouseConfig) -> dict[str, Any]:
    """Session settings of every embedded client: the memory one query or insert may take.
    GROUP BY and ORDER BY spill to disk past half of it (`max_bytes_ratio_before_external_*`
    are 0.5 by default)."""
    mib = config.max_query_memory_mib or DEFAULT_QUERY_MEMORY_MIB
    return {"max_memory_usage": mib * _MIB}


def write_server_config(path: Path) -> Path:
    """Write the embedded engine's server settings as a ClickHouse configuration file in
    the chDB directory (atomically: a crash leaves the old file or the new one) and return
    its path. The engine reads it when it starts."""
    lines = ["<clickhouse>",
             "  <!-- written by meterline at every open: see exporters/clickhouse/connection.py"
             " -->"]
    lines += [f"  <{key}>{int(value)}</{key}>" for key, value in SERVER_SETTINGS.items()]
    lines += ["  <merge_tree>"]
    lines += [f"    <{key}>{int(value)}</{key}>" for key, value in MERGE_TREE.items()]
    lines += ["  </merge_tree>", "</clickhouse>", ""]
    target = path / SERVER_CONFIG
    partial = target.with_suffix(".xml.partial")
    partial.write_text("\n".join(lines))
    partial.replace(target)
    return target


def tune_allocator() -> bool:
    """Set chDB's jemalloc options, unless the operator set their own or the library is
    loaded already (jemalloc reads them once, at load). Whether they are ours. Called when
    this module is imported (in the daemon: on the main thread, while the configuration is
    read, before any thread runs: changing the environment is not thread-safe in C), and
    again before chDB is first opened."""
    if ALLOCATOR_ENV in os.environ or "chdb" in sys.modules:
        return os.environ.get(ALLOCATOR_ENV) == ALLOCATOR_CONF
    os.environ[ALLOCATOR_ENV] = ALLOCATOR_CONF
    return True


def drop_start_up_pages() -> int:
    """Reclaim the pages of chDB's library that only its start touched (see
    `memory.page_out`): the bytes advised. Called once the embedded engine has started
    and the schema is in place: about 180 MB resident before, 11 right after, 60-70 once
    inserts and queries have run again."""
    spec = importlib.util.find_spec("chdb._chdb")
    return page_out(spec.origin) if spec is not None and spec.origin else 0


def without_pandas() -> None:
    """clickhouse-connect imports pandas and numpy at the first insert, only to ask whether
    the data is a DataFrame or an array. We insert Python columns: pandas would cost the
    daemon 80 MB of memory and 1.6 s of CPU, numpy 16 MB. Marking them absent is the state
    the library is in when they are not installed (chDB's wheels bring them)."""
    options = vars(importlib.import_module("clickhouse_connect.driver.options"))
    for name in ("pd", "np"):
        options.setdefault(name, None)


def without_arrow() -> None:
    """Import chDB's connection module (`chdb.state`, which `chdb.connect` imports) with
    pyarrow marked absent, unless something imported pyarrow already. It imports pyarrow
    (and pyarrow numpy) only for chDB's Arrow results, which clickhouse-connect never asks
    for (it reads Native): 14 MB of the daemon's memory and 28 MB of library pages.
    pyarrow is importable again once this returns (the `s3` exporter needs it)."""
    if "pyarrow" in sys.modules or "chdb.state" in sys.modules:
        return
    sys.modules["pyarrow"] = None  # type: ignore[assignment]  # `import pyarrow` fails
    try:
        importlib.import_module("chdb.state")
    finally:
        del sys.modules["pyarrow"]


def insert_settings(config: ClickHouseConfig, token: str) -> dict[str, Any]:
    """Per-insert settings: the deduplication token, and what makes it hold on a server.
    Servers refuse view-level deduplication with asynchronous inserts; there the rollups
    rely on the "already stored?" check, which sees a flushed insert (we wait for it)."""
    settings: dict[str, Any] = {"insert_deduplication_token": token}
    if config.async_insert:
        settings |= {"async_insert": 1, "wait_for_async_insert": 1,
                     "async_insert_deduplicate": 1}
    else:
        settings["deduplicate_blocks_in_dependent_materialized_views"] = 1
    if config.cluster:
        settings["distributed_foreground_insert"] = 1  # stored on the shards before we ack
    return settings


def classify(error: Exception) -> Exception:
    """`RetryableError` for what may pass (connection, overload), `PermanentError` naming
    the column for what will not (a schema mismatch, a value that does not fit)."""
    if isinstance(error, RetryableError | PermanentError):
        return error
    if isinstance(error, OperationalError):
        return RetryableError(f"cannot reach ClickHouse: {error}")
    code = getattr(error, "code", None)
    if isinstance(error, DatabaseError) and code in RETRYABLE_CODES:
        return RetryableError(f"ClickHouse is busy or unavailable: {_first_line(error)}")
    if isinstance(error, DatabaseError) and code is None and _http_status(error) in RETRYABLE_HTTP:
        return RetryableError(f"ClickHouse is unavailable behind a proxy: {_first_line(error)}")
    if isinstance(error, ProgrammingError) and "Unable to open the chdb engine" in str(error):
        return RetryableError(f"{_first_line(error)} (is another process using the directory?)")
    if isinstance(error, DataError | ProgrammingError | DatabaseError | ValueError | TypeError):
        named = _NAMED_COLUMN.search(str(error))
        where = f"column {named.group(1)}: " if named else ""
        return PermanentError(f"ClickHouse refused the batch: {where}{_first_line(error)}")
    return RetryableError(f"ClickHouse error: {_first_line(error)}")


def is_row_error(error: Exception) -> bool:
    """Whether a refused insert failed on a value of some row (so that the other rows of the
    batch would be stored), rather than on the statement or the table."""
    if isinstance(error, ProgrammingError):  # a column the table lacks, a bad statement
        return False
    if isinstance(error, DataError | ValueError | TypeError):  # refused while encoding a row
        return True
    return isinstance(error, DatabaseError) and getattr(error, "code", None) in ROW_CODES


def over_query_memory(error: Exception) -> PermanentError | None:
    """For an insert that took more memory than one query may (`max_query_memory_mib`),
    rather than more than the process as a whole had, the refusal to give if even one
    event is too big; None for any other error. A smaller insert may fit."""
    if not (isinstance(error, DatabaseError) and getattr(error, "code", None) == 241
            and "Query memory limit exceeded" in str(error)):
        return None
    return PermanentError(f"an insert needs more than max_query_memory_mib: "
                          f"{_first_line(error)}")


def _http_status(error: Exception) -> int | None:
    m = _HTTP_STATUS.search(str(error))
    return int(m.group(1)) if m else None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


tune_allocator()  # see its docstring: before any thread runs
