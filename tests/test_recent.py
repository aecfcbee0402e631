"""RecentIds: the bounded memory of event ids the otlp receiver and the prometheus exporter
use to take or count an event once."""

from meterline.recent import RecentIds
from tests.helpers import make_event


def ids(events):
    return [e.event_id for e in events]


def test_a_full_memory_forgets_its_oldest_ids_first():
    recent = RecentIds(3)
    recent.claim([make_event(i) for i in range(4)])  # 0 is forgotten
    fresh, _ = recent.claim([make_event(0), make_event(1), make_event(3)])
    assert ids(fresh) == ["evt-00000000"] and len(recent) == 3


def test_released_ids_are_taken_again():
    recent = RecentIds(10)
    _, claimed = recent.claim([make_event(1), make_event(2)])
    recent.release(claimed)
    fresh, _ = recent.claim([make_event(1)])
    assert ids(fresh) == ["evt-00000001"]

