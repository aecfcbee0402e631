"""The `finops` extension copies the daemon's audit log into ClickHouse (`audit_log`):
what was recorded before it started, each new entry, and nothing twice."""

from __future__ import annotations

import dataclasses
import json

from meterline.audit import AuditLog, Change, Changes
from meterline.extensions.finops.audit import TABLE
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import eventually


def rows(extension) -> list[tuple]:
    """The table's rows; none while the extension has not connected or created it."""
    if extension.reader is None or not extension.reader.client.command(
            f"EXISTS TABLE meterline.{TABLE}"):
        return []
    return extension.reader.client.query(
        f"SELECT seq, trigger, result, error, changes FROM meterline.{TABLE} FINAL "
        "ORDER BY seq").result_rows


async def test_the_audit_log_table_receives_past_and_new_entries_once(tmp_path):
    log = AuditLog(tmp_path / "daemon")
    log.open()
    await log.record(log.entry("start", "p.yaml", "ab" * 32, "applied",
                               changes=Changes(added=[Change("exporter", "clickhouse")])))
    async with clickhouse_exporters(tmp_path) as make:
        exporter = await make()
        extension = finops_of(exporter)
        extension.context = dataclasses.replace(extension.context, audit=log)
        await extension.start()
        try:
            await log.record(log.entry("signal", "p.yaml", None, "refused",
                                       error="p.yaml:3: bad"))
            await eventually(lambda: len(rows(extension)) == 2)
        finally:
            await extension.shutdown()
        again = finops_of(exporter)  # a restart: nothing is written twice
        again.context = dataclasses.replace(again.context, audit=log)
        await again.start()
        try:
            await log.record(log.entry("admin_api", "p.yaml", "cd" * 32, "applied"))
            await eventually(lambda: len(rows(again)) == 3)
            stored = rows(again)
        finally:
            await again.shutdown()
    assert [r[:4] for r in stored] == [(1, "start", "applied", ""),
                                       (2, "signal", "refused", "p.yaml:3: bad"),
                                       (3, "admin_api", "applied", "")]
    assert json.loads(stored[0][4])["added"] == [{"kind": "exporter", "id": "clickhouse"}]
