"""Per-event cost of the Prometheus and OTLP paths, in-process (no network),
measured in CPU seconds of this process.

Prints events/s for: the prometheus exporter's batch update (grouping by label
set, one update per series) and one scrape of what that left, with each set of
`families` (standard, truefoundry, both: the default), OTLP encoding of
events as spans and log records (serialized), and OTLP decoding of spans back
into events (the receiver's work once gRPC has parsed the request).

    python bench/exporters_bench.py --events 100000 --batch 1000 --label-sets 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from prometheus_client.exposition import generate_latest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's meterline

from meterline import logs
from meterline.component import Context
from meterline.config import MetricsConfig
from meterline.event import Event
from meterline.exporters.otlp.encode import to_logs_request, to_traces_request
from meterline.exporters.prometheus.exporter import PrometheusConfig, PrometheusExporter
from meterline.receivers.decoders.otlp import decode_spans
from meterline.telemetry import Telemetry

PROVIDERS = ("openai", "anthropic", "gcp.gemini", "mistral_ai")


def events(count: int, label_sets: int) -> list[Event]:
    """Chat calls spread over `label_sets` (provider, model, status) combinations."""
    out = []
    for i in range(count):
        k = i % label_sets
        out.append(Event(
            event_id=f"bench-{i:012d}", timestamp=1_763_900_000_000_000_000 + i,
            source="gateway", provider=PROVIDERS[k % len(PROVIDERS)], operation="chat",
            request_model=f"model-{k}", streaming=i % 3 == 0, status_code=200 if i % 50 else 429,
            error_type=None if i % 50 else "rate_limit_error", input_tokens=420 + i % 97,
            output_tokens=180, duration_ms=812.4, provider_duration_ms=811.9, overhead_ms=0.5,
            ttft_ms=210.0 if i % 3 == 0 else None, cost_usd=0.00042, api_key_id="k-3f9a1c2b",
            trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", metadata={"customer_id": "acme-42"},
            policies=["load_balanced"] if i % 4 == 0 else None,
            ratelimit_requests_limit=10_000, ratelimit_requests_remaining=9_000 - i % 1000))
    return out


def rate(label: str, count: int, batch: int, run: Callable[[list[Event]], object],
         data: list[Event]) -> None:
    """Events/s by CPU time of this process (steadier than wall time on a busy machine)."""
    started = time.process_time()
    for start in range(0, count, batch):
        run(data[start:start + batch])
    report(label, count, time.process_time() - started)


def report(label: str, count: int, seconds: float) -> None:
    print(f"{label:<52} {count / seconds:>12,.0f} events/s  ({seconds * 1e6 / count:.1f} µs/event)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events timed per path")
    parser.add_argument("--batch", type=int, default=1000, help="events per batch")
    parser.add_argument("--label-sets", type=int, default=200,
                        help="distinct (provider, model, status) combinations")
    args = parser.parse_args()
    logs.configure("warning", "console")
    data = events(args.events, args.label_sets)

    for families in (["standard"], ["truefoundry"], ["standard", "truefoundry"]):
        with tempfile.TemporaryDirectory(prefix="exporters-bench-") as tmp:
            context = Context("prometheus", Path(tmp), Telemetry(MetricsConfig()),
                              logs.get(component="bench"))
            config = PrometheusConfig(families=families)  # type: ignore[arg-type]
            prometheus = PrometheusExporter(config, context)
            name = "+".join(families)
            rate(f"prometheus [{name}]: batch update", args.events, args.batch,
                 prometheus.store.update, data)
            started = time.process_time()
            body = generate_latest(prometheus.snapshot())  # type: ignore[arg-type]
            print(f"{f'prometheus [{name}]: one scrape (CPU)':<52} "
                  f"{(time.process_time() - started) * 1000:>12.1f} ms"
                  f"  ({len(body) / 1e6:.1f} MB, {args.label_sets} label sets)")

    rate("otlp: events -> spans, serialized", args.events, args.batch,
         lambda b: to_traces_request(b).SerializeToString(), data)
    rate("otlp: events -> log records, serialized", args.events, args.batch,
         lambda b: to_logs_request(b).SerializeToString(), data)
    wire = [to_traces_request(data[s:s + args.batch]).SerializeToString()
            for s in range(0, args.events, args.batch)]
    started = time.process_time()
    for body in wire:
        decode_spans(ExportTraceServiceRequest.FromString(body))
    report("otlp: spans (wire) -> events", args.events, time.process_time() - started)


if __name__ == "__main__":
    main()
