"""Exporter `prometheus`: LLM-call metrics for Prometheus to scrape, on their own listener.

Serves the Prometheus text format, or OpenMetrics when the scraper asks for it
(`Accept`), at `listen` + `path`, optionally behind a bearer token. The metrics
come from events (see `metrics.py`), plus the live gauges that are not events:
every self-telemetry instrument named `llm_gateway_*` (requests in flight,
endpoint health, budget use...) is republished from the daemon's telemetry
registry, without the OpenTelemetry scope labels.

Its queue is in memory by default: the metrics are counters in this process,
which a restart resets anyway, and Prometheus handles resets.

An event counts once: the ids of the last `dedupe_ids` events counted are
remembered, and an event with one of them (a batch a client re-sent after a
timeout, which ClickHouse stores once too) is left out and counted in
`meterline_prometheus_duplicate_events_total`. Ids are remembered once the batch
is counted, so an export retried after a failure counts its batch once. The memory
is this process's: with `multiprocess_dir`, a copy received by another process
counts there.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Sample

from meterline.auth import BearerToken, unauthorised
from meterline.component import Config, Context, ExportBatch, Exporter, Factory, cancel_and_wait
from meterline.delivery import ExporterConfig, QueueConfig, refuse_projection
from meterline.exporters.prometheus.metrics import (
    BUCKET_SETS,
    CONFIG_PARSING_FAILURES,
    DEFAULT_LABELS,
    FAMILY_SETS,
    LABELS,
    FamilySet,
    Key,
    label_name,
    labeler,
)
from meterline.exporters.prometheus.multiprocess import PUBLISH_INTERVAL, SharedSeries
from meterline.exporters.prometheus.series import Family, SeriesStore
from meterline.genai import DURATION_BUCKETS, TIME_PER_TOKEN_BUCKETS, TTFT_BUCKETS
from meterline.httpserver import serve
from meterline.recent import RecentIds
from meterline.tls import ServerTlsConfig
from meterline.units import Duration, Listen

TELEMETRY_PREFIX = "llm_gateway_"
# the daemon's reloads, by result: a refused one is a config that failed to parse
CONFIG_RELOADS, REFUSED = "meterline_config_reloads", "refused"
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class BucketsConfig(Config):
    """Histogram bucket upper bounds, in seconds (GenAI conventions by default)."""

    # gen_ai.client.operation.duration
    duration: list[float] = msgspec.field(default_factory=lambda: list(DURATION_BUCKETS))
    # the gateway's own added latency
    overhead: list[float] = msgspec.field(default_factory=lambda: list(OVERHEAD_BUCKETS))
    # gen_ai.server.time_to_first_token
    time_to_first_token: list[float] = msgspec.field(default_factory=lambda: list(TTFT_BUCKETS))
    # gen_ai.server.time_per_output_token
    inter_token_latency: list[float] = msgspec.field(
        default_factory=lambda: list(TIME_PER_TOKEN_BUCKETS))

    def __post_init__(self) -> None:
        for name in BUCKET_SETS:
            bounds = getattr(self, name)
            if not bounds or any(not math.isfinite(b) or b <= 0 for b in bounds) or any(
                    a >= b for a, b in itertools.pairwise(bounds)):
                raise ValueError(f"{name}: expected increasing positive numbers, got {bounds}")


class PrometheusConfig(ExporterConfig):
    listen: Listen = Listen("127.0.0.1:9464")  # the scrape listener
    path: str = "/metrics"  # the scrape path
    auth_token: str | None = None  # when set, scrapes need `Authorization: Bearer <token>`
    tls: ServerTlsConfig | None = None  # serve the scrapes over HTTPS
    # labels of every series: event fields, or llm_gateway_metadata_<key> for a metadata
    # key (metadata_<key> is accepted too; the label is named llm_gateway_metadata_<key>)
    labels: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_LABELS))
    # which names the metrics are exposed under: standard (seeds 001 and 002's names),
    # truefoundry (seed 004's: llm_gateway_input_tokens, policy and agent counters...)
    families: list[FamilySet] = msgspec.field(default_factory=lambda: list(FAMILY_SETS))
    max_series: int = 2000  # label sets tracked; beyond, new ones fold into __other__
    metric_expiration: Duration = Duration(3600)  # forget a label set unseen this long
    buckets: BucketsConfig = msgspec.field(default_factory=BucketsConfig)
    multiprocess_dir: str | None = None  # share series with other processes (one scrape)
    dedupe_ids: int = 100_000  # ids of recent events remembered, to count each once; 0: off
    queue: QueueConfig = msgspec.field(default_factory=lambda: QueueConfig(type="memory"))

    def __post_init__(self) -> None:
        refuse_projection(self, "prometheus", "counts events into fixed llm_gateway_* series")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with /, got {self.path!r}")
        if self.max_series < 1:
            raise ValueError("max_series must be at least 1")
        if self.metric_expiration <= 0:
            raise ValueError("metric_expiration must be positive")
        if self.dedupe_ids < 0:
            raise ValueError("dedupe_ids must be >= 0")
        for name in self.labels:
            if label_name(name) is None:
                known = ", ".join(LABELS)
                raise ValueError(f"unknown label {name!r}: expected one of {known}, or "
                                 "llm_gateway_metadata_<key> for a metadata key made of "
                                 "letters, digits and _")
        if len({label_name(name) for name in self.labels}) != len(self.labels):
            raise ValueError(f"labels listed twice: {self.labels}")
        if not self.families:
            raise ValueError(f"families: expected at least one of {', '.join(FAMILY_SETS)}")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families listed twice: {self.families}")


class PrometheusExporter(Exporter):
    def __init__(self, config: PrometheusConfig, context: Context) -> None:
        self.config = config
        self.log = context.log
        self.auth = BearerToken(config.auth_token)
        self.telemetry_registry = context.telemetry.registry
        attrs = {"exporter": context.id}
        folded = context.meter.create_counter(
            "meterline_prometheus_folded_events",
            description="Events counted under __other__ because max_series label sets "
                        "were tracked already")
        expired = context.meter.create_counter(
            "meterline_prometheus_expired_series",
            description="Label sets forgotten after metric_expiration without events")
        self._duplicates = context.meter.create_counter(
            "meterline_prometheus_duplicate_events",
            description="Events not counted again: their event_id was counted lately "
                        "(within the last dedupe_ids events)")
        self._attrs = attrs
        self.store = SeriesStore(
            [str(label_name(name)) for name in config.labels],
            [labeler(name) for name in config.labels],
            {name: tuple(getattr(config.buckets, name)) for name in BUCKET_SETS},
            config.max_series, float(config.metric_expiration),
            keep_values=config.multiprocess_dir is not None,
            on_fold=lambda n: folded.add(n, attrs), on_expire=lambda n: expired.add(n, attrs),
            sets=tuple(config.families))
        self._exposed_names = {e.name for e in self.store.exposed}
        self.recent = RecentIds(config.dedupe_ids)
        self.shared: SharedSeries | None = None
        # series counted but not yet in the shared file (a write failed): written first
        # by the next export, the retry of the failed one
        self._unwritten: dict[tuple[str, Key], tuple[Family, Key, list[float]]] = {}
        self.clock = time.time  # when a batch was seen, when a scrape is
        # Counting a batch and taking a scrape's copy run in threads, not on the loop that
        # serves clients (a batch of 1,000 events is milliseconds of Python): they take
        # turns on the series, the ids seen and the shared file.
        self._series_lock = threading.Lock()
        self.runner: web.AppRunner | None = None
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.config.multiprocess_dir is not None:
            self.shared = SharedSeries(Path(self.config.multiprocess_dir))
            self._publisher = asyncio.create_task(self._publish_telemetry())
        app = web.Application()
        app.router.add_get(self.config.path, self.scrape)
        self.runner = await serve(app, self.config.listen, tls=self.config.tls,
                                  shutdown_timeout=2.0)
        self.log.info("prometheus listening", listen=self.config.listen, path=self.config.path,
                      shared=str(self.shared.path) if self.shared else None)

    async def shutdown(self) -> None:
        await cancel_and_wait(self._publisher)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.shared is not None:
            self.shared.close()

    async def export(self, batch: ExportBatch) -> None:
        await asyncio.to_thread(self._count, batch)

    def _count(self, batch: ExportBatch) -> None:
        with self._series_lock:
            now = self.clock()
            events, claimed = self.recent.claim(batch.events)
            if len(events) != len(batch.events):
                self._duplicates.add(len(batch.events) - len(events), self._attrs)
            try:
                changed = self.store.update(events, now) if events else []
            except BaseException:
                self.recent.release(claimed)  # not counted: a retry counts them
                raise
            # Counted from here on: a retry of this batch finds every id claimed and counts
            # nothing again; it only writes what did not reach the shared file.
            if self.shared is not None:
                unwritten = self._unwritten
                for family, key, values in changed:
                    unwritten[(family.name, key)] = (family, key, values)
                for ident, (family, key, values) in list(unwritten.items()):
                    self.shared.write(family, key, values, now)  # values: the totals
                    del unwritten[ident]

    async def scrape(self, request: web.Request) -> web.StreamResponse:
        if not self.auth.admits_request(request):
            return unauthorised(plain_text=True)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # In a thread: the copy (under the series lock) and the text, most of the cost.
        body = await asyncio.to_thread(lambda: encoder(self.snapshot()))
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()
        return response

    # --- what a scrape shows -------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """What a scrape shows now, for prometheus_client's encoders."""
        with self._series_lock:
            return Snapshot(list(self.families()))

    def families(self) -> Iterator[Metric]:
        now = self.clock()
        if self.shared is None:
            self.store.drop_expired(now)
            yield from self.store.collect()
            yield from self.telemetry()
            return
        self.shared.publish(self.telemetry(), now)
        live, telemetry = self.shared.read(self.store.families, now,
                                           float(self.config.metric_expiration))
        for exposed in self.store.exposed:
            yield exposed.expose(live.get(exposed.family.name, []))
        yield from telemetry

    def telemetry(self) -> Iterator[Metric]:
        """The daemon's `llm_gateway_*` instruments, without OpenTelemetry's scope labels
        (a name the events already give is left out); with the truefoundry families, the
        refused reloads as `llm_gateway_config_parsing_failures`."""
        parsing_failures = 0.0
        for family in self.telemetry_registry.collect():
            if family.name == CONFIG_RELOADS:
                parsing_failures += sum(s.value for s in family.samples
                                        if s.labels.get("result") == REFUSED
                                        and s.name.endswith("_total"))
            if not family.name.startswith(TELEMETRY_PREFIX) \
                    or family.name in self._exposed_names:
                continue
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [Sample(s.name, {k: v for k, v in s.labels.items()
                                            if not k.startswith("otel_scope_")}, s.value)
                            for s in family.samples]
            yield copy
        if "truefoundry" in self.config.families:
            failures = Metric(CONFIG_PARSING_FAILURES,
                              "Reloads of the configuration refused because it failed to "
                              "parse or validate (a counter, without `_total`: use "
                              "increase())", "unknown")
            failures.add_sample(CONFIG_PARSING_FAILURES, {}, parsing_failures)
            yield failures

    async def _publish_telemetry(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.to_thread(self._publish)
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _publish(self) -> None:
        assert self.shared is not None
        with self._series_lock:
            self.shared.publish(self.telemetry(), time.time())


class Snapshot:
    """Metric families taken at one moment; prometheus_client's encoders read `collect()`."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


factory = Factory(kind="exporter", type="prometheus", config=PrometheusConfig,
                  create=PrometheusExporter)
