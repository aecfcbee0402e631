"""ClickHouse exporters on a chDB directory, for the tests that need several or one."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from exporters.clickhouse.config import ClickHouseConfig
from exporters.clickhouse.exporter import ClickHouseExporter
from meterline.config import convert
from tests.conftest import make_context

Make = Callable[..., Awaitable[ClickHouseExporter]]


@contextlib.asynccontextmanager
async def clickhouse_exporters(tmp_path: Path, **defaults: Any) -> AsyncIterator[Make]:
    """`make(name, sections=None, start=True, **config)` builds an exporter on the chDB
    directory `tmp_path/ch` (`defaults` under `config`), its own data directory under
    `tmp_path/name`; all are shut down (chDB released) on leaving."""
    made: list[ClickHouseExporter] = []

    async def make(name: str = "", sections: dict[str, Any] | None = None,
                   start: bool = True, **config: Any) -> ClickHouseExporter:
        config = {"endpoint": f"chdb://{tmp_path / 'ch'}", **defaults, **config}
        context = dataclasses.replace(make_context(tmp_path / name, "clickhouse"),
                                      sections=sections or {})
        exporter = ClickHouseExporter(convert(config, ClickHouseConfig), context)
        made.append(exporter)
        if start:
            await exporter.start()
        return exporter

    try:
        yield make
    finally:
        for exporter in made:
            await exporter.shutdown()
