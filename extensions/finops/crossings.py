"""Budget threshold crossings: notified once each, through the notifiers' durable delivery.

A crossing is a budget (a member of it, with `per`) reaching one of its `notify_at`
thresholds within one window. For each target of the budget (each notifier it names;
none: the log line alone) the highest threshold notified is kept per (target, budget,
member, window start) in `notified.json` under the extension's data directory (a rolling
window has no start: its mark is lowered when the spend falls back below a threshold,
which re-arms it; a notification queued before that and delivered after does not raise
it again). A jump over several thresholds at once is one notification, of the
highest.

Exactly once, across restarts and kill -9 (with the default persistent queues):

1. the notification is put into the notifier's queue and that put awaited (durable);
2. the mark is raised and the file replaced atomically (crossings of one evaluation
   together).

A crash between 1 and 2 leaves a notification queued but not marked. Two things mark
it instead: on start, before delivery resumes, every notification still in a queue
raises its mark (`Notifications.start`); and the notifier raises the mark of each
notification it delivered, on disk, before the queue acknowledges it
(`WebhookExporter.sent`). So the next evaluation finds every queued or delivered crossing
marked and never queues it again; a crash before 1 queued nothing and the next
evaluation queues it. What remains is the queue's own at-least-once: killed after the
webhook answered 2xx but before the mark and the acknowledgement were written, the
notification is posted again after the restart, with the same
`X-Meterline-Notification-Id`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterline.component import Context
from meterline.delivery import ExporterRunner, open_queue
from meterline.event import Event
from meterline.exporters.clickhouse.query import iso, parse_time
from meterline.extensions.finops.budgets import Budget
from meterline.extensions.finops.notifiers import NOTIFICATION, NotifierConfig, WebhookExporter
from meterline.queue import Batch
from meterline.queue.persistent import atomic_write

_MARK = "budget_mark"  # the event attribute: the mark a notification raises
_SHUTDOWN_GRACE = 2.0  # seconds a notifier gets to deliver what is queued when stopping


class Marks:
    """The highest threshold notified, by mark key, kept in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.marks: dict[str, dict[str, Any]] = json.loads(path.read_bytes())
        except FileNotFoundError:
            self.marks = {}
        # Rolling marks are lowered in turns (`rearm`): the turn each was last lowered in,
        # and the current one. A notification queued before its mark was lowered and
        # delivered after must not raise it again: the spend fell back meanwhile. Turns
        # start from the clock, so that those of a notification queued before a restart
        # are older than any turn after it.
        self.rearmed: dict[str, int] = {}
        self.turn = time.time_ns()
        self._saving = asyncio.Lock()

    def threshold(self, key: str) -> float:
        return float(self.marks.get(key, {}).get("threshold", 0.0))

    def raise_to(self, mark: dict[str, Any]) -> bool:
        """Raise a mark (`key`, `threshold`, `budget`, `member`, `expires`, `turn`); False
        when it was at least as high, or lowered since that notification was queued."""
        if mark["threshold"] <= self.threshold(mark["key"]) \
                or mark.get("turn", 0) < self.rearmed.get(mark["key"], 0):
            return False
        self.marks[mark["key"]] = {k: v for k, v in mark.items() if k not in ("key", "turn")}
        return True

    def rearm(self, reached: Mapping[tuple[str, str | None], float | None], now: float) -> bool:
        """Drop the marks of ended calendar windows, and lower each rolling mark to the
        threshold its spend still reaches (`reached`, by (budget, member))."""
        changed = False
        self.turn += 1
        for key, mark in list(self.marks.items()):
            expires = mark.get("expires")
            if expires is not None:
                if expires <= now:
                    del self.marks[key]
                    changed = True
                continue
            still = reached.get((mark["budget"], mark["member"])) or 0.0
            if still < mark["threshold"]:
                changed = True
                self.rearmed[key] = self.turn
                if still:
                    mark["threshold"] = still
                else:
                    del self.marks[key]
        return changed

    async def save(self) -> None:
        """Replace the file atomically (the latest state wins: saves are serialised)."""
        async with self._saving:
            data = json.dumps(self.marks, sort_keys=True).encode()
            await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, data)


class Notifications:
    """The notifiers, each an `ExporterRunner` over its own queue, and the marks."""

    def __init__(self, budgets: Mapping[str, Budget], notifiers: Mapping[str, NotifierConfig],
                 context: Context) -> None:
        self.budgets = budgets
        self.log = context.log
        self.marks = Marks(context.state_path("budgets") / "notified.json")
        self.runners: dict[str, ExporterRunner] = {}
        self.failed = context.telemetry.budget_notifications_failed
        for name, config in notifiers.items():
            own = dataclasses.replace(context, id=f"{context.id}/{name}")
            self.runners[name] = ExporterRunner(
                WebhookExporter(config, self._delivered), config, own,
                open_queue(config.queue, own), context.telemetry,
                given_up=functools.partial(self._given_up, own.id))
        # every series at 0 from the start, so that the first failure is an increase (the
        # alert LLMBudgetNotificationFailed) rather than a series appearing at 1
        for budget_name, budget in budgets.items():
            for target in budget.notify or []:
                for reason in ("gave_up", "not_queued"):
                    self.failed.add(0, {"notifier": self.runners[target].id,
                                        "budget": budget_name, "reason": reason})

    async def start(self) -> None:
        """Raise the marks of what the queues still hold, then deliver it."""
        held = [event for runner in self.runners.values()
                for events in runner.queue.untaken() for event in events]
        if sum(self.marks.raise_to((e.attributes or {})[_MARK]) for e in held):
            await self.marks.save()
        for runner in self.runners.values():
            await runner.start()

    async def shutdown(self) -> None:
        for runner in self.runners.values():
            await runner.shutdown(_SHUTDOWN_GRACE)

    def _given_up(self, notifier: str, events: list[Event]) -> None:
        """Count the notifications a notifier's delivery gave up on (each is logged and
        dead-lettered by the delivery; its crossing stays marked: it is not sent again)."""
        for event in events:
            budget = (event.attributes or {}).get(NOTIFICATION, {}).get("budget", "")
            self.failed.add(1, {"notifier": notifier, "budget": budget, "reason": "gave_up"})

    async def _delivered(self, event: Event) -> None:
        if self.marks.raise_to((event.attributes or {})[_MARK]):
            await self.marks.save()

    async def crossed(self, statuses: list[dict[str, Any]], now: datetime) -> None:
        """Queue a notification for each threshold newly crossed (see the module's doc)."""
        changed = self.marks.rearm({(s["budget"], s["member"]): s["threshold_reached"]
                                    for s in statuses if s["rolling"]}, now.timestamp())
        for s in statuses:
            reached = s["threshold_reached"]
            if reached is None:
                continue
            news = [await self._notify(target, s, reached, now)
                    for target in self.budgets[s["budget"]].notify or [""]]
            if any(news):
                changed = True
                self.log.warning("budget threshold crossed", budget=s["budget"],
                                 member=s["member"], threshold=reached,
                                 spend_usd=s["spend_usd"], limit_usd=s["limit_usd"],
                                 window_start=s["period_start"])
        if changed:
            await self.marks.save()

    async def _notify(self, target: str, s: dict[str, Any], reached: float,
                      now: datetime) -> bool:
        """Queue the crossing for `target` ("": only logged) unless marked; True if it was
        new (and is marked now)."""
        window = "rolling" if s["rolling"] else s["period_start"]
        key = json.dumps([target, s["budget"], s["member"], window])
        if reached <= self.marks.threshold(key):
            return False
        mark = {"key": key, "threshold": reached, "budget": s["budget"],
                "member": s["member"], "expires": None if s["rolling"] else
                parse_time(s["period_end"], "period_end").timestamp(),
                "turn": self.marks.turn}
        if target:
            notification = {
                "budget": s["budget"], "scope": s["scope"], "per": s["per"],
                "member": s["member"], "period": s["period"],
                "window_start": s["period_start"], "window_end": s["period_end"],
                "spend_usd": s["spend_usd"], "limit_usd": s["limit_usd"],
                "threshold": reached, "crossed_at": iso(now.astimezone(UTC)),
                "action": s["action"]}
            event_id = hashlib.sha256(f"{key}{reached}".encode()).hexdigest()[:32]
            event = Event(event_id=event_id, source="meterline", timestamp=time.time_ns(),
                          attributes={NOTIFICATION: notification, _MARK: mark})
            try:
                await self.runners[target].put(Batch([event]))
            except Exception as e:  # full, or the disk: the next evaluation tries again
                self.log.warning("cannot queue a budget notification", notifier=target,
                                 budget=s["budget"], error=str(e))
                self.failed.add(1, {"notifier": self.runners[target].id,
                                    "budget": s["budget"], "reason": "not_queued"})
                return False
        return self.marks.raise_to(mark)
