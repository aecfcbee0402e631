"""Gauges that show rows a component computes now and then (budget status, billing
variance).

The OpenTelemetry SDK keeps the callbacks of an instrument's first registration and ignores
a second one's, so an extension rebuilt on reload cannot register its own: each kind of
gauges is registered once per meter (`of`) and reads the rows the current extension
`publish`es there."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Self
from weakref import WeakKeyDictionary

from opentelemetry.metrics import CallbackOptions, Meter, Observation


class PublishedGauges:
    """A subclass names its gauges (`GAUGES`: name, row key, description) and how a row
    becomes an observation (`observe`)."""

    GAUGES: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    _by_meter: ClassVar[WeakKeyDictionary[Meter, PublishedGauges]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._by_meter = WeakKeyDictionary()

    def __init__(self, meter: Meter) -> None:
        self._rows: list[dict[str, Any]] = []
        for name, key, description in self.GAUGES:
            meter.create_observable_gauge(name, callbacks=[self._callback(key)],
                                          description=description)

    @classmethod
    def of(cls, meter: Meter) -> Self:
        if meter not in cls._by_meter:
            cls._by_meter[meter] = cls(meter)
        return cls._by_meter[meter]  # type: ignore[return-value]

    def publish(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def observe(self, row: dict[str, Any], key: str) -> Observation | None:
        """The observation of `row` for the gauge of `key` (None: none)."""
        raise NotImplementedError

    def _callback(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            for row in self._rows:
                if (observation := self.observe(row, key)) is not None:
                    yield observation
        return callback
