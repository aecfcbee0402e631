"""The `finops` extension's configuration, and which `clickhouse` exporter it reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

from meterline.component import Config
from meterline.exporters.clickhouse.config import ClickHouseConfig
from meterline.extensions.finops.billing.pull import BillingConfig
from meterline.extensions.finops.budgets import Budget
from meterline.extensions.finops.notifiers import NotifierConfig
from meterline.gateway.config import GatewayConfig
from meterline.gateway.guardrails import GuardrailRule
from meterline.units import Duration

if TYPE_CHECKING:
    from meterline.config import PipelineFile

C = TypeVar("C", bound=Config)


class FinOpsConfig(Config):
    # The id of the clickhouse exporter (in the same pipeline.yaml) whose tables are read,
    # with its endpoint, database and table.
    clickhouse: str = "clickhouse"
    # The id of the gateway receiver whose guardrails are the configured rules of the
    # guardrails analytics (protected models, rules per model). Default: the receiver
    # `gateway` (or the only gateway receiver) when the file has one; with none, rule
    # figures are unknown (null) while the blocked/modified counts still come from events.
    gateway: str | None = None
    # Spend limits by name, computed from ClickHouse every budget_refresh and published as
    # llm_gateway_budget_* gauges (and at /api/v1/budgets); those with `action: enforce`
    # are enforced by the gateway receiver `gateway` (above) names.
    budgets: dict[str, Budget] = msgspec.field(default_factory=dict)
    budget_refresh: Duration = Duration(15)  # how often budget spend is recomputed
    # How often the closed days' answers by agent, session and trace are sealed (kept, so
    # that a month is read as 30 answers: docs/finops.md#performance), at most 31 days a
    # pass, the latest first; 0: never (those answers are computed from every row).
    seal_interval: Duration = Duration(600)
    # webhooks the budgets' `notify` name, each with an exporter's queue and retry blocks
    notifiers: dict[str, NotifierConfig] = msgspec.field(default_factory=dict)
    # The providers' bills: pulling the OpenAI and Anthropic cost APIs, and the
    # meterline_billing_* variance gauges (docs/finops.md#billing); none: neither.
    billing: BillingConfig | None = None

    def __post_init__(self) -> None:
        if self.budget_refresh <= 0:
            raise ValueError("budget_refresh must be a positive duration such as 15s")
        for name, budget in self.budgets.items():
            if unknown := [n for n in budget.notify if n not in self.notifiers]:
                raise ValueError(f"budgets.{name}.notify: {', '.join(unknown)} is not under "
                                 f"notifiers (defined: {', '.join(self.notifiers) or 'none'})")


class LinkedConfig(FinOpsConfig, kw_only=True):
    """The config the extension is built with: its own, and the settings of the exporter
    `clickhouse` names (so that a change of them on reload rebuilds the extension too)."""

    exporter: ClickHouseConfig
    # the guardrail rules of the linked gateway receiver; None when none is linked
    guardrails: list[GuardrailRule] | None = None


def link(config: FinOpsConfig, file: PipelineFile) -> LinkedConfig:
    """`Factory.link`: the `clickhouse` exporter `config.clickhouse` names, and the gateway
    receiver whose guardrails are read (`gateway`, or by default the receiver `gateway` or
    the only gateway receiver; none is no rules), or why not."""
    exporter = _named(file, "exporter", ClickHouseConfig, "clickhouse", config.clickhouse)
    gateways = [cid for cid, spec in file.receivers.items()
                if isinstance(spec.config, GatewayConfig)]
    gateway_id = config.gateway
    if gateway_id is None and gateways:
        gateway_id = "gateway" if "gateway" in gateways else (
            gateways[0] if len(gateways) == 1 else None)
    gateway = (_named(file, "receiver", GatewayConfig, "gateway", gateway_id)
               if gateway_id else None)
    if gateway is None and (enforced := [n for n, b in config.budgets.items()
                                         if b.action == "enforce"]):
        raise ValueError(f"budgets {', '.join(enforced)} have action: enforce, which needs a "
                         "gateway receiver: name one with gateway: (receivers here: "
                         f"{', '.join(file.receivers) or 'none'})")
    return LinkedConfig(**msgspec.structs.asdict(config) | {"gateway": gateway_id},
                        exporter=exporter,
                        guardrails=list(gateway.guardrails) if gateway else None)


def _named(file: PipelineFile, kind: str, cls: type[C], type_: str, named: str) -> C:
    """The config of the `kind` (exporter, receiver) `named`, which must be a `type_` one
    (`option: names ...` otherwise, the option being the type's name)."""
    specs = getattr(file, f"{kind}s")
    ours = [cid for cid, spec in specs.items() if isinstance(spec.config, cls)]
    spec = specs.get(named)
    if spec is None or not isinstance(spec.config, cls):
        why = (f"which is not defined under {kind}s" if spec is None
               else f"which is a {spec.factory.type} {kind}, not a {type_} one")
        raise ValueError(f"{type_}: names {kind} '{named}', {why} ({type_} {kind}s "
                         f"here: {', '.join(ours) or 'none'})")
    return spec.config
