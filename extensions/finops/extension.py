"""Extension `finops`: the analytics API, budgets and their gauges, read from the tables a
`clickhouse` exporter writes.

It serves `/api/v1/analytics/*`, `/api/v1/finops/*` and `/api/v1/budgets` on the admin
server (`api.py`), and recomputes the spend of its `budgets` every `budget_refresh`:
published as `llm_gateway_budget_*` gauges, each threshold crossing notified once to the
budget's notifiers (`crossings.py`), and the spent `action: enforce` budgets handed to the
linked gateway receiver (`enforce.py`, `gateway/budgets.py`). It reads through a
ClickHouse client of its own, opened as the exporter opens its clients (for `chdb://`,
the embedded engine of this process), and waits for the exporter to have created the
tables: until then its answers are 503 and the budget gauges stay empty. It also copies
the daemon's audit log of configuration changes into the table `audit_log` (`audit.py`).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp

from meterline.component import (
    AdminHandler,
    Context,
    Extension,
    Factory,
    RetryableError,
    cancel_and_wait,
)
from meterline.exporters.clickhouse.connection import classify, open_client
from meterline.exporters.clickhouse.query import Reader
from meterline.exporters.clickhouse.schema import Schema, missing_tables
from meterline.extensions.finops import api, budgets, enforce, finops
from meterline.extensions.finops.audit import AuditCopy
from meterline.extensions.finops.billing import pull, reconcile, store
from meterline.extensions.finops.config import FinOpsConfig, LinkedConfig, link
from meterline.extensions.finops.crossings import Notifications
from meterline.gateway.budgets import Block, BudgetBlocks, blocks_of


class FinOps(Extension):
    def __init__(self, config: LinkedConfig, context: Context) -> None:
        self.config = config
        self.context = context
        self.log = context.log
        self.schema = Schema.of(config.exporter)
        self.reader: Reader | None = None
        self._connecting = asyncio.Lock()
        self._closed = False
        self._budget_task: asyncio.Task[None] | None = None
        self._billing_task: asyncio.Task[None] | None = None
        self._seal_task: asyncio.Task[None] | None = None
        self.seals = finops.sealed_runs(self.schema)  # the closed days' run answers
        self.notifications = Notifications(config.budgets, config.notifiers, context)
        # where the spent hard budgets go: the linked gateway receiver's blocks
        self.blocks: BudgetBlocks | None = (blocks_of(context.telemetry, config.gateway)
                                            if config.gateway else None)
        self._audit = AuditCopy(self)  # the audit log into ClickHouse

    async def start(self) -> None:
        self._audit.start()
        if self.config.budgets:
            await self.notifications.start()
            self._budget_task = asyncio.create_task(self._track_budgets(),
                                                    name=f"{self.context.id} budgets")
        if self.config.billing:
            self._billing_task = asyncio.create_task(self._track_billing(),
                                                     name=f"{self.context.id} billing")
        if self.config.seal_interval > 0:
            self._seal_task = asyncio.create_task(self._track_seals(),
                                                  name=f"{self.context.id} seals")

    async def shutdown(self) -> None:
        await self._audit.stop()
        await cancel_and_wait(self._budget_task)
        await cancel_and_wait(self._billing_task)
        await cancel_and_wait(self._seal_task)
        if self.config.budgets:
            budgets.BudgetGauges.of(self.context.meter).publish([])
            if self.blocks is not None:
                self.blocks.publish([])
            await self.notifications.shutdown()
        if self.config.billing:
            reconcile.VarianceGauges.of(self.context.meter).publish([])
        async with self._connecting:  # after a connect under way, and before any other
            self._closed = True  # an API request still running must not open one again
            if self.reader is not None:
                await asyncio.to_thread(self.reader.client.close)
            self.reader = None

    async def connect(self) -> Reader:
        """The reader, opened unless done already; `RetryableError` until the exporter has
        created its tables."""
        async with self._connecting:
            if self._closed:
                raise RetryableError(f"the {self.context.id} extension is shutting down")
            if self.reader is None:
                try:
                    self.reader = await asyncio.to_thread(self._open)
                except Exception as e:
                    raise classify(e) from e
            return self.reader

    def _open(self) -> Reader:
        client = open_client(self.config.exporter, self.context.data_dir)
        try:
            if missing := missing_tables(client, self.schema):
                raise RetryableError(
                    f"exporter {self.config.clickhouse} has not created "
                    f"{', '.join(missing)} in database {self.schema.database} yet")
        except Exception:
            client.close()
            raise
        return Reader(client, self.schema, seals=self.seals)

    # --- the admin API and budgets ---------------------------------------------------
    def admin_routes(self) -> dict[str, AdminHandler]:
        return api.routes(self)

    async def budget_status(self) -> list[dict[str, Any]]:
        reader = await self.connect()
        return await asyncio.to_thread(budgets.status, reader, self.config.budgets)

    async def _track_budgets(self) -> None:
        gauges = budgets.BudgetGauges.of(self.context.meter)
        while True:
            try:
                await self._evaluate_budgets(gauges)
            except Exception as e:
                self.log.warning("cannot compute budget spend", error=str(e))
            await asyncio.sleep(float(self.config.budget_refresh))

    async def _evaluate_budgets(self, gauges: budgets.BudgetGauges) -> None:
        """One pass: gauges, the gateway's blocks, then the notifications. Until ClickHouse
        answers, the blocks published last stay (a hard budget stays enforced)."""
        now = datetime.now(UTC)
        reader = await self.connect()

        def evaluate() -> tuple[list[dict[str, Any]], list[Block]]:
            statuses = budgets.status(reader, self.config.budgets, now)
            return statuses, enforce.blocks(reader, self.config.budgets, statuses)

        statuses, blocks = await asyncio.to_thread(evaluate)
        gauges.publish(statuses)
        if self.blocks is not None:
            self.blocks.publish(blocks)
        await self.notifications.crossed(statuses, now)


    # --- sealing the closed days' run answers (exporters/clickhouse/seals.py) ---------
    async def _track_seals(self) -> None:
        await asyncio.sleep(min(60.0, float(self.config.seal_interval)))  # (not at start-up)
        while True:
            try:
                reader = await self.connect()
                days = await asyncio.to_thread(self.seals.seal, reader, most=31)
                if days:
                    self.log.info("run answers sealed", days=len(days),
                                  first=days[0].isoformat(), last=days[-1].isoformat())
            except Exception as e:
                self.log.warning("cannot seal the closed days' run answers", error=str(e))
            await asyncio.sleep(float(self.config.seal_interval))

    # --- billing (billing/: the cost APIs pulled, the variance gauges) -----------------
    async def _track_billing(self) -> None:
        billing = self.config.billing
        assert billing is not None
        gauges = reconcile.VarianceGauges.of(self.context.meter)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            while True:
                for provider in ("openai", "anthropic"):
                    if api_ := getattr(billing, provider):
                        await self._pull(session, provider, api_, billing.lookback_days)
                try:
                    reader = await self.connect()
                    rows = await asyncio.to_thread(reconcile.variance_by_provider, reader,
                                                   billing.variance_days)
                except Exception as e:
                    self.log.warning("cannot compute the billing variance", error=str(e))
                else:
                    gauges.publish(rows)
                await asyncio.sleep(float(billing.refresh))

    async def _pull(self, session: aiohttp.ClientSession, provider: str, api_: pull.CostApi,
                    days: int) -> None:
        try:
            lines = await pull.pull(session, provider, api_, days)
            reader = await self.connect()
            await asyncio.to_thread(store.insert, reader.client, reader.schema, lines)
        except Exception as e:
            self.log.warning("cannot pull the cost API", provider=provider, error=str(e))
        else:
            self.log.info("cost API pulled", provider=provider, lines=len(lines))


factory = Factory(kind="extension", type="finops", config=FinOpsConfig, create=FinOps, link=link)
