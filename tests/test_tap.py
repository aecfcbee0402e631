"""A tap's backlog (`meterline.pipeline.Tap`): bounded in bytes, whatever the batches."""

import asyncio

from meterline.event import Event, pack
from meterline.filtering import Filter, Pattern
from meterline.pipeline import Tap, Taps


def batch(count: int, prompt_bytes: int = 100) -> list[Event]:
    return [Event(event_id=f"e{i}", input_messages=[{"role": "user",
                                                     "content": "x" * prompt_bytes}])
            for i in range(count)]


def test_a_tap_misses_batches_past_its_bytes_not_its_batch_count() -> None:
    tap = Tap(Filter(), max_pending_bytes=1 << 20)
    big = batch(4, 100_000)  # about 400 KB packed
    for _ in range(4):
        tap.offer(big, len(pack(big)))
    assert tap.dropped == 8  # the third and fourth batches: past 1 MB
    assert tap.pending_bytes <= 1 << 20
    small = batch(1, 10)
    assert tap.pending_bytes + len(pack(small)) <= 1 << 20
    tap.offer(small, len(pack(small)))  # room is left for a small one
    assert tap.dropped == 8


def test_a_batch_larger_than_the_bound_is_shown_when_nothing_is_pending() -> None:
    tap = Tap(Filter(), max_pending_bytes=1000)
    huge = batch(1, 100_000)
    tap.offer(huge, len(pack(huge)))
    assert (tap.dropped, asyncio.run(tap.take())) == (0, huge)


def test_taking_a_batch_gives_its_room_back() -> None:
    tap = Tap(Filter(), max_pending_bytes=1 << 20)
    big = batch(4, 100_000)

    async def drain() -> None:
        for _ in range(10):
            tap.offer(big, len(pack(big)))
            assert await tap.take() == big

    asyncio.run(drain())
    assert (tap.dropped, tap.pending_bytes) == (0, 0)


def test_a_filtered_batch_counts_for_its_kept_share_of_the_bytes() -> None:
    tap = Tap(Filter(include=[Pattern({"event_id": "e0"})]), max_pending_bytes=1 << 20)
    events = batch(4, 1000)
    tap.offer(events, 4000)
    assert tap.pending_bytes == 1000
    assert asyncio.run(tap.take()) == events[:1]


def test_taps_are_offered_the_packed_size_of_an_inline_batch() -> None:
    taps, tap = Taps(), Tap(Filter(), max_pending_bytes=1 << 20)
    taps.active.add(tap)
    events = batch(3, 1000)
    taps.publish(events, None)
    assert tap.pending_bytes == len(pack(events))
