"""Projections and content policies: the per-event cost they add to an exporter.

Times, on batches of `--batch` realistic chat events (attribution, metadata, a prompt and an
answer), what the file, kafka and http exporters do per batch: `to_jsonl` (no projection:
today's path, unchanged), the same through `meterline.projection.jsonl` with `projection:
null` (must be equal: checked before timing), and with a Datadog-shaped blueprint
(renames, `$at`, `$pointer`, `$path`, `$value`, a nested blueprint and a `$compose`);
then the `content: metadata` and `content: none` policies, which run once per event when
the runner selects it. Prints the median of `--repeat` runs as microseconds per event.

    python bench/projection_bench.py
    python bench/projection_bench.py --batch 5000 --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's meterline

from meterline.content import enforcer
from meterline.event import Event, to_jsonl
from meterline.projection import Projection, jsonl

BLUEPRINT: dict[str, Any] = {
    "event_id": "id",
    "timestamp": True,
    "ddsource": {"$value": "meterline"},
    "service": {"$value": "llm-gateway"},
    "provider": True,
    "model": {"$at": "request_model"},
    "team": {"$at": "metadata.team"},
    "customer": {"$pointer": "/metadata/customer"},
    "first_role": {"$path": "$.input_messages[0].role"},
    "usage": {"input_tokens": True, "output_tokens": True, "cost_usd": True},
    "http": {"$compose": {"status": {"$at": "status_code"}, "route": {"$at": "route"}}},
}


def events(count: int) -> list[Event]:
    return [Event(
        provider="openai", operation="chat", request_model="gpt-4o-mini",
        response_model="gpt-4o-mini-2024-07-18", endpoint="/v1/chat/completions",
        route="default", status_code=200, input_tokens=812 + i % 50, output_tokens=240,
        duration_ms=1234.5, ttft_ms=210.0, cost_usd=0.000265, user_id=f"u{i % 300}",
        api_key_id="0123456789abcdef", team="search", finish_reasons=["stop"],
        metadata={"team": "search", "customer": f"c{i % 40}", "env": "prod"},
        input_messages=[{"role": "system", "content": "You are a helpful assistant. " * 4},
                        {"role": "user", "content": f"Question number {i} about invoices?"}],
        output_messages=[{"role": "assistant", "content": "Here is the answer. " * 10}],
    ) for i in range(count)]


def per_event_us(run: Callable[[], Any], count: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000, help="events per batch")
    parser.add_argument("--repeat", type=int, default=15, help="runs of each measure")
    args = parser.parse_args()
    batch, projection = events(args.batch), Projection(BLUEPRINT)
    metadata, none = enforcer("metadata"), enforcer("none")
    assert metadata is not None and none is not None
    if jsonl(batch, None) != to_jsonl(batch):  # what the docstring promises, checked
        sys.exit("jsonl(events, None) differs from to_jsonl(events): the timings below "
                 "would compare two different outputs")
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("to_jsonl (no projection, today's path)", lambda: to_jsonl(batch)),
        ("jsonl(events, None)", lambda: jsonl(batch, None)),
        ("jsonl(events, {}) (whole event)", lambda: jsonl(batch, Projection({}))),
        ("jsonl with the Datadog-shaped blueprint", lambda: jsonl(batch, projection)),
        ("content: metadata (sizes and sha256)", lambda: metadata(batch)),
        ("content: none", lambda: none(batch)),
    ]
    print(f"{args.batch} events per batch, median of {args.repeat} runs")
    for name, run in cases:
        print(f"  {name:45} {per_event_us(run, args.batch, args.repeat):7.2f} us/event")


if __name__ == "__main__":
    main()
