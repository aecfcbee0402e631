"""Exporter `debug`: events to stdout for a human, as the Collector's debug exporter.

`basic` prints one line per batch, `normal` one line per event, `detailed` every
event as indented JSON. Content fields are printed only at `detailed`. With a
`projection`, `normal` and `detailed` print each projected document instead (one line, or
indented): what a file, kafka or http exporter with the same blueprint would send.
"""

from __future__ import annotations

import sys
from typing import Literal

import msgspec

from meterline.component import Context, ExportBatch, Exporter, Factory
from meterline.delivery import ExporterConfig, QueueConfig
from meterline.event import Event
from meterline.projection import documents


class DebugConfig(ExporterConfig):
    # basic: a line per batch; normal: a line per event; detailed: whole events as JSON
    verbosity: Literal["basic", "normal", "detailed"] = "basic"
    queue: QueueConfig = msgspec.field(default_factory=lambda: QueueConfig(type="memory"))


class DebugExporter(Exporter):
    def __init__(self, config: DebugConfig, context: Context) -> None:
        self.verbosity = config.verbosity
        self.projection = config.projection
        self.id = context.id

    async def export(self, batch: ExportBatch) -> None:
        lines = [f"{self.id}: batch {batch.id}: {len(batch.events)} events"]
        if self.verbosity == "normal" and self.projection is None:
            lines += [_summary(e) for e in batch.events]
        elif self.verbosity != "basic":
            docs = [msgspec.json.encode(d) for d in documents(batch.events, self.projection)]
            if self.verbosity == "detailed":
                docs = [msgspec.json.format(d, indent=2) for d in docs]
            lines += [d.decode() for d in docs]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def _summary(e: Event) -> str:
    """One line; a figure not reported reads `-` (as the FinOps tables write it)."""
    cost = f"${e.cost_usd:.6f}" if e.cost_usd is not None else "-"
    duration = f"{e.duration_ms}ms" if e.duration_ms is not None else "-"
    return (f"  {e.event_id} {e.source or '-'} {e.provider or '-'}/{e.request_model or '-'} "
            f"{e.operation or '-'} status={_shown(e.status_code)} in={_shown(e.input_tokens)} "
            f"out={_shown(e.output_tokens)} {duration} cost={cost}")


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


factory = Factory(kind="exporter", type="debug", config=DebugConfig, create=DebugExporter)
