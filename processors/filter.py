"""Processor `filter`: keeps the events that Otoroshi-style include/exclude patterns
select (see `meterline.filtering`), on the event's fields and dotted paths."""

from __future__ import annotations

from meterline.component import Context, Factory, Processor
from meterline.event import Event
from meterline.filtering import Filter


class FilterProcessor(Processor):
    def __init__(self, config: Filter, context: Context) -> None:
        self.filter = config

    def process(self, events: list[Event]) -> list[Event]:
        return self.filter.apply(events)


factory = Factory(kind="processor", type="filter", config=Filter, create=FilterProcessor)
