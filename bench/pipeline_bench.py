"""Pipeline throughput: webhook -> filter -> file exporter over a persistent queue.

Starts `meterline run` (this checkout's) as its own process, posts batches of ~1 KB
events from this one, and reports events/s (accepted and exported), the daemon's CPU
seconds per 1,000 events and its peak memory, both from /proc over its process tree: the
filter runs in the daemon's worker processes (`service.workers`, one per core), whose CPU
and memory are the daemon's as much as its main process's.

    python bench/pipeline_bench.py --events 200000 --batch 1000 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent

PIPELINE = """
receivers:
  webhook: {{listen: 127.0.0.1:{port}, max_body_mb: 64}}
processors:
  filter/no-health:
    exclude: [{{endpoint: {{$regex: "^/health.*"}}}}]
exporters:
  file:
    path: {data}/out.jsonl
    batch: {{max_size: {batch}, timeout: 50ms}}
    queue: {{type: persistent, fsync: {fsync}}}
service:
  data_dir: {data}
  admin: {{listen: "127.0.0.1:{admin}"}}
  telemetry: {{logs: {{level: warning}}}}
  pipelines:
    p: {{receivers: [webhook], processors: [filter/no-health], exporters: [file]}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event(i: int) -> dict[str, object]:
    """About 1 KB of JSON, shaped like a real chat call."""
    return {
        "event_id": f"bench-{i:012d}", "timestamp": 1_763_900_000_000_000_000 + i,
        "source": "gateway", "provider": "openai", "operation": "chat",
        "request_model": "gpt-4o-mini", "response_model": "gpt-4o-mini-2024-07-18",
        "streaming": i % 3 == 0, "endpoint": "/v1/chat/completions", "status_code": 200,
        "finish_reasons": ["stop"], "input_tokens": 420 + i % 97, "output_tokens": 180,
        "duration_ms": 812.4, "provider_duration_ms": 811.9, "overhead_ms": 0.5,
        "api_key_id": "k-3f9a1c2b", "team": "payments", "user_id": f"user-{i % 50}",
        "metadata": {"customer_id": f"acme-{i % 20}", "feature": "refund-bot"},
        "params": {"temperature": 0.2, "max_tokens": 512},
        "input_messages": [
            {"role": "system", "content": "You are a helpful assistant for refunds. " * 4},
            {"role": "user", "content": "Can I get a refund for order 1234? " * 5}],
        "output_messages": [{"role": "assistant", "content": "Yes, it is eligible. " * 6}],
    }


def tree_pids(root: int) -> list[int]:
    """`root` and its live descendants (the daemon's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its descendants: utime+stime of each live process, plus
    cutime+cstime (the CPU of children already reaped)."""
    ticks = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> tuple[float, int]:
    """The peak RSS (VmHWM) of `pid` and of each live descendant, summed (an upper bound
    of the tree's peak: each process peaks when it does), and how many processes."""
    pids = tree_pids(pid)
    total = 0
    for p in pids:
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)
    return total / 1024, len(pids)


def start_daemon(config: Path) -> subprocess.Popen[bytes]:
    """`meterline run -c config` of this checkout (not whichever meterline is installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "meterline", "run", "-c", str(config)],
                            cwd=ROOT, env=env)


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


async def send(url: str, bodies: list[bytes], concurrency: int) -> float:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            while True:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        break
                    if r.status != 429:
                        raise RuntimeError(f"webhook answered {r.status}")
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-fsync", action="store_true", help="queue without fsync")
    args = parser.parse_args()

    encoder = msgspec.json.Encoder()
    bodies = [encoder.encode([event(i) for i in range(start, min(start + args.batch,
                                                                  args.events))])
              for start in range(0, args.events, args.batch)]
    size = sum(map(len, bodies)) / args.events
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
        port, admin = free_port(), free_port()
        config = Path(tmp) / "pipeline.yaml"
        config.write_text(PIPELINE.format(port=port, admin=admin, data=tmp, batch=args.batch,
                                          fsync="false" if args.no_fsync else "true"))
        proc = start_daemon(config)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the daemon did not start (its log is above)") \
                            from None
                    time.sleep(0.05)
            cpu0 = proc_cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            accept_s = asyncio.run(send(f"http://127.0.0.1:{port}/v1/events", bodies,
                                        args.concurrency))
            out = Path(tmp) / "out.jsonl"
            deadline = time.monotonic() + max(60.0, args.events / 1000)
            while (written := count_lines(out)) < args.events:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"only {written:,} of {args.events:,} events reached the "
                                     "file" + (f": the daemon exited with {proc.returncode}"
                                               if proc.poll() is not None else " in time"))
                time.sleep(0.02)
            total_s = time.perf_counter() - t0
            cpu = proc_cpu_seconds(proc.pid) - cpu0
            peak, processes = proc_peak_rss_mb(proc.pid)
        finally:
            stop_daemon(proc)
    print(f"events: {args.events}  batch: {args.batch}  event size: {size:.0f} B  "
          f"concurrency: {args.concurrency}  fsync: {not args.no_fsync}")
    queued = "queued, no fsync" if args.no_fsync else "durably queued"
    print(f"{f'accepted ({queued}):':<28}{args.events / accept_s:10,.0f} events/s")
    print(f"exported (in the file):     {args.events / total_s:10,.0f} events/s")
    print(f"daemon CPU:                 {cpu * 1000 / args.events * 1000:10.1f} ms per 1,000 "
          f"events ({cpu:.2f} s in all; {args.events / cpu:,.0f} events per CPU-second; "
          f"its {processes} processes)")
    print(f"daemon peak memory (RSS):   {peak:10.0f} MB (each process's VmHWM, summed over "
          f"{processes})")


if __name__ == "__main__":
    main()
