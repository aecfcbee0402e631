"""Guardrails' cost on the gateway: the latency a 4 KB prompt gains with every rule on,
and what a 1 MB prompt being checked does to the other streams.

Three processes: the fake upstream (`python -m meterline.gateway.fakeupstream`, a
fixed delay), the daemon (`meterline run`: the `gateway` receiver into a `file`
exporter) and this one, the load: OpenAI chat completions with a 4 KB prompt (prose
without PII, so that every call goes through) from `--clients` kept-alive connections.
The daemon runs four times: without guardrails and with every rule on (all the built-in
detectors, the three prompt-injection sets, a topic list; on input and output), then
both again with one extra client sending 1 MB prompts meanwhile. The CPU per request is
the daemon's from the end of the warm-up, divided by the 4 KB calls answered: in the
rows with 1 MB prompts it includes theirs.

    python bench/guardrails_bench.py
    python bench/guardrails_bench.py --seconds 10 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import (
    GATEWAY_PIPELINE,
    ROOT,
    free_port,
    percentile,
    process_cpu_seconds,
    wait_port,
)
from pipeline_bench import stop_daemon

from meterline.processors.redact.detectors import NAMES

EVERY_RULE = (
    f'[{{name: pii, stage: both, action: redact, detectors: [{", ".join(NAMES)}]}}, '
    '{name: injection, action: block, injection: true}, '
    '{name: topics, stage: both, action: block, topics: [launch codes, nerve agents]}]')

SENTENCE = "The quarterly report shows revenue grew in every region we operate in. "
PROMPT_4K = (SENTENCE * 60)[:4096]
PROMPT_1M = (SENTENCE * 15_000)[:1 << 20]


def body(prompt: str) -> bytes:
    import msgspec
    return msgspec.json.encode({"model": "gpt-4o-mini",
                                "messages": [{"role": "user", "content": prompt}]})


@contextlib.contextmanager
def daemon(upstream: int, rules: str) -> Iterator[tuple[int, int]]:
    """The daemon on a free port: (port, pid)."""
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        config = Path(data) / "pipeline.yaml"
        pipeline = GATEWAY_PIPELINE.format(port=port, upstream=f"http://127.0.0.1:{upstream}",
                                           data=data)
        config.write_text(pipeline.replace("\nexporters:",
                                           f"\n    guardrails: {rules}\nexporters:"))
        log = Path(data) / "daemon.log"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "meterline", "run", "--config",
                                     str(config)], stderr=stderr,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            try:
                wait_port(port, proc)
            except RuntimeError as e:
                said = log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit("\n".join([f"the daemon did not start: {e}", *said])) \
                    from None
            yield port, proc.pid
        finally:
            stop_daemon(proc)


async def measure(port: int, pid: int, clients: int, seconds: float,
                  big: bool) -> tuple[list[float], float, float]:
    """Latencies (ms) of 4 KB calls from `clients` connections, the seconds they took
    and the daemon's CPU seconds meanwhile (both from the end of the warm-up); with
    `big`, one more client sends 1 MB prompts the whole time (its own latencies are not
    counted)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    small, large = body(PROMPT_4K), body(PROMPT_1M)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def call(data: bytes) -> float:
            started = time.perf_counter()
            async with session.post(url, data=data,
                                    headers={"content-type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, r.status
            return (time.perf_counter() - started) * 1000

        async def client() -> None:
            while time.perf_counter() < stop:
                latencies.append(await call(small))

        async def heavy() -> None:
            while time.perf_counter() < stop:
                await call(large)

        for _ in range(20):  # warm up
            await call(small)
        cpu, started = process_cpu_seconds(pid), time.perf_counter()
        stop = started + seconds
        await asyncio.gather(*(client() for _ in range(clients)), *([heavy()] if big else []))
        return (latencies, time.perf_counter() - started, process_cpu_seconds(pid) - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--delay", default="20ms", help="the fake upstream's fixed delay")
    args = parser.parse_args()
    upstream_port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "meterline.gateway.fakeupstream",
                             "--listen", f"127.0.0.1:{upstream_port}", "--latency", args.delay,
                             "--tokens", "20"], stderr=subprocess.DEVNULL)
    try:
        wait_port(upstream_port, fake)
        rows = []
        for name, rules, big in (("no guardrails", "[]", False),
                                 ("every rule on", EVERY_RULE, False),
                                 ("no guardrails, + 1 MB prompts", "[]", True),
                                 ("every rule on, + 1 MB prompts", EVERY_RULE, True)):
            with daemon(upstream_port, rules) as (port, pid):
                latencies, took, cpu = asyncio.run(measure(port, pid, args.clients,
                                                           args.seconds, big))
            rows.append((name, percentile(latencies, 0.5), percentile(latencies, 0.99),
                         len(latencies) / took, cpu * 1e6 / len(latencies)))
    finally:
        fake.terminate()
        fake.wait(30)
    print(f"{args.clients} clients, 4 KB prompts, upstream delay {args.delay}, "
          f"{args.seconds:g} s each")
    print("(+p50/+p99: over the row without guardrails under the same load; µs CPU/req: "
          "the daemon's CPU over the 4 KB calls, 1 MB prompts' included)")
    print(f"{'':32} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>7} {'+p99':>7} {'req/s':>7} "
          f"{'µs CPU/req':>10}")
    for i, (name, p50, p99, rate, cpu) in enumerate(rows):
        base = rows[i - i % 2]  # rows go in pairs: without, then with
        print(f"{name:32} {p50:8.2f} {p99:8.2f} {p50 - base[1]:+7.2f} {p99 - base[2]:+7.2f} "
              f"{rate:7.0f} {cpu:10.0f}")


if __name__ == "__main__":
    main()
