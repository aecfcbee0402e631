"""What receivers do when the pipeline pushes back (`meterline.backpressure`)."""

import pytest

from meterline.backpressure import Refused, offer, refuse
from meterline.component import Backpressure
from meterline.logs import get as get_log
from meterline.queue import QueueWriteError
from tests.helpers import make_event


class Pipeline:
    """A consumer that raises the given errors, one per call, then takes the events."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.taken = []
        self.refusals = []

    async def consume(self, events):
        if self.errors:
            raise self.errors.pop(0)
        self.taken.append(events)

    def refused(self, count, reason):
        self.refusals.append((count, reason))


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


async def test_refuse_answers_a_failed_write_with_503_and_counts_it_unavailable():
    pipeline = Pipeline(QueueWriteError("disk full"))
    with pytest.raises(Refused) as caught:
        await refuse(pipeline, [make_event(0), make_event(1)], get_log())
    assert (caught.value.status, caught.value.headers) == (503, {"Retry-After": "5"})
    assert pipeline.refusals == [(2, "unavailable")]
