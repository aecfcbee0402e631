"""Gateway overhead: the same load sent directly, through a bare proxy, through the
gateway and through LiteLLM, all pointed at one fake upstream with a fixed delay.

Each target runs in its own process: the fake upstream
(`python -m meterline.gateway.fakeupstream`), the floor (a bare pass-through proxy written
here: httptools, no JSON, no events; the least a Python proxy adds), the gateway
(`meterline run`: the `gateway` receiver into a `file` exporter on a persistent
queue, the whole daemon in one process) and, when installed, the LiteLLM proxy.
This process is the load: OpenAI chat completions at each concurrency, streaming
and not, on kept-alive connections. For each it prints latency p50/p99, the
latency added over going direct, time to first byte of the body (streams), and
requests/s, and for each proxy its CPU time per request (from /proc; none for direct).

    python bench/gateway_bench.py                       # 5 s per scenario
    python bench/gateway_bench.py --seconds 1 --concurrency 1,50
    python bench/gateway_bench.py --litellm /work/wt/litellm-venv/bin/litellm

LiteLLM goes in its own virtual environment: `pip install 'litellm[proxy]==1.100.5'`.
The machine should be otherwise idle; figures from a shared machine are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meterline.gateway.config import UpstreamConfig  # noqa: E402
from meterline.gateway.deadlines import Deadlines  # noqa: E402
from meterline.gateway.upstream import Upstream  # noqa: E402

GATEWAY_PIPELINE = """
receivers:
  gateway:
    listen: 127.0.0.1:{port}
    upstreams:
      fake: {{base_url: "{upstream}", provider: openai, default: true}}
exporters:
  file:
    path: {data}/events.jsonl
service:
  data_dir: {data}
  admin: null
  telemetry: {{logs: {{level: warning}}}}
  pipelines:
    usage: {{receivers: [gateway], exporters: [file]}}
"""

LITELLM_CONFIG = """
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: {upstream}/v1
      api_key: sk-fake
litellm_settings:
  telemetry: false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the floor: a bare pass-through proxy ----------------------------------------------
class _FloorUpstream(asyncio.Protocol):
    def __init__(self, pool: deque[_FloorUpstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.client: _FloorClient | None = None
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.client is not None
        head = b"".join(b"%s: %s\r\n" % h for h in self.headers)
        self.client.head = b"HTTP/1.1 %d OK\r\ntransfer-encoding: chunked\r\n%s\r\n" % (
            self.parser.get_status_code(), head)

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.write(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        assert client is not None
        client.write(b"0\r\n\r\n")
        self.pool.append(self)


class _FloorClient(asyncio.Protocol):
    def __init__(self, host: str, port: int, pool: deque[_FloorUpstream]) -> None:
        self.host, self.port, self.pool = host, port, pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"host", b"content-length", b"connection"):
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        request = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
            self.parser.get_method(), self.url, self.host.encode(), len(body),
            b"".join(self.headers), body)
        asyncio.get_running_loop().create_task(self.forward(request))

    async def forward(self, request: bytes) -> None:
        upstream = self.pool.pop() if self.pool else None
        if upstream is None:
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: _FloorUpstream(self.pool), self.host, self.port)
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(request)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.head:
            data, self.head = self.head + data, b""
        self.transport.write(data)


def serve_floor(listen_port: int, upstream_port: int) -> None:
    async def run() -> None:
        pool: deque[_FloorUpstream] = deque()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _FloorClient("127.0.0.1", upstream_port, pool), "127.0.0.1", listen_port)
        await server.serve_forever()

    asyncio.run(run())


# --- processes -------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.args} did not listen on {port} within {timeout}s")


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants (LiteLLM may fork workers)."""
    total = 0.0
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# --- the load ----------------------------------------------------------------------------
@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0
    cpu: float | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def request_bytes(host: str, stream: bool, model: str) -> bytes:
    body = msgspec.json.encode({
        "model": model, "stream": stream, "max_tokens": 64, "temperature": 0.2,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Summarise the benefits of unit tests."}]})
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
            b"\r\nauthorization: Bearer sk-bench\r\ncontent-length: %d\r\n\r\n%s"
            % (host.encode(), len(body), body))


async def load(target: Target, stream: bool, concurrency: int, seconds: float, warmup: float,
               model: str) -> Result:
    client = Upstream(target.name, msgspec.convert(
        {"base_url": target.url, "max_idle_connections": concurrency * 2}, UpstreamConfig,
        dec_hook=lambda tp, v: tp.from_config(v)), Deadlines())
    data = request_bytes(client.host_header.decode(), stream, model)
    result = Result()
    loop = asyncio.get_running_loop()
    measuring = False
    stop_at = loop.time() + warmup + seconds

    async def one() -> None:
        started = loop.time()
        first: list[float] = []
        try:
            exchange = await client.request(data)
            exchange.attach(lambda _: first.append(loop.time()) if not first else None)
            await exchange.done
        except Exception:
            result.errors += 1
            return
        if not measuring:
            return
        if exchange.status != 200:
            result.errors += 1
            return
        result.latencies.append(loop.time() - started)
        if first:
            result.first_bytes.append(first[0] - started)

    async def worker() -> None:
        while loop.time() < stop_at:
            await one()

    async def switch_on() -> None:
        nonlocal measuring
        await asyncio.sleep(warmup)
        measuring = True
        result.cpu = process_cpu_seconds(target.proc.pid) if target.proc else None
        result.elapsed = loop.time()

    switch = asyncio.create_task(switch_on())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await switch
    result.elapsed = loop.time() - result.elapsed
    if target.proc is not None and result.cpu is not None:
        result.cpu = process_cpu_seconds(target.proc.pid) - result.cpu
    client.close()
    return result


def report(mode: str, concurrency: int, results: dict[str, Result]) -> None:
    direct = results.get("direct")
    print(f"\n{mode}, concurrency {concurrency}")
    print(f"  {'target':<8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
          f"{'ttfb p50':>8} {'ttfb p99':>8} {'req/s':>7} {'cpu ms/req':>10} {'errors':>6}")
    for name, r in results.items():
        n = len(r.latencies)
        p50, p99 = percentile(r.latencies, 0.5) * 1e3, percentile(r.latencies, 0.99) * 1e3
        if direct is not None and name != "direct":
            add50 = p50 - percentile(direct.latencies, 0.5) * 1e3
            add99 = p99 - percentile(direct.latencies, 0.99) * 1e3
            added = f"{add50:8.2f} {add99:8.2f}"
        else:
            added = f"{'':>8} {'':>8}"
        ttfb = (f"{percentile(r.first_bytes, 0.5) * 1e3:8.2f} "
                f"{percentile(r.first_bytes, 0.99) * 1e3:8.2f}") if mode == "stream" else \
            f"{'':>8} {'':>8}"
        cpu = f"{r.cpu * 1e3 / n:10.3f}" if r.cpu is not None and n else f"{'':>10}"
        print(f"  {name:<8} {p50:8.2f} {p99:8.2f} {added} {ttfb} {n / r.elapsed:7.0f} {cpu} "
              f"{r.errors:6d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured, per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured, per scenario")
    parser.add_argument("--concurrency", default="1,50,200")
    parser.add_argument("--modes", default="plain,stream")
    parser.add_argument("--delay", default="20ms", help="the fake upstream's fixed delay")
    parser.add_argument("--tokens", type=int, default=10, help="chunks per stream")
    parser.add_argument("--chunk-delay", default="2ms", help="between stream chunks")
    parser.add_argument("--targets", default="direct,floor,gateway,litellm")
    parser.add_argument("--litellm", default=shutil.which("litellm") or "",
                        help="path of the litellm command (its own venv)")
    parser.add_argument("--serve-floor", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return

    wanted = args.targets.split(",")
    if "litellm" in wanted and not Path(args.litellm or "/nonexistent").exists():
        print("LiteLLM not found (--litellm PATH): left out")
        wanted.remove("litellm")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": open(tmp / "stderr.log", "ab")}  # noqa: SIM115

    def start(cmd: list[str], port: int, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=kwargs.pop("env", env), cwd=tmp, **quiet)  # type: ignore[call-overload]
        procs.append(proc)
        try:
            wait_port(port, proc)
        except RuntimeError as e:  # what it said is in a directory removed on the way out
            said = (tmp / "stderr.log").read_text(errors="replace").splitlines()[-20:]
            raise SystemExit("\n".join([str(e), *said])) from None
        return proc

    try:
        fake_port = free_port()
        start([sys.executable, "-m", "meterline.gateway.fakeupstream", "--listen",
                      f"127.0.0.1:{fake_port}", "--latency", args.delay, "--chunk-delay",
                      args.chunk_delay, "--tokens", str(args.tokens)], fake_port)
        upstream = f"http://127.0.0.1:{fake_port}"
        # direct has no proxy, so no CPU of its own: the fake upstream's is not shown
        targets = {"direct": Target("direct", upstream)}
        if "floor" in wanted:
            port = free_port()
            targets["floor"] = Target("floor", f"http://127.0.0.1:{port}", start(
                [sys.executable, __file__, "--serve-floor", str(port), str(fake_port)], port))
        if "gateway" in wanted:
            port = free_port()
            config = tmp / "pipeline.yaml"
            config.write_text(GATEWAY_PIPELINE.format(port=port, upstream=upstream,
                                                      data=tmp / "data"))
            targets["gateway"] = Target("gateway", f"http://127.0.0.1:{port}", start(
                [sys.executable, "-m", "meterline", "run", "-c", str(config)], port))
        if "litellm" in wanted:
            port = free_port()
            config = tmp / "litellm.yaml"
            config.write_text(LITELLM_CONFIG.format(upstream=upstream))
            targets["litellm"] = Target("litellm", f"http://127.0.0.1:{port}", start(
                [args.litellm, "--config", str(config), "--port", str(port)], port,
                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                     "LITELLM_LOG": "ERROR"}))
        print(f"fake upstream: delay {args.delay}, {args.tokens} chunks {args.chunk_delay} "
              f"apart; {args.seconds:g} s measured per scenario after {args.warmup:g} s")
        for mode in args.modes.split(","):
            for concurrency in map(int, args.concurrency.split(",")):
                results = {name: asyncio.run(load(
                    target, mode == "stream", concurrency, args.seconds, args.warmup,
                    "bench-model")) for name, target in targets.items()
                    if name in wanted or name == "direct"}
                report(mode, concurrency, results)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
