"""Exponential backoff (`meterline.backoff`), shared by the delivery loop and the Kafka
receiver."""

import itertools

from meterline.backoff import exponential, retry_after


def test_without_jitter_delays_double_up_to_the_cap():
    assert list(itertools.islice(exponential(1.0, 5.0), 5)) == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_the_first_delay_is_not_capped():
    assert list(itertools.islice(exponential(40.0, 30.0), 3)) == [40.0, 30.0, 30.0]


def test_jitter_stays_within_the_randomization_factor():
    for delay, base in zip(exponential(2.0, 8.0, 2.0, 0.25), [2.0, 4.0, 8.0, 8.0], strict=False):
        assert base * 0.75 <= delay <= base * 1.25


def test_a_retry_after_in_seconds_is_read():
    assert retry_after(" 7 ") == 7.0


def test_a_retry_after_of_digits_float_refuses_is_unreadable_not_an_error():
    assert retry_after("\u00b2") is None  # '²': `str.isdigit` says it is one
