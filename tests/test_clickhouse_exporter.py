"""Exporter `clickhouse` against chDB: nothing counted twice, failures told apart; and the
budgets of the `finops` extension reading it."""

import time
import typing
from typing import Any

import clickhouse_connect
import msgspec
import pytest
from aiohttp import web
from clickhouse_connect.driver.binding import format_str
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)
from msgspec import convert

from meterline.component import ExportBatch, PermanentError, RetryableError
from meterline.event import Event, Guardrail
from meterline.exporters.clickhouse import repair
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import (
    RETRYABLE_CODES,
    ROW_CODES,
    classify,
    insert_settings,
    is_row_error,
)
from meterline.exporters.clickhouse.exporter import ClickHouseExporter
from meterline.exporters.clickhouse.query import literal
from meterline.exporters.clickhouse.schema import COLUMNS, Schema, ensure_schema
from meterline.extensions.finops.budgets import Budget, BudgetScope
from tests.clickhouse_helpers import clickhouse_exporters, finops_of
from tests.helpers import (
    eventually,
    free_port,
    long_prompts,
    make_context,
    make_event,
    metric_value,
)


@pytest.fixture
async def make_exporter(tmp_path):
    async with clickhouse_exporters(tmp_path) as make:
        yield make


@pytest.fixture
def engine():
    """A plain in-memory chDB client, for questions about the engine itself."""
    client = clickhouse_connect.get_client(interface="chdb", path=":memory:")
    yield client
    client.close()


def counts(exporter, figure="events"):
    """Rows in llm_events, and `figure` summed over the per-minute and per-hour rollups
    (the others sum the same)."""
    schema, client = exporter.schema, exporter.reader.client
    [(raw,)] = client.query(f"SELECT count() FROM {schema.qualified(schema.events)}").result_rows
    rolled = [client.query(f"SELECT sum({figure}) FROM {schema.qualified(r.table)}").result_rows
              [0][0] for r in schema.rollups[:2]]
    return (raw, *rolled)


async def test_agent_tool_and_guardrail_fields_are_stored_and_can_be_queried(make_exporter):
    exporter = await make_exporter()
    tool_call = make_event(0, operation="execute_tool", tool_name="search", tool_call_id="c1",
                           agent_name="planner", mcp_method="tools/call",
                           mcp_session_id="s1", request_bytes=12, response_bytes=345)
    blocked = make_event(1, policies=["guardrails"], guardrails=[
        Guardrail(rule="no-pii", stage="input", action="redact", detector="email"),
        Guardrail(rule="no-injection", stage="input", action="block")])
    await exporter.export(ExportBatch("inc:0-2", [tool_call, blocked]))
    schema, client = exporter.schema, exporter.reader.client
    rows = client.query(
        "SELECT tool_name, agent_name, mcp_method, response_bytes, policies, "
        "arrayMap(g -> (g.rule, g.action, g.detector), guardrails) "
        f"FROM {schema.qualified(schema.events)} ORDER BY event_id").result_rows
    assert [tuple(r) for r in rows] == [
        ("search", "planner", "tools/call", 345, [], []),
        ("", "", "", None, ["guardrails"],
         [("no-pii", "redact", "email"), ("no-injection", "block", "")])]


async def test_audio_token_counts_are_stored_with_their_event(make_exporter):
    exporter = await make_exporter()
    await exporter.export(ExportBatch("inc:0-2", [
        make_event(0, audio_input_tokens=600, audio_output_tokens=300, sample_weight=2.0),
        make_event(1)]))
    schema, client = exporter.schema, exporter.reader.client
    rows = client.query("SELECT audio_input_tokens, audio_output_tokens FROM "
                        f"{schema.qualified(schema.events)} ORDER BY event_id").result_rows
    assert [tuple(r) for r in rows] == [(600, 300), (None, None)]


def every_field_set() -> Event:
    """An event with every field away from its default (strings that need escaping, nested
    JSON), built from the event's own field list so that a new field is covered too."""
    values = {str: "v'\"\\\n\tx é", int: 7, float: 0.25, bool: True,
              dict[str, str]: {"customer": "a'b"}, list[str]: ["stop", "x\"y"],
              dict[str, Any]: {"x": [1, {"y": "z"}], "n": None},
              list[dict[str, Any]]: [{"role": "user", "content": "hi \"there\"\n"}],
              dict[str, int]: {"email": 2},
              list[Guardrail]: [Guardrail(rule="r", stage="input", action="block")]}
    fields = {}
    for field in msgspec.structs.fields(Event):
        kind = next(t for t in typing.get_args(field.type) or [field.type] if t is not type(None))
        fields[field.name] = values[kind]
    return Event(**fields | {"event_id": "e1", "timestamp": time.time_ns(), "status_code": 200})


@pytest.mark.parametrize("event", [every_field_set(), Event(event_id="e1", timestamp=1)],
                         ids=["every field set", "every field at its default"])
async def test_the_embedded_insert_stores_what_a_column_insert_stores(make_exporter, event):
    """chDB is given JSON lines to read (a third of the cost of building columns here):
    the row must be the one a server's column-oriented insert stores."""
    lines = await make_exporter("lines")
    columns = await make_exporter("columns", database="columns")
    await lines.export(ExportBatch("a", [event]))
    columns._writer.insert(columns.schema.qualified(columns.schema.events),
                           columns.schema.column_batch([event]),
                           column_names=[c.name for c in columns.schema.inserted],
                           column_oriented=True)

    def row(exporter):
        return exporter.reader.client.query(
            f"SELECT * FROM {exporter.schema.qualified(exporter.schema.events)}").result_rows

    assert row(lines) == row(columns)
    assert len(row(lines)) == 1


async def test_a_retried_batch_is_stored_once_in_the_events_and_the_rollup(make_exporter):
    exporter = await make_exporter()
    batch = ExportBatch("inc:0-10", [make_event(i, sample_weight=2.0) for i in range(10)])
    await exporter.export(batch)
    batch.attempt = 1
    await exporter.export(batch)
    assert counts(exporter) == (10, 10, 10)
    assert counts(exporter, "requests") == (10, 20, 20)  # weighted: each stands for two


async def test_the_tables_keep_insert_tokens_so_a_repeated_insert_lands_once(make_exporter):
    """What a retry relies on where the "already stored?" check cannot see the first insert
    yet (a replica behind): the token alone deduplicates, in the rollup too."""
    exporter = await make_exporter()
    schema, config = exporter.schema, exporter.config
    events = [make_event(i) for i in range(5)]
    for _ in range(3):
        exporter._writer.insert(
            schema.qualified(schema.events), schema.column_batch(events),
            column_names=[c.name for c in schema.inserted], column_oriented=True,
            settings=insert_settings(config, "batch-7"))
    assert counts(exporter) == (5, 5, 5)


async def test_the_embedded_insert_carries_its_deduplication_token(make_exporter):
    """The settings are written into the statement (`settings_clause`), not set around it:
    a second insert under the same token, of other events here, is skipped."""
    exporter = await make_exporter()
    settings = insert_settings(exporter.config, "batch-7")
    exporter._write_lines([make_event(i) for i in range(5)], settings)
    exporter._write_lines([make_event(i) for i in range(5, 10)], settings)
    assert counts(exporter)[0] == 5


async def test_marks_opened_twice_alike_are_both_kept(make_exporter):
    """A mark is counted by summing its rows: none may be taken for a repeated insert."""
    exporter = await make_exporter()
    schema = exporter.schema
    for _ in range(2):
        repair.open_hours(exporter._writer, schema, {1_700_000_000 // 3600 * 3600}, "t")
    [(rows,)] = exporter.reader.client.query(
        f"SELECT count() FROM {schema.qualified(schema.open_hours_table)}").result_rows
    assert rows == 2


async def test_an_event_sent_again_in_another_batch_is_not_counted_twice(make_exporter):
    exporter = await make_exporter()
    await exporter.export(ExportBatch("a", [make_event(i) for i in range(10)]))
    await exporter.export(ExportBatch("b", [make_event(i) for i in range(5, 15)]))
    assert counts(exporter) == (15, 15, 15)
    registry = exporter.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_duplicate_events_total") == 5


async def test_a_new_batch_between_stored_events_is_stored_at_the_first_attempt(make_exporter):
    """Concurrent clients interleave their events in time: a batch's time range holds
    events of other batches stored already. None of its own is, so nothing is checked
    and the insert succeeds at once (it used to fail after storing, and its hours stayed
    open until a retry)."""
    exporter = await make_exporter()
    await exporter.export(ExportBatch("even", [make_event(i) for i in range(0, 20, 2)]))
    await exporter.export(ExportBatch("odd", [make_event(i) for i in range(1, 20, 2)]))
    assert counts(exporter) == (20, 20, 20)
    registry = exporter.context.telemetry.registry
    assert metric_value(registry, "meterline_exporter_duplicate_events_total") == 0


async def test_a_resent_event_is_recognised_in_a_batch_spanning_many_stored_ones(
        make_exporter):
    """A replay batch over a long stretch: the check looks its ids up rather than fetching
    every id stored in that stretch."""
    exporter = await make_exporter()
    await exporter.export(ExportBatch("a", [make_event(i) for i in range(100)]))
    replay = [make_event(0), make_event(50), make_event(99), make_event(500)]
    await exporter.export(ExportBatch("b", replay))
    assert counts(exporter) == (101, 101, 101)


async def test_writers_of_one_embedded_directory_take_turns_and_skip_the_look_for_copies(
        make_exporter):
    """One process opens an embedded directory, and its writers share one lock: no two of
    them can store the same event at once, so none asks which ids are stored twice."""
    first, second = await make_exporter("a"), await make_exporter("b")
    assert first._writing is second._writing
    looked = []
    second._stored_twice = lambda events: looked.append(events) or set()
    await first.export(ExportBatch("a", [make_event(i) for i in range(10)]))
    await second.export(ExportBatch("b", [make_event(i) for i in range(5, 15)]))
    assert counts(first) == (15, 15, 15) and looked == []


async def test_a_redelivered_batch_on_an_embedded_directory_waits_for_no_dead_writer(
        make_exporter, monkeypatch):
    """A mark left open by a daemon killed mid-insert is a dead writer's: the batch it was
    writing, delivered again, is checked and its hours set right at once."""
    exporter = await make_exporter()
    events = [make_event(i) for i in range(10)]
    await exporter.export(ExportBatch("a", events))
    repair.open_hours(exporter._writer, exporter.schema, {e.timestamp // 3_600_000_000_000
                                                           * 3600 for e in events}, "dead")
    waited = []
    monkeypatch.setattr(repair, "wait_for_older", lambda *args, **kw: waited.append(args))
    await exporter.export(ExportBatch("a", events))
    assert waited == [] and counts(exporter) == (10, 10, 10)


async def test_writers_of_a_server_look_for_copies_another_writer_stored(tmp_path):
    exporter = ClickHouseExporter(convert({"endpoint": "http://127.0.0.1:1"}, ClickHouseConfig),
                                  make_context(tmp_path, "clickhouse"))
    assert exporter._may_race


@pytest.mark.parametrize("value", ["evt-1", "o'k", "back\\slash", "tab\tline\nfeed`", ""])
def test_literals_are_escaped_as_clickhouse_connect_escapes_them(value):
    assert literal(value) == format_str(value)


async def test_an_event_twice_in_one_batch_is_stored_once(make_exporter):
    exporter = await make_exporter()
    await exporter.export(ExportBatch("a", [make_event(1), make_event(2), make_event(1)]))
    assert counts(exporter) == (2, 2, 2)


async def test_a_value_that_does_not_fit_its_column_is_permanent_and_names_it(make_exporter):
    exporter = await make_exporter()
    with pytest.raises(PermanentError, match="input_tokens"):
        await exporter.export(ExportBatch("a", [make_event(1, input_tokens=-5)]))


async def test_the_good_events_of_a_batch_with_bad_rows_are_stored_and_the_bad_named(
        make_exporter):
    exporter = await make_exporter()
    bad = {17: {"input_tokens": -5}, 600: {"status_code": 70_000}}
    events = [make_event(i, **bad.get(i, {})) for i in range(1000)]
    with pytest.raises(PermanentError) as refused:
        await exporter.export(ExportBatch("a", events))
    assert [e.event_id for e in refused.value.events] == ["evt-00000017", "evt-00000600"]
    message = str(refused.value)
    assert "ClickHouse refused the batch: column status_code" in message  # the first found
    assert "2 of 1000 events refused (event_id evt-00000017, evt-00000600)" in message
    assert counts(exporter) == (998, 998, 998)


async def test_looking_for_bad_rows_is_bounded_and_refuses_what_is_left(make_exporter):
    exporter = await make_exporter()
    events = [make_event(i, input_tokens=-5 if i % 2 else 1) for i in range(1000)]
    writes = []
    write = exporter._write
    exporter._write = lambda batch_id, group: (writes.append(len(group)), write(batch_id, group))
    with pytest.raises(PermanentError) as refused:
        await exporter.export(ExportBatch("a", events))
    assert len(writes) <= 64 + 10  # the cap, and the halves still waiting when it is reached
    stored = counts(exporter)[0]
    assert stored + len(refused.value.events) == 1000
    assert all(e.input_tokens == 1 for e in events if e not in refused.value.events)


async def test_an_insert_over_the_query_memory_limit_is_stored_in_parts(make_exporter):
    exporter = await make_exporter(max_query_memory_mib=16)
    events = long_prompts(40, 500_000)  # 20 MB of prompts
    writes = []
    write = exporter._write
    exporter._write = lambda batch_id, group: (writes.append(len(group)), write(batch_id, group))
    await exporter.export(ExportBatch("a", events))
    assert writes[0] == 40 and len(writes) > 1  # the whole did not fit, its parts did
    assert counts(exporter) == (40, 40, 40)


async def test_an_event_over_the_query_memory_limit_alone_is_refused_and_the_rest_stored(
        make_exporter):
    exporter = await make_exporter(max_query_memory_mib=16)
    events = [make_event(i) for i in range(10)] + long_prompts(1, 40_000_000, start=10)
    with pytest.raises(PermanentError, match="more than max_query_memory_mib") as refused:
        await exporter.export(ExportBatch("a", events))
    assert [e.event_id for e in refused.value.events] == ["evt-00000010"]
    assert counts(exporter) == (10, 10, 10)


async def test_a_column_missing_from_the_table_is_permanent_and_names_it(make_exporter):
    exporter = await make_exporter(start=False, create_schema=False)
    older = Schema(columns=tuple(c for c in COLUMNS if c.name != "itl_ms"))
    writer = await exporter.connect()
    ensure_schema(writer.client, older)
    with pytest.raises(PermanentError, match="itl_ms"):
        await exporter.export(ExportBatch("a", [make_event(1)]))


async def test_a_server_that_does_not_answer_is_retryable(make_exporter):
    exporter = await make_exporter(endpoint=f"http://127.0.0.1:{free_port()}",
                                   connect_timeout="1s")
    with pytest.raises(RetryableError, match="cannot reach ClickHouse"):
        await exporter.export(ExportBatch("a", [make_event(1)]))


def proxy_error(status):
    """What clickhouse-connect raises for an HTTP error that carries no ClickHouse code."""
    return DatabaseError(f"HTTP driver received HTTP status {status}, server response: "
                         "<html>Bad Gateway</html>")


@pytest.mark.parametrize(("error", "kind"), [
    (DatabaseError("Code: 252. Too many parts", code=252), RetryableError),
    (DatabaseError("Code: 241. Memory limit exceeded", code=241), RetryableError),
    (DatabaseError("Code: 394. Query was cancelled", code=394), RetryableError),
    (DatabaseError("Code: 236. Aborted", code=236), RetryableError),
    (DatabaseError("Code: 745. Server overloaded", code=745), RetryableError),
    (DatabaseError("Code: 243. Not enough space", code=243), RetryableError),
    (OperationalError("connection reset"), RetryableError),
    *((proxy_error(status), RetryableError) for status in (429, 502, 503, 504)),
    (proxy_error(400), PermanentError),
    (DatabaseError("Code: 16. No such column foo in table", code=16), PermanentError),
    (DatabaseError("Code: 53. Type mismatch in column status_code", code=53), PermanentError),
])
def test_overload_is_retryable_and_a_refused_statement_permanent(error, kind):
    assert isinstance(classify(error), kind)


@pytest.mark.parametrize(("error", "one_row"), [
    (DataError("Unable to create native array for column `input_tokens`"), True),
    (ValueError("could not convert string to float: 'x'"), True),
    (DatabaseError("Code: 53. Type mismatch", code=53), True),
    (ProgrammingError("Unrecognized column 'itl_ms' in table"), False),
    (DatabaseError("Code: 16. No such column foo in table", code=16), False),
])
def test_a_value_that_cannot_be_stored_is_told_from_a_bad_statement(error, one_row):
    assert is_row_error(error) is one_row


def test_the_error_codes_told_apart_are_the_clickhouse_errors_they_name(engine):
    codes = {**RETRYABLE_CODES, **ROW_CODES}
    names = dict(engine.query(
        "SELECT number, errorCodeToName(toInt32(number)) FROM system.numbers "
        f"WHERE number IN ({', '.join(map(str, codes))}) LIMIT {len(codes)}").result_rows)
    assert names == codes


async def test_a_proxy_answering_502_in_front_of_the_server_is_retryable(make_exporter):
    async def bad_gateway(request):
        return web.Response(status=502, text="<html>502 Bad Gateway</html>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        exporter = await make_exporter(endpoint=f"http://127.0.0.1:{port}")
        with pytest.raises(RetryableError, match="HTTP status 502"):
            await exporter.export(ExportBatch("a", [make_event(1)]))
    finally:
        await runner.cleanup()


BUDGETS = {"acme": Budget(limit_usd=4, scope=BudgetScope(metadata={"customer": "acme"}),
                          notify_at=[0.5, 0.9]),
           "openai": Budget(limit_usd=100, period="day", scope=BudgetScope(provider="openai"))}


def acme_events(n):
    """`n` events of the last minute at $0.50, every other one for customer acme."""
    now = time.time_ns()
    return [make_event(i, timestamp=now - i * 10**9, cost_usd=0.5,
                       metadata={"customer": "acme" if i % 2 else "globex"}) for i in range(n)]


async def test_budget_gauges_show_spend_limit_and_utilization(make_exporter):
    exporter = await make_exporter()
    await exporter.export(ExportBatch("a", acme_events(12)))  # 6 acme events at 0.5
    extension = finops_of(exporter, budgets=BUDGETS, budget_refresh="50ms")
    await extension.start()
    registry = extension.context.telemetry.registry

    def gauge(name, budget):
        return metric_value(registry, name, budget=budget)

    # (the raw table and the rollup are written one after the other: wait for both)
    await eventually(lambda: (gauge("llm_gateway_budget_spend_usd", "acme"),
                              gauge("llm_gateway_budget_spend_usd", "openai")) == (3.0, 6.0))
    assert gauge("llm_gateway_budget_limit_usd", "acme") == 4.0
    assert gauge("llm_gateway_budget_utilization_ratio", "acme") == 0.75
    assert gauge("llm_gateway_budget_threshold_reached_ratio", "acme") == 0.5
    assert metric_value(registry, "llm_gateway_budget_utilization_ratio", budget="acme",
                        period="month", scope="metadata.customer=acme") == 0.75
    await extension.shutdown()
    assert gauge("llm_gateway_budget_spend_usd", "acme") == 0  # gone with the extension


async def test_budget_spend_is_recomputed_from_clickhouse_after_a_restart(make_exporter):
    first = await make_exporter()
    await first.export(ExportBatch("a", acme_events(12)))
    await first.shutdown()
    second = finops_of(await make_exporter(), budgets=BUDGETS)
    spend = {b["budget"]: b["spend_usd"] for b in await second.budget_status()}
    await second.shutdown()
    assert spend == {"acme": 3, "openai": 6}
