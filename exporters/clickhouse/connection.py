"""Opening ClickHouse through clickhouse-connect, and telling failures apart.

`chdb://PATH` is the embedded engine (chDB, in-process; a relative PATH is
relative to the working directory, as other paths in pipeline.yaml are);
`http(s)://HOST:PORT` is a server. Both give the same clickhouse-connect
`Client`, so everything above this module is one code path.

chDB hosts one data directory per process and locks it against other
processes: while the daemon runs, `meterline finops` asks the daemon's admin
API rather than opening the directory (see `cli.py`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)

from exporters.clickhouse.config import ClickHouseConfig
from meterline.component import PermanentError, RetryableError

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
}
# A gateway, proxy or load balancer in front of the server, answering without a ClickHouse
# error code: the server is away or busy, not refusing the statement.
RETRYABLE_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
_NAMED_COLUMN = re.compile(r"column `?'?([A-Za-z0-9_.]+)")

# Big enough for the "already stored?" check of a 100,000-event batch (ids inlined in SQL).
_MAX_QUERY_SIZE = 16 << 20


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
    path = chdb_path(endpoint)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(interface="chdb", path=str(path), settings=settings)
    return clickhouse_connect.get_client(
        dsn=endpoint, username=config.username, password=config.password,
        connect_timeout=float(config.connect_timeout),
        send_receive_timeout=float(config.query_timeout),
        autogenerate_session_id=False,  # concurrent queries from the API and the exporter
        settings=settings)


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


def _http_status(error: Exception) -> int | None:
    m = _HTTP_STATUS.search(str(error))
    return int(m.group(1)) if m else None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
