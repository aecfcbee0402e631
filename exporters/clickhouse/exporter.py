"""Exporter `clickhouse`: events into `llm_events` and its rollups, for FinOps.

Each batch is one insert: column-oriented into a server, JSON lines that the engine reads
itself into an embedded chDB (`_write_lines`). Nothing is counted twice:

- A retried batch carries the same `insert_deduplication_token` (the queue's batch id,
  stable across retries and restarts), so ClickHouse stores it once, and the rollup
  view skips it too (`deduplicate_blocks_in_dependent_materialized_views`).
- A re-sent event (same `event_id` in another batch, as at-least-once sources do) is
  dropped before the insert: the exporter asks which of the batch's ids are already
  stored within the batch's time range (events keep their timestamp when re-sent, and
  the table is ordered by hour and id, so this reads little), and inserts the rest.
  Filtering before the insert matters because the materialized view would add a
  duplicate to the rollup whatever the raw table later merges away.
- Two writers storing the same event at the same moment (both checks ran before either
  insert) leave two copies, which no answer counts twice: each writer holds the hours
  it writes open (answers read them from the events, deduplicated) until it has
  looked its ids up for copies and, finding some, had the hours' rollups rebuilt
  (`repair.py`). Every `repair_interval` the rollups of recent hours are checked too.
  An embedded chDB directory is opened by one process only, and its exporters in that
  process take turns (one lock per directory): they cannot race, so they skip the look
  for copies, which costs a query naming every id of the batch.
- A batch whose insert was cut short by a kill (raw rows stored, some view's rows not) is
  delivered again after the restart; finding some of its events stored already, the
  exporter checks the rollups of their hours and rebuilds those that fall short.

It only writes: the analytics API, budgets and `meterline finops` are the `finops`
extension's, which reads these tables (and which this package knows nothing of).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meterline.component import (
    Context,
    ExportBatch,
    Exporter,
    Factory,
    PermanentError,
    RetryableError,
    cancel_and_wait,
)
from meterline.event import Event, jsonl_pieces
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import (
    chdb_path,
    classify,
    drop_start_up_pages,
    endpoint_of,
    insert_settings,
    is_row_error,
    open_client,
    over_query_memory,
)
from meterline.exporters.clickhouse.query import Reader, iso, literal, settings_clause
from meterline.exporters.clickhouse.schema import Schema, ensure_schema

# Looking for the rows a batch was refused for: at most this many inserts (one bad row in
# 10,000 takes 29), and the first few refused ids named in the error.
_ISOLATING_INSERTS = 64
_NAMED_IDS = 10

# The writers of each embedded chDB directory in this process, which take turns.
_EMBEDDED_WRITERS: dict[Path, threading.Lock] = {}


class ClickHouseExporter(Exporter):
    def __init__(self, config: ClickHouseConfig, context: Context) -> None:
        self.config = config
        self.context = context
        self.log = context.log
        self.schema = Schema.of(config)
        self._writer: Any = None
        self.reader: Reader | None = None
        self._connecting = asyncio.Lock()
        # Inserts and rollup checks take turns, so that a check never sees an insert of
        # this exporter half done (its raw rows in, its views' rows not yet); on an
        # embedded directory, with every other writer of the directory.
        embedded = chdb_path(endpoint_of(config, context.data_dir))
        self._writing = (threading.Lock() if embedded is None
                         else _EMBEDDED_WRITERS.setdefault(embedded, threading.Lock()))
        self._may_race = embedded is None  # another writer may store the same events
        self._embedded = embedded
        self._lines_insert = _lines_insert(self.schema)
        self._closed = False
        self._repair_task: asyncio.Task[None] | None = None
        self._duplicates = context.meter.create_counter(
            "meterline_exporter_duplicate_events",
            description="Events not stored again: their event_id was already stored")
        self._repaired = context.meter.create_counter(
            "meterline_exporter_rollup_repaired_hours",
            description="Hours of the rollups rebuilt from the deduplicated events, because "
                        "two writers had both stored some event of the hour")
        self._attrs = {"exporter": context.id}

    # --- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.connect()
        except Exception as e:  # the queue holds the events; export() connects again
            self.log.warning("ClickHouse not available yet; will retry", error=str(e))
        if self.config.repair_interval:
            self._repair_task = asyncio.create_task(self._keep_repairing(),
                                                    name=f"{self.context.id} rollup repair")

    async def shutdown(self) -> None:
        self._closed = True  # an export or repair still running must not open them again
        await cancel_and_wait(self._repair_task)
        for client in (self._writer, self.reader.client if self.reader else None):
            if client is not None:
                await asyncio.to_thread(client.close)
        self._writer = self.reader = None

    async def connect(self) -> Reader:
        """Open the clients (and create or migrate the schema) unless done already."""
        async with self._connecting:
            if self._closed:
                raise RetryableError("the exporter is shutting down")
            if self.reader is None:
                try:
                    self._writer, reader = await asyncio.to_thread(self._open)
                except Exception as e:
                    raise classify(e) from e
                self.reader = reader
            return self.reader

    def _open(self) -> tuple[Any, Reader]:
        writer = open_client(self.config, self.context.data_dir)
        try:
            if self.config.create_schema:
                for statement in ensure_schema(writer, self.schema):
                    self.log.info("schema changed", statement=statement.splitlines()[0])
            # A second client for reads (what tests and benches ask of the tables), so that
            # a long query never holds up an insert.
            reader = Reader(open_client(self.config, self.context.data_dir), self.schema)
        except Exception:
            writer.close()
            raise
        if self._embedded is not None:
            dropped = drop_start_up_pages()
            self.log.debug("chDB's start-up pages dropped", bytes=dropped)
        return writer, reader

    # --- export --------------------------------------------------------------------
    async def export(self, batch: ExportBatch) -> None:
        await self.connect()
        try:
            await asyncio.to_thread(self._insert, batch.id, batch.events)
        except Exception as e:
            raise classify(e) from e

    def _insert(self, batch_id: str, events: list[Event]) -> None:
        first: dict[str, Event] = {}
        for e in events:
            first.setdefault(e.event_id, e)
        unique = list(first.values())
        with self._writing:
            stored = self._already_stored(unique)
            new = [e for e in unique if e.event_id not in stored] if stored else unique
            if len(new) != len(events):
                self._duplicates.add(len(events) - len(new), self._attrs)
            # The hours written are held open (answers read them from the events) until
            # they are known to count right: another writer may be storing the same
            # events this very moment (see repair.py).
            token = f"{batch_id}:{uuid.uuid4().hex}"
            written = {_hour(e) for e in new}
            repair.open_hours(self._writer, self.schema, written, token)
            try:
                refused, error = self._store(batch_id, new) if new else ([], None)
            finally:
                if stored:  # perhaps a batch cut short by a kill: see repair.py
                    hours = {_hour(e) for e in unique if e.event_id in stored}
                    self._rebuilt(repair.reconcile(self._writer, self.schema, hours, token,
                                                   wait=self._may_race))
            # An insert that failed leaves its hours open: a retry, or the repair pass
            # once the mark is abandoned, makes them right before answers read the rollups.
            if self._may_race and (twice := self._stored_twice(new)):
                self._rebuilt(repair.reconcile(
                    self._writer, self.schema, {_hour(e) for e in new if e.event_id in twice},
                    token))
            repair.close_hours(self._writer, self.schema, written, token)
        if refused:
            ids = ", ".join(e.event_id for e in refused[:_NAMED_IDS])
            more = f" and {len(refused) - _NAMED_IDS} more" if len(refused) > _NAMED_IDS else ""
            raise PermanentError(
                f"{error}; {len(refused)} of {len(new)} events refused (event_id {ids}{more}), "
                f"the other {len(new) - len(refused)} stored", events=refused) from error

    def _store(self, batch_id: str, events: list[Event]) -> tuple[list[Event], Exception | None]:
        """Insert the events; if ClickHouse refuses a value of some row, find the rows at
        fault by inserting halves (recursively, within `_ISOLATING_INSERTS` inserts) and
        store the others. An embedded insert over the query memory limit is split the
        same way, and an event too big even alone is refused with that reason. Returns
        the refused events and why. Any other error is raised: a retry sends the batch
        again, and the "already stored?" check skips what got in."""
        pending, refused = [events], []
        error: Exception | None = None
        inserts = 0
        while pending:
            group = pending.pop()
            try:
                inserts += 1
                self._write(batch_id, group)
            except Exception as e:
                too_big = over_query_memory(e) if self._embedded is not None else None
                if not (is_row_error(e) or too_big):
                    raise classify(e) from e
                error = error or too_big or classify(e)
                if len(group) == 1 or inserts >= _ISOLATING_INSERTS:
                    refused += group
                else:
                    pending += [group[len(group) // 2:], group[:len(group) // 2]]
        return refused, error

    def _write(self, batch_id: str, events: list[Event]) -> None:
        # The token names this batch and exactly the events sent: a retry of the same send
        # is deduplicated, while a retry that sends fewer events (some got stored) is not
        # mistaken for the first send.
        digest = hashlib.blake2b("\n".join(e.event_id for e in events).encode(),
                                 digest_size=8)
        settings = insert_settings(self.config, f"{batch_id}:{digest.hexdigest()}")
        if self._embedded is not None:
            self._write_lines(events, settings)
            return
        self._writer.insert(
            self.schema.qualified(self.schema.events), self.schema.column_batch(events),
            column_names=[c.name for c in self.schema.inserted], column_oriented=True,
            settings=settings)

    def _write_lines(self, events: list[Event], settings: dict[str, Any]) -> None:
        """The embedded engine's insert: the events' JSON lines (msgspec writes them in
        one call) read by ClickHouse itself, which converts them to the columns in C++.
        That is a third of the cost of building the columns here (`bench/`), the
        insert's largest share. The deduplication token still keeps a retried insert
        out of `llm_events`, though chDB's views do not skip an `INSERT ... SELECT`
        twice: for an embedded engine, the "already stored?" check (which always sees an
        earlier insert: one process writes) is what keeps a retry out of the rollups."""
        assert self._embedded is not None
        with tempfile.NamedTemporaryFile(dir=self._embedded, prefix=".insert-",
                                         suffix=".jsonl") as lines:
            lines.writelines(jsonl_pieces(events))  # each piece written as encoded
            lines.flush()
            self._writer.command(self._lines_insert.format(
                path=literal(lines.name), settings=settings_clause(settings | _LINES_SETTINGS)))

    def _already_stored(self, events: list[Event]) -> set[str]:
        """The ids of `events` stored already. A live stream's batch covers the last moments,
        where few events are stored yet: those ids are fetched and compared here, which
        costs milliseconds. A batch over a long stretch (a backfill, a replay) would fetch
        too many, so then the batch's ids are looked up instead. Either way only the
        batch's own ids come back: concurrent clients interleave their events in time, so
        the stretch holds other batches' events too."""
        table = self.schema.qualified(self.schema.events)
        where = _time_range(events)
        cap = 4 * len(events)
        stored = self._writer.query(f"SELECT event_id FROM {table} WHERE {where} "
                                    f"LIMIT {cap + 1}").result_rows
        if len(stored) > cap:
            ids = ",".join(literal(e.event_id) for e in events)
            stored = self._writer.query(
                f"SELECT event_id FROM {table} WHERE {where} AND event_id IN ({ids})").result_rows
        return {event_id for (event_id,) in stored} & {e.event_id for e in events}

    def _stored_twice(self, events: list[Event]) -> set[str]:
        """The ids of `events` (just stored) that `llm_events` holds more than once:
        another writer stored them at the same moment. Of two writers racing, the one that
        checks last sees both copies (both inserts are done by then)."""
        if not events:
            return set()
        ids = ",".join(literal(e.event_id) for e in events)
        rows = self._writer.query(
            f"SELECT event_id FROM {self.schema.qualified(self.schema.events)} "
            f"WHERE {_time_range(events)} AND event_id IN ({ids}) "
            "GROUP BY event_id HAVING count() > 1").result_rows
        return {event_id for (event_id,) in rows}

    # --- rollup repair -------------------------------------------------------------
    async def repair_rollups(self) -> list[int]:
        """One repair pass (see repair.py): the hours rebuilt, as Unix seconds."""
        await self.connect()
        lookback = timedelta(seconds=float(self.config.repair_lookback))

        def check() -> list[int]:
            with self._writing:
                return self._rebuilt(repair.repair(self._writer, self.schema, lookback,
                                                   wait=self._may_race))

        return await asyncio.to_thread(check)

    def _rebuilt(self, hours: list[int]) -> list[int]:
        if hours:
            self._repaired.add(len(hours), self._attrs)
            self.log.warning("rollups rebuilt for hours they counted wrong (an event stored "
                             "twice, or an insert cut short)",
                             hours=[iso(datetime.fromtimestamp(h, UTC)) for h in hours])
        return hours

    async def _keep_repairing(self) -> None:
        while True:
            await asyncio.sleep(float(self.config.repair_interval))
            try:
                await self.repair_rollups()
            except Exception as e:
                self.log.warning("cannot check the rollups against the events", error=str(e))


# JSON lines of events, read as the columns: fields the table lacks are skipped, and the
# messages, params and attributes are kept as their JSON text. A batch's file is parsed
# on one thread (parallel parsing cost 40% more CPU for 10,000 lines of 1.4 KB), and the
# blocks inserted are not merged by key first: `_insert` stored each event once, and a
# view's rows are grouped by its rollup's key already. Together a 10,000-event insert
# with every view went from 535 to 387 ms (medians of 15, interleaved, merges stopped).
_LINES_SETTINGS = {"input_format_skip_unknown_fields": 1,
                   "input_format_json_read_arrays_as_strings": 1,
                   "input_format_json_read_objects_as_strings": 1,
                   "input_format_null_as_default": 1,
                   "input_format_parallel_parsing": 0,
                   "optimize_on_insert": 0}


# Unsigned integer columns by their range: JSON text wraps a number past the column's type
# silently, so these are read as Int64 and refused (naming the column) when out of range.
_RANGES = {"UInt16": 0xFFFF, "UInt32": 0xFFFF_FFFF, "UInt64": 2**63 - 1}
_INTEGER = re.compile(r"^(Nullable\()?(UInt16|UInt32|UInt64)\)?$")


def _lines_insert(schema: Schema) -> str:
    """The statement that inserts a file of event JSON lines (`{path}` and `{settings}` left
    to fill in): each inserted column read with its own type, but the timestamp as the
    integer nanoseconds the event holds, unsigned integers checked against their range, and
    fields the JSON leaves out at their default given the column's default."""
    structure, checks = [], ["fromUnixTimestamp64Nano(`timestamp`, 'UTC') AS `timestamp`"]
    for column in schema.inserted:
        type_, _, default = column.type.split(" CODEC")[0].partition(" DEFAULT ")
        name = column.name
        if name == "timestamp":
            type_ = "Int64"
        elif default:  # a field left out (at its default) reads as the column's default
            type_ = f"Nullable({type_})"
            checks.append(f"ifNull(`{name}`, {default}) AS `{name}`")
        elif integer := _INTEGER.match(type_):
            type_ = "Nullable(Int64)" if integer.group(1) else "Int64"
            high = _RANGES[integer.group(2)]
            checks.append(f"if(isNull(`{name}`) OR `{name}` BETWEEN 0 AND {high}, `{name}`, "
                          f"throwIf(true, 'column {name}: a value out of the range of "
                          f"{integer.group(2)}')) AS `{name}`")
        structure.append(f"`{name}` {type_}")
    names = ", ".join(f"`{c.name}`" for c in schema.inserted)
    return (f"INSERT INTO {schema.qualified(schema.events)} ({names}) {{settings}} "
            f"SELECT * REPLACE ({', '.join(checks)}) "
            f"FROM file({{path}}, 'JSONEachRow', {literal(', '.join(structure))})")


def _time_range(events: list[Event]) -> str:
    """The condition on `timestamp` that holds the batch's events (the table's order
    starts with the hour, so this reads little)."""
    low = min(e.timestamp for e in events)
    high = max(e.timestamp for e in events)
    return (f"timestamp >= fromUnixTimestamp64Nano({low}, 'UTC') "
            f"AND timestamp <= fromUnixTimestamp64Nano({high}, 'UTC')")


def _hour(event: Event) -> int:
    return event.timestamp // 3_600_000_000_000 * 3600


factory = Factory(kind="exporter", type="clickhouse", config=ClickHouseConfig,
                  create=ClickHouseExporter)
