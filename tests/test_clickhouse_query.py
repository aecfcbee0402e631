"""Time windows of FinOps questions, and how they are split between the two rollups."""

from datetime import UTC, datetime

import pytest

from meterline.exporters.clickhouse.query import Window, split


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
])
def test_a_bad_window_is_refused_with_the_reason(args, message):
    with pytest.raises(ValueError, match=message):
        Window.parse(**args)


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
