"""Kill -9 soak: the daemon killed every few seconds under unthrottled load into
ClickHouse, then every FinOps answer compared with the raw events.

    python bench/kill_soak.py --kills 100 --kill-every 1-2 --senders 6

Runs `meterline run` (webhook → clickhouse on embedded chDB + file, persistent
queues, worker processes) in a scratch directory. Sender threads post batches of
unique events as fast as the daemon takes them, each batch again until it is
acknowledged (a send cut by a kill is sent again, as any client would). Meanwhile the
daemon is killed with SIGKILL at random moments and started again. Then the senders
stop, the daemon drains its queues and stops, and the check opens the chDB directory:

- `llm_events` holds every event acknowledged, once (its rows read `FINAL`);
- no hour of any rollup counts differently from the raw events;
- every FinOps report and analytics answer equals the same answer from a database
  that received each stored event once, in one insert.

Prints the figures and exits 1 when a check fails. `tests/test_kill_soak.py` runs a
short one in the suite.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from meterline.config import convert  # noqa: E402
from meterline.exporters.clickhouse.config import ClickHouseConfig  # noqa: E402
from meterline.exporters.clickhouse.connection import open_client  # noqa: E402
from meterline.exporters.clickhouse.query import Reader  # noqa: E402
from meterline.exporters.clickhouse.repair import miscounted_hours  # noqa: E402
from meterline.exporters.clickhouse.schema import FINAL_SETTINGS, Schema, ensure_schema  # noqa: E402
from tests.clickhouse_helpers import every_finops_answer  # noqa: E402

PIPELINE = """
receivers:
  webhook: {{listen: "127.0.0.1:{webhook}"}}
exporters:
  clickhouse:
    endpoint: chdb://{data}/clickhouse
    repair_interval: 0  # what is exact here is exact without the periodic pass
    batch: {{max_size: 2000, timeout: 50ms}}
  file:
    path: {data}/events.jsonl
service:
  data_dir: {data}
  workers: {workers}
  admin: {{listen: "127.0.0.1:{admin}"}}
  pipelines:
    soak: {{receivers: [webhook], exporters: [clickhouse, file]}}
"""


@dataclass
class Soak:
    """What a run did and found."""

    sent: int = 0  # events acknowledged
    kills: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0
    stored: int = 0  # distinct event ids in llm_events
    miscounted_hours: list[int] = field(default_factory=list)
    differing_answers: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (self.stored == self.sent and not self.miscounted_hours
                and not self.differing_answers)


class Daemon:
    def __init__(self, workdir: Path, workers: int) -> None:
        self.webhook, self.admin = _free_port(), _free_port()
        self.config = workdir / "pipeline.yaml"
        self.config.write_text(PIPELINE.format(webhook=self.webhook, admin=self.admin,
                                               data=workdir / "data", workers=workers))
        self.log = open(workdir / "daemon.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meterline", "run", "-c", str(self.config)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self._get("/readyz")[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the daemon did not start:\n{tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def drain_and_stop(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        queued: dict[str, int] = {}
        while True:
            status, body = self._get("/api/v1/status")
            if status == 200:
                queued = {name: q["events"] for name, q in body["exporters"].items()}
                if not any(queued.values()):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the queues did not drain in {timeout:g} s: {queued}")
            time.sleep(0.2)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.log.close()

    def _get(self, path: str) -> tuple[int, Any]:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        except (OSError, ValueError):
            return 0, None


def send(port: int, sender: int, batch: int, stop: threading.Event, acked: list[int]) -> None:
    """Post batches of new events until `stop`; each batch until it is acknowledged."""
    rng = random.Random(sender)
    n = 0
    while not stop.is_set():
        body = json.dumps([_event(rng, f"s{sender}-{n + i}") for i in range(batch)]).encode()
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)  # refused, reset, or 429/503: the daemon is (re)starting
        n += batch
        acked[sender] = n


def _event(rng: random.Random, event_id: str) -> dict[str, Any]:
    """Figures are multiples of powers of two, so that sums are exact in floating point
    whatever the order they are added in: the answers compare exactly."""
    tokens = rng.randint(10, 4000)
    return {"event_id": event_id, "timestamp": time.time_ns(), "provider": "openai",
            "request_model": rng.choice(["gpt-4o", "gpt-4o-mini", "o3-mini"]),
            "user_id": f"u{rng.randint(0, 50)}", "team": rng.choice(["search", "ads"]),
            "api_key_id": f"k{rng.randint(0, 9)}", "status_code": rng.choice([200] * 9 + [429]),
            "input_tokens": tokens, "output_tokens": tokens // 4, "duration_ms": tokens / 8,
            "cost_usd": tokens / 2**20, "actual_cost_usd": tokens * 9 / 2**23,
            "metadata": {"customer": rng.choice(["acme", "globex"])}}


def soak(workdir: Path, kills: int, kill_every: tuple[float, float], senders: int = 4,
         batch: int = 500, workers: int = 2, seed: int = 0) -> Soak:
    """Kill the daemon `kills` times, `kill_every` (low, high) seconds apart at random,
    under load; then drain, stop and check."""
    result = Soak()
    daemon = Daemon(workdir, workers)
    stop = threading.Event()
    acked = [0] * senders
    threads = [threading.Thread(target=send, args=(daemon.webhook, s, batch, stop, acked))
               for s in range(senders)]
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        daemon.start()
        for t in threads:
            t.start()
        for _ in range(kills):
            time.sleep(rng.uniform(*kill_every))
            daemon.kill()
            result.kills += 1
            daemon.start()
        stop.set()
        for t in threads:
            t.join()
        result.seconds = time.monotonic() - started
        result.sent = sum(acked)
        draining = time.monotonic()
        daemon.drain_and_stop()
        result.drain_seconds = time.monotonic() - draining
    finally:
        stop.set()
        daemon.close()
    check(workdir / "data" / "clickhouse", result)
    return result


def check(chdb_dir: Path, result: Soak) -> None:
    """Fill `result` with what the chDB directory holds, against a database that got every
    stored event once."""
    config = convert({"endpoint": f"chdb://{chdb_dir}"}, ClickHouseConfig)
    client = open_client(config, chdb_dir.parent)
    try:
        schema = Schema.of(config)
        events = schema.qualified(schema.events)
        [(result.stored,)] = client.query(f"SELECT count() FROM {schema.deduplicated_events}",
                                          settings=FINAL_SETTINGS).result_rows
        result.miscounted_hours = miscounted_hours(client, schema, since=0)
        reference = Schema.of(convert({"endpoint": f"chdb://{chdb_dir}", "database": "reference"},
                                      ClickHouseConfig))
        for _ in ensure_schema(client, reference):
            pass
        client.command(f"INSERT INTO {reference.qualified(reference.events)} "
                       f"SELECT * FROM {events} FINAL",
                       settings={"max_memory_usage": 4 << 30})  # over the daemon's cap
        now = datetime.now(UTC)
        got = every_finops_answer(Reader(client, schema), now)
        want = every_finops_answer(Reader(client, reference), now)
        result.differing_answers = [name for name in want if got[name] != want[name]]
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--kill-every", default="1-2", help="seconds between kills: LOW-HIGH")
    parser.add_argument("--senders", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    low, _, high = args.kill_every.partition("-")
    with tempfile.TemporaryDirectory(prefix="meterline-soak-") as tmp:
        r = soak(Path(tmp), args.kills, (float(low), float(high or low)), args.senders,
                 args.batch, args.workers)
    print(f"events acknowledged      {r.sent:>12,}")
    print(f"kill -9                  {r.kills:>12}   over {r.seconds:.0f} s")
    print(f"drain after the load     {r.drain_seconds:>12.1f} s")
    print(f"distinct in llm_events   {r.stored:>12,}")
    print(f"miscounted rollup hours  {len(r.miscounted_hours):>12}")
    print(f"answers differing        {len(r.differing_answers):>12}   "
          f"{', '.join(r.differing_answers)}")
    print("EXACT" if r.exact else "NOT EXACT")
    sys.exit(0 if r.exact else 1)


if __name__ == "__main__":
    main()
