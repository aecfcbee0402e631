"""What receivers do when the pipeline pushes back (`meterline.backpressure`)."""

import pytest
from structlog.testing import capture_logs

from meterline import backpressure
from meterline.backpressure import Refused, offer, refuse
from meterline.component import Backpressure
from meterline.logs import Sparse
from meterline.logs import get as get_log
from meterline.queue import QueueWriteError
from tests.helpers import make_event


class Pipeline:
    """A consumer that raises the given errors, one per call, then takes the events."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.taken = []

    async def consume(self, events):
        if self.errors:
            raise self.errors.pop(0)
        self.taken.append(events)

    def refused(self, count, reason):
        pass  # (the pipeline's `Entry` counts what it refuses)


async def test_offer_tries_again_after_back_pressure():
    pipeline, waits = Pipeline(Backpressure("full")), []

    async def wait(error):
        waits.append(error)
        return True

    assert await offer(pipeline, [make_event(0)], wait)
    assert len(pipeline.taken) == 1
    assert [str(e) for e in waits] == ["full"]


async def test_offer_tries_again_after_a_failed_queue_write():
    pipeline = Pipeline(QueueWriteError("disk full"))

    async def wait(_):
        return True

    assert await offer(pipeline, [make_event(0)], wait)
    assert len(pipeline.taken) == 1


async def test_offer_stops_when_the_wait_says_so():
    pipeline = Pipeline(Backpressure("full"))

    async def wait(_):
        return False

    assert not await offer(pipeline, [make_event(0)], wait)
    assert pipeline.taken == []


async def test_refuse_answers_a_full_queue_with_429_and_its_retry_hint():
    with pytest.raises(Refused) as caught:
        await refuse(Pipeline(Backpressure("queue full", retry_after=2.6)), [make_event(0)],
                     get_log())
    assert caught.value.status == 429
    assert caught.value.headers == {"Retry-After": "3"}
    assert str(caught.value) == "back-pressure: queue full; retry later"


async def test_refuse_answers_a_failed_write_with_503_and_a_retry_after_5_s():
    pipeline = Pipeline(QueueWriteError("disk full"))
    with pytest.raises(Refused) as caught:
        await refuse(pipeline, [make_event(0), make_event(1)], get_log())
    assert (caught.value.status, caught.value.headers) == (503, {"Retry-After": "5"})


async def test_failed_writes_in_a_flood_are_logged_once_an_interval_with_their_count(
        monkeypatch):
    monkeypatch.setattr(backpressure, "_WRITE_FAILURES", Sparse(interval=3600))
    pipeline = Pipeline(*[QueueWriteError("disk full")] * 50)
    with capture_logs() as logged:
        for i in range(50):
            with pytest.raises(Refused):
                await refuse(pipeline, [make_event(i)], get_log())
    assert [(e["event"], e["refused_batches"]) for e in logged] == [("cannot queue events", 1)]


def test_a_sparse_line_tells_how_many_were_left_out_since_the_last():
    sparse = Sparse(interval=0)
    assert sparse.due() == 1
    sparse.interval = 3600
    assert [sparse.due() for _ in range(3)] == [1, None, None]
    sparse._next = 0  # the interval is over
    assert (sparse.due(), sparse.total) == (3, 5)
