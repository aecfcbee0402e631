"""The audit log in ClickHouse: the `finops` extension copies the daemon's audit log
(`meterline/audit.py`, through `Context.audit`) into the table `audit_log` of the database
it reads, which it creates.

It copies when it starts (every kept entry the table lacks: those of a time it was not
running, or could not reach ClickHouse) and on each new entry, which it learns of by
subscribing to the log. A copy looks up which of the kept entries' ids the table has and
inserts the others, so it never writes one twice, whenever it runs; a failed copy is tried
again every `RETRY` seconds. The table is a `ReplacingMergeTree` ordered by time and id,
so two writers racing (two daemons of one data directory cannot; a restart during a copy
can) leave one row after merges. On a cluster the table is replicated within the shard
written to, not distributed.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from meterline.component import cancel_and_wait

if TYPE_CHECKING:
    from meterline.exporters.clickhouse.schema import Schema
    from meterline.extensions.finops.extension import FinOps

TABLE = "audit_log"
RETRY = 30.0
COLUMNS = ["id", "seq", "time", "trigger", "host", "file", "sha256", "result", "error",
           "changes", "restart_needed"]


def create_table(schema: Schema) -> str:
    engine = "ReplicatedReplacingMergeTree" if schema.cluster else "ReplacingMergeTree"
    return (f"CREATE TABLE IF NOT EXISTS {schema.qualified(TABLE)}{schema.on_cluster} (\n"
            "  id String,\n  seq UInt64,\n  time DateTime64(3, 'UTC'),\n"
            "  trigger LowCardinality(String),\n  host LowCardinality(String),\n"
            "  file String,\n  sha256 String,\n  result LowCardinality(String),\n"
            "  error String,\n  changes String,\n  restart_needed Array(String)\n"
            f") ENGINE = {engine}\nORDER BY (time, id)")


def row(entry: dict[str, Any]) -> list[Any]:
    from datetime import datetime

    return [entry["id"], entry["seq"], datetime.fromisoformat(entry["time"]),
            entry["trigger"], entry.get("host", ""), entry["file"], entry.get("sha256") or "",
            entry["result"], entry.get("error") or "",
            json.dumps(entry.get("changes") or {}, ensure_ascii=False),
            entry.get("restart_needed") or []]


def copy(client: Any, schema: Schema, entries: list[dict[str, Any]]) -> int:
    """Insert the `entries` the table lacks (creating it when missing); how many."""
    client.command(create_table(schema))
    if not entries:
        return 0
    stored = {r[0] for r in client.query(
        f"SELECT id FROM {schema.qualified(TABLE)} WHERE has({{ids:Array(String)}}, id)",
        parameters={"ids": [e["id"] for e in entries]}).result_rows}
    missing = [row(e) for e in reversed(entries) if e["id"] not in stored]
    if missing:
        client.insert(schema.qualified(TABLE), missing, column_names=COLUMNS)
    return len(missing)


class AuditCopy:
    """The background copy of one extension (started and stopped with it)."""

    def __init__(self, extension: FinOps) -> None:
        self.extension = extension
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None

    def start(self) -> None:
        audit = self.extension.context.audit
        if audit is None:  # no daemon: nothing to copy
            return
        self._unsubscribe = audit.subscribe(lambda _: self._wake.set())
        self._wake.set()  # what was recorded before it ran
        self._task = asyncio.create_task(self._run(), name=f"{self.extension.context.id} audit")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        audit = self.extension.context.audit
        assert audit is not None
        log = self.extension.log
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                reader = await self.extension.connect()
                entries = await asyncio.to_thread(audit.entries)
                written = await asyncio.to_thread(copy, reader.client, reader.schema, entries)
            except Exception as e:
                log.warning("cannot copy the audit log to ClickHouse", error=str(e),
                            retry_in_s=RETRY)
                await asyncio.sleep(RETRY)
                self._wake.set()
            else:
                if written:
                    log.debug("audit log copied to ClickHouse", entries=written)
