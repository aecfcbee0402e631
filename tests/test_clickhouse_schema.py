"""The ClickHouse schema: created, migrated forward, and the server/cluster DDL as text."""

from dataclasses import replace

import clickhouse_connect
import pytest

from meterline.config import ConfigError, convert, loads
from meterline.event import FIELDS
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.exporters.clickhouse.connection import insert_settings
from meterline.exporters.clickhouse.metrics import (
    AGGREGATES,
    ESTIMATED_COST,
    RUN_AGGREGATES,
    TRACE_DIMENSIONS,
)
from meterline.exporters.clickhouse.schema import (
    COLUMNS,
    VIEW_VERSION,
    Column,
    Rollup,
    Schema,
    ensure_schema,
)
from tests.helpers import make_event


@pytest.fixture
def chdb(tmp_path):
    client = clickhouse_connect.get_client(interface="chdb", path=str(tmp_path / "ch"))
    yield client
    client.close()


def insert(client, schema, events, token):
    client.insert(schema.qualified(schema.events), schema.column_batch(events),
                  column_names=[c.name for c in schema.inserted], column_oriented=True,
                  settings={"insert_deduplication_token": token})


def columns(client, table):
    return [name for (name,) in client.query(
        "SELECT name FROM system.columns WHERE database = 'meterline' AND table = "
        f"'{table}' ORDER BY position").result_rows]


def test_every_event_field_has_a_column():
    assert {c.name for c in COLUMNS if not c.materialized} == set(FIELDS)


ROLLUPS = ("1m", "1h", "1d", "model_1h", "model_1d", "user_total_7d",
           "user_total_1d", "user_1d", "tool_1d", "tool_1h", "trace_1h")


def test_the_schema_is_created_once_and_then_left_alone(chdb):
    created = ensure_schema(chdb, Schema())
    assert [s.split(" (")[0].splitlines()[0] for s in created] == [
        "CREATE TABLE IF NOT EXISTS `meterline`.`llm_events`",
        *(f"CREATE TABLE IF NOT EXISTS `meterline`.`llm_usage_{t}`" for t in ROLLUPS),
        "CREATE TABLE IF NOT EXISTS `meterline`.`llm_usage_open_hours`",
        *(f"CREATE MATERIALIZED VIEW IF NOT EXISTS `meterline`.`llm_usage_{t}_mv_v{VIEW_VERSION}`"
          for t in ROLLUPS)]
    assert ensure_schema(chdb, Schema()) == []


def test_metadata_keys_in_the_config_get_a_daily_rollup_by_value(chdb):
    created = ensure_schema(chdb, Schema(rollup_metadata=("customer", "env")))
    [table] = [s for s in created if s.startswith("CREATE TABLE IF NOT EXISTS `meterline`."
                                                  "`llm_usage_metadata_1d`")]
    assert "ORDER BY (day, meta_key, meta_value, provider, model)" in table
    insert(chdb, Schema(), [make_event(1, metadata={"customer": "acme"})], "t")
    rows = chdb.query("SELECT meta_key, meta_value, sum(events) FROM "
                      "meterline.llm_usage_metadata_1d GROUP BY meta_key, meta_value "
                      "ORDER BY meta_key").result_rows
    assert rows == [("customer", "acme", 1), ("env", "", 1)]  # every key counts every event


def test_a_later_version_adds_its_columns_to_an_existing_table_and_keeps_the_rows(chdb):
    older = Schema(columns=tuple(c for c in COLUMNS if c.name not in ("itl_ms", "attributes")))
    ensure_schema(chdb, older)
    insert(chdb, older, [make_event(i) for i in range(3)], "old")
    changes = ensure_schema(chdb, Schema())
    assert changes == [
        "ALTER TABLE `meterline`.`llm_events` ADD COLUMN IF NOT EXISTS `itl_ms` "
        "Nullable(Float64) AFTER `ttft_ms`",
        "ALTER TABLE `meterline`.`llm_events` ADD COLUMN IF NOT EXISTS `attributes` "
        "String CODEC(ZSTD(3)) AFTER `redactions`"]
    assert columns(chdb, "llm_events") == [c.name for c in COLUMNS]
    insert(chdb, Schema(), [make_event(9, itl_ms=12.5, attributes={"a": 1})], "new")
    rows = chdb.query("SELECT event_id, itl_ms, attributes FROM meterline.llm_events "
                      "ORDER BY event_id").result_rows
    assert rows == [("evt-00000000", None, ""), ("evt-00000001", None, ""),
                    ("evt-00000002", None, ""), ("evt-00000009", 12.5, '{"a":1}')]
    [(events,)] = chdb.query("SELECT sum(events) FROM meterline.llm_usage_1h").result_rows
    assert events == 4


def test_a_newer_rollup_view_replaces_the_old_one(chdb, monkeypatch):
    ensure_schema(chdb, Schema())
    old, new = VIEW_VERSION, VIEW_VERSION + 1
    monkeypatch.setattr("meterline.exporters.clickhouse.schema.VIEW_VERSION", new)
    changes = [c.splitlines()[0] for c in ensure_schema(chdb, Schema())]
    assert changes == [
        *(f"CREATE MATERIALIZED VIEW IF NOT EXISTS `meterline`.`llm_usage_{t}_mv_v{new}`"
          for t in ROLLUPS),
        *(f"DROP VIEW IF EXISTS `meterline`.`llm_usage_{t}_mv_v{old}`" for t in ROLLUPS)]
    insert(chdb, Schema(), [make_event(1)], "t")
    for table in (f"llm_usage_{t}" for t in ROLLUPS):
        [(events,)] = chdb.query(f"SELECT sum(events) FROM meterline.{table}").result_rows
        assert events == 1  # one view feeds each rollup, not two


def test_a_retired_rollup_loses_its_view_and_table_and_its_successor_is_filled(chdb):
    """A database of the version whose trace rollup was daily (`llm_usage_trace_1d`): its
    view would go on filling it at every insert."""
    schema = Schema()
    ensure_schema(chdb, schema)
    hourly, daily = schema.trace_rollup, Rollup("llm_usage_trace_1d", "day", TRACE_DIMENSIONS,
                                                 extra=RUN_AGGREGATES)
    chdb.command(f"DROP VIEW meterline.{hourly.view}")
    chdb.command(f"DROP TABLE meterline.{hourly.table}")
    chdb.command(schema.create_rollup(daily))
    chdb.command(schema.create_view(daily))
    insert(chdb, schema, [make_event(i) for i in range(3)], "t")
    changes = [c.split(" (")[0].splitlines()[0] for c in ensure_schema(chdb, schema)]
    assert changes == [
        "CREATE TABLE IF NOT EXISTS `meterline`.`llm_usage_trace_1h`",
        "INSERT INTO `meterline`.`llm_usage_trace_1h`",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS `meterline`.`{hourly.view}`",
        f"DROP VIEW IF EXISTS `meterline`.`{daily.view}`",
        "DROP TABLE IF EXISTS `meterline`.`llm_usage_trace_1d`"]
    tables = {name for (name,) in chdb.query(
        "SELECT name FROM system.tables WHERE database = 'meterline'").result_rows}
    assert not {name for name in tables if name.startswith("llm_usage_trace_1d")}
    [(events,)] = chdb.query("SELECT sum(events) FROM meterline.llm_usage_trace_1h").result_rows
    assert events == 3  # filled from the events stored
    assert ensure_schema(chdb, schema) == []


def test_tables_of_the_previous_version_gain_the_cache_and_estimate_columns_and_figures(
        chdb, monkeypatch):
    added = ("cache_hits", "saved_cost_usd", "unestimated_actual_requests",
             "unestimated_actual_cost_usd", "guardrail_blocked")
    older = Schema(columns=tuple(c for c in COLUMNS
                                 if c.name not in ("cache_hit", "tags", "saved_cost_usd")))
    with monkeypatch.context() as previous:  # per-minute and per-hour rollups only
        previous.setattr(Schema, "rollups", property(lambda s: s.time_rollups[:2]))
        # (the cost read as it was before there were cache hits)
        previous.setattr("meterline.exporters.clickhouse.schema.AGGREGATES", tuple(
            replace(a, argument=a.argument.replace(ESTIMATED_COST, "cost_usd"))
            for a in AGGREGATES if a.name not in added))
        previous.setattr("meterline.exporters.clickhouse.schema.VIEW_VERSION", VIEW_VERSION - 1)
        ensure_schema(chdb, older)
        insert(chdb, older, [make_event(1)], "old")
    changes = [c.split(" SimpleAggregateFunction")[0].splitlines()[0]
               for c in ensure_schema(chdb, Schema())]
    alter = "ALTER TABLE `meterline`.`{}` ADD COLUMN IF NOT EXISTS `{}`"
    rollup = ["cache_hits", "saved_cost_usd", "unestimated_actual_requests",
              "unestimated_actual_cost_usd", "guardrail_blocked"]
    view = "CREATE MATERIALIZED VIEW IF NOT EXISTS `meterline`.`llm_usage_{}_mv_v{}`"
    filled = "INSERT INTO `meterline`.`llm_usage_{}` (filled from the events stored, in 1 spans " \
             "of days)"
    assert changes == [
        alter.format("llm_events", "cache_hit") + " Nullable(Bool) AFTER `fallback`",
        alter.format("llm_events", "tags") + " Array(LowCardinality(String)) AFTER `cache_hit`",
        alter.format("llm_events", "saved_cost_usd") + " Nullable(Float64) AFTER "
                                                       "`actual_cost_usd`",
        *(alter.format(table, name) for table in ("llm_usage_1m", "llm_usage_1h")
          for name in rollup),
        # the rollups that gained figures: emptied and filled again, under the new view only
        *(line for t in ("1h", "1m") for line in (
            f"DROP VIEW IF EXISTS `meterline`.`llm_usage_{t}_mv_v{VIEW_VERSION - 1}`",
            f"TRUNCATE TABLE `meterline`.`llm_usage_{t}`", filled.format(t))),
        # the new rollups, filled from the events stored, then every view
        *(line for t in ROLLUPS[2:] for line in (
            f"CREATE TABLE IF NOT EXISTS `meterline`.`llm_usage_{t}` (", filled.format(t))),
        *(view.format(t, VIEW_VERSION) for t in ROLLUPS)]
    insert(chdb, Schema(), [make_event(2, cache_hit=True, saved_cost_usd=0.5)], "new")
    for table in (f"llm_usage_{t}" for t in ROLLUPS):
        assert chdb.query(f"SELECT sum(events), sum(cache_hits), sum(saved_cost_usd) FROM "
                          f"meterline.{table}").result_rows == [(2, 1, 0.5)]


def ttl_of(client):
    [(engine,)] = client.query("SELECT engine_full FROM system.tables WHERE database = "
                               "'meterline' AND name = 'llm_events'").result_rows
    return engine.partition(" TTL ")[2].partition(" SETTINGS ")[0] or None


def test_a_changed_ttl_is_applied_to_the_existing_table(chdb):
    ensure_schema(chdb, Schema(ttl_seconds=90 * 86400))
    changes = ensure_schema(chdb, Schema(ttl_seconds=30 * 86400))
    assert changes == ["ALTER TABLE `meterline`.`llm_events` MODIFY TTL "
                       "toDateTime(timestamp) + toIntervalSecond(2592000)"]
    assert ttl_of(chdb) == "toDateTime(timestamp) + toIntervalSecond(2592000)"
    assert ensure_schema(chdb, Schema(ttl_seconds=30 * 86400)) == []


def test_a_ttl_taken_out_of_the_config_is_removed_from_the_table(chdb):
    ensure_schema(chdb, Schema(ttl_seconds=90 * 86400))
    assert ensure_schema(chdb, Schema()) == ["ALTER TABLE `meterline`.`llm_events` REMOVE TTL"]
    assert ttl_of(chdb) is None


def test_content_columns_are_compressed_and_counts_nullable():
    types = {c.name: c.type for c in COLUMNS}
    assert types["input_messages"] == "String CODEC(ZSTD(3))"
    assert types["input_tokens"] == "Nullable(UInt32)"
    assert types["cost_usd"] == "Nullable(Float64)"
    assert types["provider"] == "LowCardinality(String)"
    assert types["metadata"] == "Map(LowCardinality(String), String)"


def test_ttl_and_dedup_window_go_into_the_table_ddl():
    config = convert({"endpoint": "http://ch:8123", "ttl": "90d", "dedup_window": 500},
                     ClickHouseConfig)
    ddl = Schema.of(config).create_events()
    assert "TTL toDateTime(timestamp) + toIntervalSecond(7776000)" in ddl
    assert ddl.endswith("SETTINGS non_replicated_deduplication_window = 500")
    assert "ORDER BY (toStartOfHour(timestamp), event_id)" in ddl
    assert "PARTITION BY toYYYYMM(timestamp)" in ddl


def test_a_cluster_gets_replicated_local_tables_behind_distributed_ones():
    config = convert({"endpoint": "https://ch:8443", "cluster": {"name": "llm"}},
                     ClickHouseConfig)
    objects = dict(Schema.of(config).objects())
    tables = [f"llm_usage_{t}" for t in ROLLUPS]
    assert list(objects) == ["llm_events_local", *(f"{t}_local" for t in tables),
                             "llm_usage_open_hours_local", "llm_events", *tables,
                             "llm_usage_open_hours",
                             *(f"{t}_mv_v{VIEW_VERSION}" for t in tables)]
    local = objects["llm_events_local"]
    assert local.startswith("CREATE TABLE IF NOT EXISTS `meterline`.`llm_events_local` "
                            "ON CLUSTER `llm` (")
    assert "ENGINE = ReplicatedReplacingMergeTree\n" in local
    assert local.endswith("SETTINGS replicated_deduplication_window = 10000")
    assert "ENGINE = ReplicatedAggregatingMergeTree\n" in objects["llm_usage_1h_local"]
    assert objects["llm_events"] == (
        "CREATE TABLE IF NOT EXISTS `meterline`.`llm_events` ON CLUSTER `llm` AS "
        "`meterline`.`llm_events_local`\nENGINE = Distributed(`llm`, `meterline`, "
        "`llm_events_local`, cityHash64(event_id))")
    view = objects[f"llm_usage_1h_mv_v{VIEW_VERSION}"]
    assert "ON CLUSTER `llm`\nTO `meterline`.`llm_usage_1h_local`" in view
    assert "FROM `meterline`.`llm_events_local`" in view


def test_a_cluster_migration_alters_the_local_and_the_distributed_table():
    schema = Schema(cluster="llm")
    assert schema.add_column("llm_events", Column("x", "String CODEC(ZSTD(3))"), "w") == [
        "ALTER TABLE `meterline`.`llm_events_local` ON CLUSTER `llm` ADD COLUMN IF NOT EXISTS "
        "`x` String CODEC(ZSTD(3)) AFTER `w`",
        "ALTER TABLE `meterline`.`llm_events` ON CLUSTER `llm` ADD COLUMN IF NOT EXISTS `x` "
        "String AFTER `w`"]


def test_inserts_on_a_server_wait_for_async_inserts_and_for_the_shards():
    config = convert({"endpoint": "http://ch:8123", "async_insert": True,
                      "cluster": {"name": "llm"}}, ClickHouseConfig)
    assert insert_settings(config, "b1") == {
        "insert_deduplication_token": "b1",
        "async_insert": 1, "wait_for_async_insert": 1, "async_insert_deduplicate": 1,
        "distributed_foreground_insert": 1}


@pytest.mark.parametrize(("block", "where", "message"), [
    ("endpoint: ftp://x", "3: exporters.clickhouse:", "endpoint must start with chdb://"),
    ("async_insert: true", "3: exporters.clickhouse:", "apply to a ClickHouse server"),
    ("database: 'a-b'", "3: exporters.clickhouse:", "plain identifiers"),
    ("cluster: {name: 'x y'}", "4: exporters.clickhouse.cluster:", "plain identifier"),
    ("{ttl: 1d, repair_lookback: 2d}", "3: exporters.clickhouse:",
     "repair_lookback (172800s) must be shorter than ttl (86400s)"),
])
def test_bad_settings_are_refused_with_the_reason(block, where, message):
    text = f"""\
receivers: {{webhook: {{}}}}
exporters:
  clickhouse:
    {block}
service: {{pipelines: {{p: {{receivers: [webhook], exporters: [clickhouse]}}}}}}
"""
    with pytest.raises(ConfigError) as e:
        loads(text, "pipeline.yaml", {})
    [problem] = e.value.problems
    assert str(problem).startswith(f"pipeline.yaml:{where}")
    assert message in str(problem)


def test_a_budget_with_a_bad_limit_is_refused_with_its_line():
    text = """\
receivers: {webhook: {}}
exporters: {clickhouse: {}}
service: {pipelines: {p: {receivers: [webhook], exporters: [clickhouse]}}}
extensions:
  finops:
    budgets:
      search:
        scope: {team: search}
        limit_usd: -5
"""
    with pytest.raises(ConfigError) as e:
        loads(text, "pipeline.yaml", {})
    assert [str(p) for p in e.value.problems] == [
        "pipeline.yaml:7: extensions.finops.budgets.search: limit_usd must be positive, got -5.0"]
