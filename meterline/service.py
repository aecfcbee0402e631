"""The running daemon: builds components from a `PipelineFile`, starts them in
order (exporters, processors, receivers, extensions), reloads, and shuts down.

Reload compares the new file's components with the running ones by id and
config: unchanged receivers keep their listeners, unchanged exporters keep their
queues and loops, and only what changed is rebuilt. Intake pauses for the swap
(`Flow`), so no batch sees half a graph. A changed exporter's queue carries over:
a persistent queue is reopened from the same directory, a memory queue's events
are handed to the new one. Extensions start last and stop first: they read what
the pipelines write (the `finops` extension reads the tables a `clickhouse` exporter
creates), and one being replaced lets go of what it holds (an embedded chDB directory)
before the components it reads are rebuilt.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline import audit as audit_mod
from meterline import config as config_mod
from meterline import logs
from meterline.audit import AuditLog, Trigger
from meterline.component import (
    Context,
    Exporter,
    Extension,
    Processor,
    Receiver,
    cancel_and_wait,
)
from meterline.config import ComponentConfig, ConfigError, MemoryLimiterConfig, PipelineFile
from meterline.delivery import ExporterConfig, ExporterRunner, open_queue
from meterline.memory import LimitsError, MemoryLimiter, start_limiter
from meterline.pipeline import Entry, Flow, Pipeline, Taps
from meterline.queue import Batch
from meterline.telemetry import Telemetry
from meterline.workers import Plan, ProcessorPool, ProcessorSpec, default_workers


@dataclass
class _Running:
    spec: ComponentConfig
    component: Any  # Receiver, Processor, ExporterRunner or Extension


class Service:
    def __init__(self, config: PipelineFile, overlay: dict[str, Any] | None = None) -> None:
        self.config = config
        self.overlay = overlay  # merged into the file again on every reload (config.load)
        self.data_dir = Path(config.service.data_dir)
        self.telemetry = Telemetry(config.service.telemetry.metrics)
        self.log = logs.get(component="service")
        self.flow = Flow()
        self.taps = Taps()
        self.receivers: dict[str, _Running] = {}
        self.entries: dict[str, Entry] = {}
        self.processors: dict[tuple[str, str], _Running] = {}
        self.exporters: dict[str, _Running] = {}
        self.extensions: dict[str, _Running] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.ready = False
        self.reloads = 0  # successful reloads since start
        self.reloads_refused = 0  # reloads refused (invalid file) or applied in part
        self.audit = AuditLog(self.data_dir)  # every start and reload, in the data dir
        self.last_reload: dict[str, Any] | None = None  # the audit entry of the last reload
        self.admin: Any = None
        self.config_path = config.file  # the file reloads read (`run` sets the one given)
        self.limiter: MemoryLimiter | None = None
        self._lock_fd: int | None = None
        self._reloading = asyncio.Lock()
        self._stop = asyncio.Event()
        workers, why = ((config.service.workers, "service.workers") if config.service.workers
                        else default_workers())
        self.log.info("processing workers", workers=workers, why=why,
                      **({} if workers > 1 else {"where": "in the daemon's own process"}))
        log_cfg = config.service.telemetry.logs
        self.pool = (ProcessorPool(workers, config.service.worker_nice, log_cfg.level,
                                   log_cfg.encoding, self.telemetry)
                     if workers > 1 else None)

    def context(self, cid: str) -> Context:
        return Context(cid, self.data_dir, self.telemetry, logs.get(component=cid),
                       audit=self.audit)

    # --- start ---------------------------------------------------------------------
    async def start(self) -> None:
        self._lock_data_dir()
        self.limiter = await start_limiter(self.config.service.memory_limiter,
                                           self.telemetry.meter)
        self.audit.open()
        await self._apply(self.config, first=True)
        await self.audit.record(self.audit.entry(
            "start", self.config.file, self.config.sha256, "applied",
            changes=audit_mod.diff(None, self.config, self.overlay)))
        admin_cfg = self.config.service.admin
        if admin_cfg is not None:
            from meterline.admin import AdminServer

            self.admin = AdminServer(self, admin_cfg)
            await self.admin.start()
        self.ready = True
        self.log.info("started", pipelines=sorted(self.pipelines),
                      receivers=sorted(self.receivers), exporters=sorted(self.exporters),
                      extensions=sorted(self.extensions))

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another meterline is running with data_dir {self.data_dir}; "
                               "give each daemon its own service.data_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # --- build and swap ------------------------------------------------------------
    async def _apply(self, new: PipelineFile, first: bool = False) -> None:
        """Make the running graph that of `new`, rebuilding only what changed."""
        if not first:
            # Receivers that go or change are stopped before intake pauses: a receiver's
            # shutdown hands over what it holds (the gateway's buffered events, requests
            # in flight), which a paused flow would never take: the reload waited on them
            # forever, and every receiver with it.
            await _stop_changed(self.receivers, new.receivers)
            await self.flow.pause()
        try:
            await _stop_changed(self.extensions, new.extensions)  # first, started last
            await self._swap_exporters(new)
            await self._swap_processors(new)
            await self._swap_receivers(new)
            await self._start_extensions(new)
        finally:
            self.flow.resume()
        self.config = new

    async def _swap_exporters(self, new: PipelineFile) -> None:
        handover: dict[str, list[list[Any]]] = {}
        for cid, running in list(self.exporters.items()):
            spec = new.exporters.get(cid)
            if spec is not None and spec.config == running.spec.config:
                continue
            runner: ExporterRunner = running.component
            await runner.stop_loop()
            if not runner.queue.durable:  # what it holds goes to its replacement, if any
                left = runner.queue.untaken()
                if spec is not None:
                    handover[cid] = left
                elif left:
                    self.log.warning("removed exporter's memory queue dropped events",
                                     exporter=cid, events=sum(map(len, left)))
            elif spec is None and len(runner.queue):
                self.log.warning("removed exporter left events in its queue directory",
                                 exporter=cid, events=len(runner.queue))
            self.telemetry.watch_queue(cid, None)
            await runner.queue.close()
            await runner.exporter.shutdown()
            del self.exporters[cid]
        for cid, spec in new.exporters.items():
            if cid in self.exporters:
                continue
            runner = self._build_exporter(spec)
            for events in handover.get(cid, []):
                await runner.queue.put(Batch(events))
            await _started(f"exporter {cid}", runner.start())
            self.exporters[cid] = _Running(spec, runner)

    def _build_exporter(self, spec: ComponentConfig) -> ExporterRunner:
        if not isinstance(spec.config, ExporterConfig):
            raise TypeError(f"exporter {spec.factory.type}: its config class must derive "
                            "from meterline.delivery.ExporterConfig")
        context = self.context(spec.id)
        exporter: Exporter = spec.factory.create(spec.config, context)
        queue = open_queue(spec.config.queue, context)
        return ExporterRunner(exporter, spec.config, context, queue, self.telemetry)

    async def _swap_processors(self, new: PipelineFile) -> None:
        wanted = {(name, pid) for name, p in new.service.pipelines.items() for pid in p.processors}
        for key, running in list(self.processors.items()):
            spec = new.processors.get(key[1])
            if key not in wanted or spec is None or spec.config != running.spec.config:
                await running.component.shutdown()
                del self.processors[key]
        for name, pid in sorted(wanted):
            if (name, pid) not in self.processors:
                spec = new.processors[pid]
                processor: Processor = spec.factory.create(spec.config, self.context(spec.id))
                await _started(f"processor {pid}", processor.start())
                self.processors[(name, pid)] = _Running(spec, processor)
        if self.pool is not None:
            await self._plan_workers(new)
        self.pipelines = {
            name: Pipeline(
                name,
                [(pid, self.processors[(name, pid)].component) for pid in p.processors],
                [self.exporters[eid].component for eid in p.exporters],
                self.telemetry, self.taps)
            for name, p in new.service.pipelines.items()}

    async def _plan_workers(self, new: PipelineFile) -> None:
        """Have the worker processes build the same processors (started on first use)."""
        assert self.pool is not None
        self.pool.configure(Plan(
            {name: [ProcessorSpec(pid, new.processors[pid].factory.type,
                                  new.processors[pid].raw) for pid in p.processors]
             for name, p in new.service.pipelines.items()},
            str(self.data_dir), self.pool.workers))
        if not self.pool.started:
            await _started("processing workers", self.pool.start())

    async def _swap_receivers(self, new: PipelineFile) -> None:
        await _stop_changed(self.receivers, new.receivers)
        for cid in list(self.entries):
            if cid not in new.receivers:
                del self.entries[cid]
        for cid, spec in new.receivers.items():
            entry = self.entries.setdefault(cid, Entry(cid, self.flow, self.telemetry,
                                                        self.pool, self.limiter))
            entry.pipelines = [self.pipelines[name]
                               for name, p in new.service.pipelines.items() if cid in p.receivers]
            if cid not in self.receivers:
                receiver: Receiver = spec.factory.create(spec.config, self.context(cid), entry)
                await _started(f"receiver {cid}", receiver.start())
                self.receivers[cid] = _Running(spec, receiver)

    async def _start_extensions(self, new: PipelineFile) -> None:
        for cid, spec in new.extensions.items():
            if cid not in self.extensions:
                extension: Extension = spec.factory.create(spec.config, self.context(cid))
                await _started(f"extension {cid}", extension.start())
                self.extensions[cid] = _Running(spec, extension)

    # --- reload --------------------------------------------------------------------
    async def reload(self, path: str, trigger: Trigger = "signal") -> bool:
        """Re-read `path`; apply it if valid, else log why and keep running as before.
        Either way the audit log records it, with what `trigger`ed it."""
        async with self._reloading:
            data: bytes | None = None
            try:
                data = config_mod.read(path)
                new = config_mod.loads(data, path, overlay=self.overlay)
            except ConfigError as e:
                for problem in e.problems:
                    self.log.error("reload refused: invalid configuration", problem=str(problem))
                await self._reloaded(self.audit.entry(
                    trigger, path, None if data is None else audit_mod.digest(data), "refused",
                    error=audit_mod.scrub(str(e), (data or b"").decode(errors="replace"))))
                return False
            changes = audit_mod.diff(self.config, new, self.overlay)
            fixed = ["data_dir", "admin", "telemetry", "workers", "worker_nice"]
            if not self._retune_limiter(new.service.memory_limiter):
                fixed.append("memory_limiter")
            kept = []
            for key in fixed:
                if getattr(new.service, key) != getattr(self.config.service, key):
                    self.log.warning("service setting changes need a restart", setting=key)
                    setattr(new.service, key, getattr(self.config.service, key))
                    kept.append(key)
            entry = self.audit.entry(trigger, path, new.sha256, "applied", changes=changes,
                                     restart_needed=kept)
            try:
                await self._apply(new)
            except StartError as e:
                self.log.error("reload applied in part: a component failed to start",
                               error=str(e))
                entry.result, entry.error = "partial", audit_mod.scrub(str(e), new.text)
                await self._reloaded(entry)
                return False
            await self._reloaded(entry)
            self.log.info("reloaded", file=path, pipelines=sorted(self.pipelines))
            return True

    def _retune_limiter(self, config: MemoryLimiterConfig | None) -> bool:
        """Apply new memory limits to the running limiter; False when that cannot be done
        (turned on or off: a restart; limits that do not fit this machine: kept, logged)."""
        if self.limiter is None or config is None:
            return (self.limiter is None) == (config is None)
        if config != self.config.service.memory_limiter:
            try:
                self.limiter.configure(config)
            except LimitsError as e:
                self.log.error("memory limits not changed", error=str(e))
                return False
        return True

    async def _reloaded(self, entry: audit_mod.Entry) -> None:
        if entry.result == "applied":
            self.reloads += 1
        else:
            self.reloads_refused += 1
        self.telemetry.config_reloaded(entry.result)
        self.last_reload = await self.audit.record(entry)

    def admin_routes(self) -> dict[str, Any]:
        """The admin API paths the running components serve (see Component.admin_routes)."""
        routes: dict[str, Any] = {}
        components = [r.component for r in (*self.receivers.values(), *self.processors.values())]
        components += [r.component.exporter for r in self.exporters.values()]
        components += [r.component for r in self.extensions.values()]
        for component in components:
            routes.update(component.admin_routes())
        return routes

    def status(self) -> dict[str, Any]:
        """What runs now: for the admin API and for operators checking a reload."""
        return {
            "ready": self.ready,
            "reloads": self.reloads,
            "reloads_refused": self.reloads_refused,
            "workers": ({"processes": self.pool.workers, "restarts": self.pool.restarts}
                        if self.pool is not None else {"processes": 0}),
            "pipelines": {name: {"receivers": p.receivers, "processors": p.processors,
                                 "exporters": p.exporters}
                          for name, p in self.config.service.pipelines.items()},
            "exporters": {cid: r.component.queue.describe() for cid, r in self.exporters.items()},
            "extensions": sorted(self.extensions),
        }

    # --- stop ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop intake, then let exporters deliver within `service.shutdown_timeout`."""
        self.ready = False
        grace = float(self.config.service.shutdown_timeout)
        for running in self.receivers.values():
            with contextlib.suppress(Exception):
                await running.component.shutdown()
        for running in self.extensions.values():
            with contextlib.suppress(Exception):
                await running.component.shutdown()
        for running in self.processors.values():
            await running.component.shutdown()
        if self.pool is not None:
            await self.pool.shutdown()
        await asyncio.gather(*(r.component.shutdown(grace) for r in self.exporters.values()))
        if self.admin is not None:
            await self.admin.shutdown()
        if self.limiter is not None:
            await self.limiter.shutdown()
        self.telemetry.shutdown()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self.log.info("stopped")

    async def run(self, path: str,
                  companion: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Run until SIGTERM/SIGINT; reload on SIGHUP (and on change when watched).
        `companion`, when given, runs beside the started daemon until it stops (the demo's
        traffic)."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(path)))
        self.config_path = path  # what `POST /api/v1/reload` reloads
        background = [asyncio.create_task(self._watch(path))]
        if companion is not None:
            background.append(asyncio.create_task(companion()))
        try:
            await self._stop.wait()
        finally:
            for task in background:
                await cancel_and_wait(task)
            await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _watch(self, path: str) -> None:
        """Reload when the file changes, while `service.watch_config` is on. The setting is
        read at every look, so that a reload turning it on or off takes effect at once (it
        needs no restart); while it is off the file's stamp is followed, not acted on."""
        def stamp() -> tuple[float, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_mtime, st.st_size

        last = stamp()
        while True:
            await asyncio.sleep(1)
            now = stamp()
            if now is not None and now != last:
                last = now
                if self.config.service.watch_config:
                    await self.reload(path, "file_change")


async def _stop_changed(running: dict[str, _Running],
                        wanted: dict[str, ComponentConfig]) -> None:
    """Shut down (and forget) the components `wanted` drops or configures otherwise."""
    for cid, current in list(running.items()):
        spec = wanted.get(cid)
        if spec is None or spec.config != current.spec.config:
            await current.component.shutdown()
            del running[cid]


class StartError(Exception):
    """A component failed to start; the message names it."""


async def _started(name: str, start: Awaitable[None]) -> None:
    try:
        await start
    except Exception as e:
        raise StartError(f"{name} failed to start: {e}") from e
