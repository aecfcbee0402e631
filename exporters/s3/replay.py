"""`meterline replay SOURCE -c pipeline.yaml [--pipeline NAME]`: events read back into a
pipeline.

SOURCE is what the `s3` exporter archived (a local copy of its Parquet files, one file,
or `s3://bucket/prefix` with `--endpoint` and the other connection options), or a
dead-letter directory or file (JSON lines). The events, kept with their ids and times,
go through the named pipeline's processors and exporters, built in this process the way
the daemon builds them (`Service`, without receivers, admin server or extensions); once
every exporter's queue is empty the command prints what it read and what each exporter
delivered, and exits. An exporter that deduplicates by event id (`clickhouse`) stores a
replay run twice once.

The pipeline's components keep their state in its `service.data_dir`, which one
process at a time may use: give the replay file its own, or stop the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from meterline.backpressure import offer, retry_hint
from meterline.cli import add_config_argument, config_path, load_config
from meterline.config import PipelineFile
from meterline.event import Event
from meterline.exporters.s3 import EXTRA
from meterline.exporters.s3.config import S3ExporterConfig
from meterline.pipeline import Entry
from meterline.service import Service, StartError
from meterline.units import Duration

PROGRESS_EVERY = 10.0  # seconds between two progress lines while exporters catch up


def add(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="send an s3 archive or a dead-letter file through a pipeline",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a directory or file of Parquet (an s3 archive) or JSON "
                                  "lines (dead letters), or s3://bucket/prefix")
    add_config_argument(p, "the pipeline file whose pipeline the events go through")
    p.add_argument("--pipeline", help="the pipeline's name (default: the file's only one)")
    p.add_argument("--since", help="keep events from this time: ISO 8601 (2026-11-28, "
                                   "2026-11-28T06:00:00Z) or a duration ago (7d, 12h)")
    p.add_argument("--until", help="keep events before this time (same forms)")
    s3 = p.add_argument_group("an s3:// source (credentials: the AWS default chain)")
    s3.add_argument("--endpoint", help="an S3-compatible store's URL (default: AWS)")
    s3.add_argument("--region")
    s3.add_argument("--path-style", action="store_true", help="address buckets as "
                    "endpoint/bucket/key")
    s3.add_argument("--profile", help="a profile of ~/.aws/config")
    p.set_defaults(func=run)


def instant(text: str | None, name: str, now: datetime) -> int | None:
    """Epoch ns of `--since`/`--until`: an ISO 8601 time (UTC when it names no zone) or a
    duration before `now`."""
    if text is None:
        return None
    try:
        value = now - timedelta(seconds=Duration.from_config(text))
    except ValueError:
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name} must be an ISO 8601 date or time (2026-11-28, "
                             f"2026-11-28T06:00:00Z) or a duration ago (7d), got {text!r}"
                             ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def narrowed(loaded: PipelineFile, name: str) -> PipelineFile:
    """The file reduced to pipeline `name`'s processors and exporters: no receiver,
    extension, admin server or memory limiter, processors run in this process."""
    flow = loaded.service.pipelines[name]
    service = msgspec.structs.replace(loaded.service, pipelines={name: flow}, admin=None,
                                      memory_limiter=None, workers=1, watch_config=False)
    return dataclasses.replace(
        loaded, receivers={}, extensions={}, service=service,
        processors={cid: loaded.processors[cid] for cid in flow.processors},
        exporters={cid: loaded.exporters[cid] for cid in flow.exporters})


def chunks(args: argparse.Namespace) -> Iterator[tuple[str, list[Event]]]:
    """The source's events, by file, as the arguments select them. (Imported here: every
    `meterline` command loads this module, and pyarrow and boto3 are an optional extra.)"""
    from meterline.exporters.s3.archive import Window, read_local, read_s3
    from meterline.exporters.s3.client import make_client

    now = datetime.now(UTC)
    window = Window(instant(args.since, "--since", now), instant(args.until, "--until", now))
    if not args.source.startswith("s3://"):
        return read_local(Path(args.source), window)
    # the exporter's connection options, read the same way (its bucket is not used)
    connection = S3ExporterConfig(bucket="replay", endpoint=args.endpoint, region=args.region,
                                  path_style=args.path_style, profile=args.profile)
    return read_s3(make_client(connection), args.source, window)


@dataclasses.dataclass
class Counts:
    files: int = 0
    events: int = 0
    sent: dict[str, float] = dataclasses.field(default_factory=dict)
    failed: dict[str, float] = dataclasses.field(default_factory=dict)


async def replay(file: PipelineFile, name: str,
                 source: Iterator[tuple[str, list[Event]]]) -> Counts:
    """Send the source's events through pipeline `name` of `file` (narrowed), and wait
    until every exporter has delivered them or given up on them."""
    service = Service(narrowed(file, name))
    await service.start()
    counts = Counts()
    try:
        entry = Entry("replay", service.flow, service.telemetry)
        entry.pipelines = [service.pipelines[name]]
        last = None
        while (item := await asyncio.to_thread(next, source, None)) is not None:
            path, events = item
            counts.files += path != last
            last = path
            counts.events += len(events)
            await offer(entry, events, _wait)
        await _drained(service)
        counts.sent, counts.failed = _delivered(service)
    finally:
        await service.shutdown()
    return counts


def _delivered(service: Service) -> tuple[dict[str, float], dict[str, float]]:
    """Events each exporter delivered and gave up on, from the self-telemetry."""
    sent: dict[str, float] = {}
    failed: dict[str, float] = {}
    for family in service.telemetry.registry.collect():
        for sample in family.samples:
            exporter = sample.labels.get("exporter")
            if exporter and sample.name == "meterline_exporter_sent_events_total":
                sent[exporter] = sample.value
            elif exporter and sample.name == "meterline_exporter_send_failed_events_total":
                failed[exporter] = sample.value
    return sent, failed


async def _wait(error: Exception) -> bool:
    """Wait out a full queue: the exporters are behind, the source will wait for them."""
    await asyncio.sleep(retry_hint(error) or 1.0)
    return True


async def _drained(service: Service) -> None:
    """Wait until every exporter has sent what it holds: at once, not after its batch
    `timeout` (an `s3` exporter's is minutes), as the source has nothing more to give."""
    for runner in service.exporters.values():
        runner.component.finish()
    loop = asyncio.get_running_loop()
    shown = loop.time()
    while queued := {cid: len(r.component.queue) for cid, r in service.exporters.items()
                     if len(r.component.queue)}:
        if loop.time() - shown > PROGRESS_EVERY:
            shown = loop.time()
            print(f"waiting for exporters to deliver: {queued}", file=sys.stderr)
        await asyncio.sleep(0.05)


def run(args: argparse.Namespace) -> int:
    try:
        from meterline.exporters.s3.archive import ReplayError
    except ImportError as e:
        print(f"replay: needs {EXTRA} ({e})", file=sys.stderr)
        return 1
    path = config_path(args.config)
    loaded = load_config(path)
    if loaded is None:
        return 1
    names = list(loaded.service.pipelines)
    name = args.pipeline or (names[0] if len(names) == 1 else None)
    if name not in loaded.service.pipelines:
        print(f"replay: name one of the pipelines of {path} with --pipeline: "
              f"{', '.join(names)}", file=sys.stderr)
        return 1
    try:
        counts = asyncio.run(replay(loaded, name, chunks(args)))
    except (ReplayError, ValueError, RuntimeError, StartError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 1
    print(f"replayed {counts.events} events from {counts.files} files into pipeline {name}")
    for cid in loaded.service.pipelines[name].exporters:
        print(f"  {cid}: {counts.sent.get(cid, 0):.0f} delivered, "
              f"{counts.failed.get(cid, 0):.0f} given up on")
    return 1 if any(counts.failed.values()) else 0
