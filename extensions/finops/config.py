"""The `finops` extension's configuration, and which `clickhouse` exporter it reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from meterline.component import Config
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.extensions.finops.budgets import Budget
from meterline.units import Duration

if TYPE_CHECKING:
    from meterline.config import PipelineFile


class FinOpsConfig(Config):
    # The id of the clickhouse exporter (in the same pipeline.yaml) whose tables are read,
    # with its endpoint, database and table.
    clickhouse: str = "clickhouse"
    # Spend limits by name, computed from ClickHouse every budget_refresh and published as
    # llm_gateway_budget_* gauges (and at /api/v1/budgets).
    budgets: dict[str, Budget] = msgspec.field(default_factory=dict)
    budget_refresh: Duration = Duration(15)  # how often budget spend is recomputed

    def __post_init__(self) -> None:
        if self.budget_refresh <= 0:
            raise ValueError("budget_refresh must be a positive duration such as 15s")


class LinkedConfig(FinOpsConfig, kw_only=True):
    """The config the extension is built with: its own, and the settings of the exporter
    `clickhouse` names (so that a change of them on reload rebuilds the extension too)."""

    exporter: ClickHouseConfig


def link(config: FinOpsConfig, file: PipelineFile) -> LinkedConfig:
    """`Factory.link`: the `clickhouse` exporter `config.clickhouse` names, or why not."""
    named = config.clickhouse
    ours = [cid for cid, spec in file.exporters.items()
            if isinstance(spec.config, ClickHouseConfig)]
    spec = file.exporters.get(named)
    if spec is None or not isinstance(spec.config, ClickHouseConfig):
        why = ("which is not defined under exporters" if spec is None
               else f"which is a {spec.factory.type} exporter, not a clickhouse one")
        raise ValueError(f"clickhouse: names exporter '{named}', {why} (clickhouse exporters "
                         f"here: {', '.join(ours) or 'none'})")
    return LinkedConfig(**msgspec.structs.asdict(config), exporter=spec.config)
