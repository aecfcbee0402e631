"""Time windows of FinOps questions, and how they are split between the two rollups."""

import re
from datetime import UTC, datetime

import pytest

from meterline.exporters.clickhouse.metrics import IS_MCP_CONNECT, Figure
from meterline.exporters.clickhouse.query import Reader, Window, dimension, split
from meterline.extensions.finops import finops


def at(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_range_ends_at_the_end_of_the_current_minute():
    window = Window.parse("24h", now=at("2025-05-02T10:17:30"))
    assert (window.since, window.until) == (at("2025-05-01T10:18"), at("2025-05-02T10:18"))


def test_since_and_until_round_out_to_whole_minutes_in_utc():
    window = Window.parse(since="2025-05-01T10:17:30+02:00", until="2025-05-03")
    assert (window.since, window.until) == (at("2025-05-01T08:17"), at("2025-05-03T00:00"))


@pytest.mark.parametrize(("args", "message"), [
    ({"range_": "5y"}, "range must be one of 24h, 7d, 30d, 90d"),
    ({"since": "last tuesday"}, "since must be an ISO 8601 date or time"),
    ({"since": "2025-05-03", "until": "2025-05-01"}, "since must be before until"),
    ({"range_": "7d", "since": "2025-05-01"}, "give range or since, not both"),
    ({"range_": "٣d"}, "range must be one of 24h, 7d, 30d, 90d"),  # (ASCII digits only)
])
def test_a_bad_window_is_refused_with_the_reason(args, message):
    with pytest.raises(ValueError, match=message):
        Window.parse(**args)


@pytest.mark.parametrize(("args", "message"), [
    ({"range_": "999999999d"}, "range must be at most 49673d, got '999999999d'"),
    ({"range_": "99999999999999999999h"}, "range must be at most 49673d"),
    ({"range_": "36500d"}, "range must start from 1970-01-01T00:00:00Z: at most 20577d"),
    ({"since": "0001-01-01"}, "since must be from 1970-01-01T00:00:00Z, got '0001-01-01'"),
    ({"since": "2025-05-01", "until": "9999-12-31"}, "until must be before 2106-01-01"),
    ({"until": "1960-01-01"}, "until must be after 1970-01-01T00:00:00Z, got '1960-01-01'"),
    # (an offset that moves a time out of the years Python holds: OverflowError, a 500)
    ({"until": "0001-01-01T00:00:00+00:01"}, "until must be from 1970-01-01T00:00:00Z to "
                                             "2106-01-01T00:00:00Z"),
    ({"since": "9999-12-31T23:59:59-00:01"}, "since must be from 1970-01-01T00:00:00Z to"),
    # (a count of more digits than int() converts: its ValueError named no parameter)
    ({"range_": "9" * 5000 + "d"}, "range must be at most 49673d"),
])
def test_a_window_outside_what_clickhouse_holds_is_refused_with_the_reason(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Window.parse(**args, now=at("2026-05-04T10:00"))


def test_growth_refuses_a_previous_period_that_starts_before_1970():
    window = Window.parse(since="1990-01-01", until="2026-01-01")
    with pytest.raises(ValueError, match="growth compares with the period of the same "
                                         "length before: 1954-01-01T00:00:00Z is before"):
        finops.growth(None, window)  # type: ignore[arg-type]  # refused before any query


def test_an_answer_by_hour_over_years_is_refused_before_any_query():
    window = Window.parse(since="1990-01-01", until="2026-01-01")
    with pytest.raises(ValueError, match="an answer by hour answers at most 10,000 buckets: "
                                         "this window has 315,576"):
        Reader(client=None).select(window, by=[dimension("hour")], figures=["requests"])


def test_an_answer_by_day_over_a_quarter_century_is_within_the_bound():
    window = Window.parse(since="2000-01-01", until="2026-01-01")
    window.check_buckets(86400, "an answer by day")  # 9,497 days


def test_a_window_splits_into_whole_hours_and_the_minutes_around_them():
    hours, minutes = split(Window(at("2025-05-01T10:17"), at("2025-05-01T14:05")))
    assert hours == [Window(at("2025-05-01T11:00"), at("2025-05-01T14:00"))]
    assert minutes == [Window(at("2025-05-01T10:17"), at("2025-05-01T11:00")),
                       Window(at("2025-05-01T14:00"), at("2025-05-01T14:05"))]


def test_no_hour_read_from_the_hourly_rollup_straddles_a_cut():
    hours, minutes = split(Window(at("2025-05-01T10:00"), at("2025-05-01T14:00")),
                           cuts=[at("2025-05-01T12:30")])
    assert hours == [Window(at("2025-05-01T10:00"), at("2025-05-01T12:00")),
                     Window(at("2025-05-01T13:00"), at("2025-05-01T14:00"))]
    assert minutes == [Window(at("2025-05-01T12:00"), at("2025-05-01T13:00"))]


def test_a_window_within_one_hour_reads_minutes_only():
    hours, minutes = split(Window(at("2025-05-01T10:05"), at("2025-05-01T10:55")))
    assert (hours, minutes) == ([], [Window(at("2025-05-01T10:05"), at("2025-05-01T10:55"))])


class Recording:
    """A ClickHouse client that keeps the queries it is asked and finds no rows."""

    def __init__(self):
        self.queries = []

    def query(self, sql):
        self.queries.append(sql)
        return self

    def named_results(self):
        return []


def test_a_figure_of_some_calls_reads_rollups_that_keep_the_columns_its_condition_tests():
    """(found by tests/test_prometheus_clickhouse_agree.py: the connects' durations were
    asked of the model rollups, which have no `mcp_method`, and ClickHouse refused)"""
    client = Recording()
    reader = Reader(client)
    reader.select(Window(at("2025-05-01"), at("2025-05-03")),
                  extra={"connects": Figure("duration_ms_count", IS_MCP_CONNECT)})
    [sql] = client.queries
    read = [r for r in reader.schema.rollups if f"`{r.table}`" in sql]
    assert read and all("mcp_method" in r.event_columns for r in read)
