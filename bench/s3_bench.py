"""The `s3` exporter's cost and its archive's size.

Prints events/s for building a batch's Parquet files (CPU seconds of this process: the
exporter's own work), events/s archived end to end into a local moto server (wall time,
uploads included), and the bytes per event of the archive against the file exporter's
JSON lines (plain and zstd-compressed), on chat calls with a short prompt and answer.

    python bench/s3_bench.py --events 100000 --batch 50000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporters_bench import events as metadata_only

from meterline.component import ExportBatch
from meterline.event import Event, to_jsonl
from tests.s3_helpers import moto_server, moto_server_binary, new_bucket, s3_exporter

WORDS = ["export", "warehouse", "schema", "nightly", "timeout", "index", "customer",
         "ticket", "invoice", "refund", "latency", "deploy", "rollback", "cluster", "query",
         "budget", "forecast", "contract", "renewal", "churn", "pipeline", "dashboard",
         "alert", "incident", "review", "summary", "draft", "email", "translate", "code",
         "function", "error", "retry", "token", "model", "cost", "region", "backup"]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def chat_calls(count: int) -> list[Event]:
    """The exporters bench's calls, with a prompt (about 300 bytes) and an answer (about
    150) of words drawn at random, so that they compress as prose does, not as one text
    repeated."""
    rng = random.Random(7)
    return [msgspec.structs.replace(
        e, input_messages=[{"role": "user", "content": text(rng, 40)}],
        output_messages=[{"role": "assistant", "content": text(rng, 20)}],
        finish_reasons=["stop"]) for e in metadata_only(count, 200)]


async def archive(endpoint: str, data: list[Event], batch: int, tmp: Path) -> float:
    sink = s3_exporter(tmp, new_bucket(endpoint), endpoint)
    await sink.start()
    started = time.perf_counter()
    for start in range(0, len(data), batch):
        await sink.export(ExportBatch(f"bench:{start}", data[start:start + batch]))
    elapsed = time.perf_counter() - started
    await sink.shutdown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="chat calls archived")
    parser.add_argument("--batch", type=int, default=50_000, help="events per export")
    args = parser.parse_args()
    if moto_server_binary() is None:
        sys.exit("moto_server not found (beside this Python nor on PATH): "
                 "pip install 'moto[server]'")
    data = chat_calls(args.events)
    with tempfile.TemporaryDirectory(prefix="s3-bench-") as tmpdir, \
            moto_server() as endpoint:
        tmp = Path(tmpdir)
        local = s3_exporter(tmp)
        local.files(ExportBatch("warm-up", data[:1000]))  # the first costs 5x: set-up, once
        started = time.process_time()
        files = [f for s in range(0, len(data), args.batch)
                 for f in local.files(ExportBatch(f"b:{s}", data[s:s + args.batch]))]
        encode = time.process_time() - started
        wall = asyncio.run(archive(endpoint, data, args.batch, tmp))
    parquet = sum(len(d) for _, d in files)
    jsonl = to_jsonl(data)
    zstd = pa.compress(jsonl, codec="zstd", asbytes=True)
    n = len(data)
    print(f"parquet encoding (cpu)        {n / encode:>10,.0f} events/s")
    print(f"archived to moto (wall)       {n / wall:>10,.0f} events/s ({len(files)} objects)")
    print(f"bytes/event: parquet+zstd {parquet / n:,.0f}, jsonl {len(jsonl) / n:,.0f}, "
          f"jsonl+zstd {len(zstd) / n:,.0f}")


if __name__ == "__main__":
    main()
