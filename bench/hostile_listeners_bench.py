"""Hostile clients against the listeners (issue 13, items 4-6); prints figures.

Each listener runs in its own process (the webhook receiver, the gateway's proxy),
so that its CPU time and resident memory are its own; this process is the attacker
and, beside it, one well-behaved client whose latency is what the attack costs
others.

- bombs: N gzip bodies of 1 GiB of spaces (1 MB each) posted at once to the
  webhook, while a small request (an empty batch, `[]`) is posted every 50 ms: the
  bombs' answers, the slowest small request and what the small ones were answered, the
  listener's CPU time, its RSS before and after and its peak RSS (VmHWM) meanwhile.
- headers: one header name repeated 800 x 65 KB, and 185 MB of headers, sent to the
  gateway: the answer and how long it took, the gateway's RSS after and its peak.
- slow: a connection sending half a request line, then nothing: when it is closed
  (the listeners run with read_timeout 2s here).
- flood: 1,500 connections held open to the webhook (max_connections 1024): how many
  were refused, and whether a held one is still served (an empty batch: 200 expected).

    python bench/hostile_listeners_bench.py            # all, 8 bombs
    python bench/hostile_listeners_bench.py --bombs 48 --only bombs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from meterline import logs
from meterline.component import Context
from meterline.telemetry import Telemetry
from meterline.config import MetricsConfig, convert
from meterline.receivers.webhook import WebhookConfig, WebhookReceiver
from meterline.gateway.config import ProxyConfig
from meterline.gateway.proxy import Proxy

class Sink:
    async def consume(self, events): pass
    async def consume_encoded(self, decode, body, once=None):
        return decode(body).received()
    def refused(self, count, reason): pass

async def main():
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "webhook":
        config = convert({{"listen": f"127.0.0.1:{{port}}", "read_timeout": "2s"}}, WebhookConfig)
        context = Context("webhook", Path("/tmp"), Telemetry(MetricsConfig()),
                          logs.get(component="webhook"))
        await WebhookReceiver(config, context, Sink()).start()
    else:
        config = convert({{"listen": f"127.0.0.1:{{port}}", "read_timeout": "2s", "upstreams":
                          {{"u": {{"base_url": "http://127.0.0.1:9", "default": True}}}}}},
                         ProxyConfig)
        await Proxy(config, lambda _: None, logs.get(component="gateway")).start()
    print("up", flush=True)
    await asyncio.Event().wait()

logs.configure("error")
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SMALL = b"[]"  # an empty batch: the webhook answers 200 (`{}` is no event: 400)


class Listener:
    """A listener in its own process; a context manager that kills it on leaving."""

    def __init__(self, kind: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER.format(root=str(ROOT)), kind,
                                      str(self.port)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"up":
            self.stop()
            raise SystemExit(f"the {kind} listener did not start (exit {self.proc.returncode})")

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _status_mb(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) // 1024
        return 0

    def rss_mb(self) -> int:
        return self._status_mb("VmRSS:")

    def peak_rss_mb(self) -> int:
        """The kernel's peak RSS of the process (VmHWM): what a reading after misses."""
        return self._status_mb("VmHWM:")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def gzip_bomb(gib: int = 1) -> bytes:
    """`gib` GiB of spaces, gzip (about 1 MB per GiB), built from one repeated block."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    return first + repeat * (1024 * gib - 1) + c.flush()


def request(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def exchange(port: int, data: bytes, timeout: float = 120.0) -> tuple[bytes, float]:
    """The status line of the answer (or the error) and the seconds it took."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError) as e:
        line = repr(e).encode()
    finally:
        writer.close()
    return line.strip(), time.monotonic() - start


async def bombs(count: int) -> None:
    with Listener("webhook") as webhook:
        await _bombs(webhook, count)


async def _bombs(webhook: Listener, count: int) -> None:
    bomb = gzip_bomb()
    rss, cpu, peak = webhook.rss_mb(), webhook.cpu_s(), webhook.peak_rss_mb()
    latencies: list[float] = []
    small_answers: set[str] = set()
    done = False

    async def probe() -> None:
        while not done:
            answer, took = await exchange(webhook.port, request("/v1/events", SMALL))
            latencies.append(took)
            small_answers.add(answer.decode())
            await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    start = time.monotonic()
    answers = await asyncio.gather(*[exchange(webhook.port, request(
        "/v1/events", bomb, "Content-Encoding: gzip")) for _ in range(count)])
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.2)
    done = True
    await prober
    print(f"bombs: {count} x {len(bomb) / 1e6:.1f} MB gzip of 1 GiB: answers "
          f"{sorted({a[0].decode() for a in answers})} in {elapsed:.2f}s; webhook CPU "
          f"{webhook.cpu_s() - cpu:.2f}s; RSS {rss} -> {webhook.rss_mb()} MB (peak {peak} -> "
          f"{webhook.peak_rss_mb()} MB); small request latency max "
          f"{max(latencies) * 1000:.0f} ms over {len(latencies)}, answered "
          f"{sorted(small_answers)}")


async def headers() -> None:
    with Listener("gateway") as gateway:
        await _headers(gateway)


async def _headers(gateway: Listener) -> None:
    repeated = [f"x-same: {'v' * 65_000}" for _ in range(800)]
    answer, took = await exchange(gateway.port, request("/v1/chat/completions", b"{}",
                                                        *repeated))
    print(f"headers: one name x 800 x 65 KB -> {answer.decode()} in {took * 1000:.0f} ms")
    huge = [f"x-h{i}: {'v' * 8000}" for i in range(185 * 1000 // 8)]
    rss = gateway.rss_mb()
    answer, took = await exchange(gateway.port, request("/v1/chat/completions", b"{}", *huge))
    print(f"headers: 185 MB of headers -> {answer.decode()} in {took * 1000:.0f} ms; gateway "
          f"RSS {rss} -> {gateway.rss_mb()} MB (peak {gateway.peak_rss_mb()} MB)")


async def slow() -> None:
    for kind in ("webhook", "gateway"):
        with Listener(kind) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"POST /v1/ev")
            start = time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(), 10)
                outcome = (f"closed after {time.monotonic() - start:.2f}s "
                           f"({data[:12].decode()!r})")
            except TimeoutError:
                outcome = "still open after 10 s"
            writer.close()
            print(f"slow: half a request line to the {kind} (read_timeout 2s): {outcome}")


async def flood(count: int = 1500) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 100:
        raise SystemExit(f"flood: {count} connections need more open files than the hard "
                         f"limit ({hard}): raise it (ulimit -Hn) or leave flood out")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        with Listener("webhook") as webhook:
            held = [await asyncio.open_connection("127.0.0.1", webhook.port)
                    for _ in range(count)]
            await asyncio.sleep(0.3)
            refused = 0
            for reader, _ in held:
                try:
                    line = await asyncio.wait_for(reader.readline(), 0.001)
                    refused += line.startswith(b"HTTP/1.1 503")
                except TimeoutError:
                    pass
            reader, writer = next((r, w) for r, w in held if not r.at_eof())
            writer.write(request("/v1/events", SMALL))
            answer = (await asyncio.wait_for(reader.readline(), 5)).strip().decode()
            print(f"flood: {count} connections held to the webhook (max_connections 1024): "
                  f"{refused} answered 503; a held one then served: {answer}")
            for _, w in held:
                w.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bombs", type=int, default=8)
    parser.add_argument("--only", choices=["bombs", "headers", "slow", "flood"])
    args = parser.parse_args()
    if args.only in (None, "bombs"):
        await bombs(args.bombs)
    if args.only in (None, "headers"):
        await headers()
    if args.only in (None, "slow"):
        await slow()
    if args.only in (None, "flood"):
        await flood()


if __name__ == "__main__":
    asyncio.run(main())
