"""Figures for the shipped default pipeline, each beside a floor measured in the same run.

The other benches measure one piece (a receiver into a file, the bare gateway); this
one runs `pipeline.yaml` as shipped (gateway + webhook + otlp receivers; filter,
labels, cost, redact and sample; ClickHouse on embedded chDB, Prometheus and file
exporters) because that is what users run first and what they will compare. The
bench loads the file and changes only what must change to run beside other things:
ports, paths, the data directory, and the gateway's upstreams (all sent to a local
fake provider). Nothing is sent anywhere but 127.0.0.1; the bench refuses a config
that would.

Scenarios (`--only` picks one):

- `ingest`: the webhook fed ~1.3 KB chat events (a prompt with an e-mail address and
  a phone number in it) in JSON arrays by concurrent clients. Accepted events/s,
  end-to-end events/s (until all exporters have sent everything, read from the
  daemon's self-metrics), CPU per event and memory, beside a bare aiohttp server
  that decodes the same bodies and appends them as JSON lines (no fsync, whereas the
  daemon's persistent queues fsync before answering). It also prints where the
  daemon's CPU went, by thread (`cpu_by_thread`), and the sends each exporter retried,
  and how long a `GET /healthz` (the admin's; the floor's own) waits while the posts go
  on, asked every 10 ms: how long the event loop keeps any other client waiting.
- `otlp`: the same events as OTLP gRPC spans (the project's own encoding: GenAI
  attributes, the prompt in `gen_ai.input.messages`), exported 512 to a request (the
  SDK's batch) by concurrent clients that retry what is pushed back. Accepted and
  end-to-end spans/s, CPU per span and `GET /healthz` while exporting, beside a bare
  gRPC server that parses each request and appends it to a file, with an aiohttp
  `/healthz` on the same event loop.
- `gateway`: chat completions with ~60 KB RAG prompts (PII inside) through the
  gateway receiver, in front of the fake upstream answering in 50 ms; latency direct,
  through a bare pass-through proxy (`bench/gateway_bench.py`'s floor) and through
  the gateway, the latency each adds, and CPU per request. The gateway's CPU counts
  until every event of the run has been exported, not only while the load ran. For
  each proxy, the share of the time its event loop ran and waited for a core
  (`loop_schedule`): on 2 cores shared with the load, the second is most of the
  latency the daemon adds (docs/architecture.md, "Performance notes").
- `big`: small streamed requests through each target, first alone, then while one
  more client sends 1 MB prompts in a loop: does one huge prompt hold up everybody
  else's stream?
- `trickle`: the daemon idle, then fed one event per POST at a few a second (a quiet
  sidecar's life): its CPU in % of a core, by thread, beside the ingest floor's at the
  same rates. Fixed costs, not per-event ones, are what shows here.

The daemon is measured as a process tree (its worker processes included): CPU is
utime+stime of every live process in it plus cutime+cstime (children already
reaped); memory is the sum of the processes' RSS, sampled every 0.2 s for the peak
(shared pages of forked workers count once per process, so the sum overstates),
and the main process's VmHWM.

    python bench/default_pipeline_bench.py                  # a few minutes
    python bench/default_pipeline_bench.py --quick          # well under a minute
    python bench/default_pipeline_bench.py --only gateway --seconds 5

Figures from a shared 2-core machine are noisy: the load generator, the fake
upstream and the daemon compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from gateway_bench import free_port, percentile, wait_port  # noqa: E402
from pipeline_bench import send as post_batches  # noqa: E402
from pipeline_bench import tree_pids  # noqa: E402

from meterline.gateway.config import UpstreamConfig  # noqa: E402
from meterline.gateway.deadlines import Deadlines  # noqa: E402
from meterline.gateway.upstream import Exchange, Upstream  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


# --- the process tree: CPU and memory --------------------------------------------------
def tree_cpu_seconds(root: int) -> float:
    """utime+stime of each live process in the tree, plus cutime+cstime: the CPU of
    children already reaped moves into their parent's cutime, so nothing is lost or
    counted twice when a worker exits between two readings."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def cpu_by_thread(root: int) -> dict[tuple[int, str], float]:
    """CPU seconds of each live thread of the tree, by (thread id, where): "main" or
    "worker", then the thread's name. Python threads are all named `python` (the event
    loop, the exporters' and the queues' threads, and the threads chDB runs part of a
    query on); chDB's own pools have their names (`ThreadPool`, `MergeMutate`...)."""
    out: dict[tuple[int, str], float] = {}
    for pid in tree_pids(root):
        where = "main" if pid == root else "worker"
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
            fields = stat.rsplit(b")", 1)[1].split()
            out[(int(tid), f"{where} {name}")] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def where_cpu_went(before: dict[tuple[int, str], float],
                   after: dict[tuple[int, str], float], events: int) -> str:
    """The CPU of a run by where it was spent, µs per event, largest first (threads
    that ended during the run are missed: their CPU is in the tree total only)."""
    spent: dict[str, float] = {}
    for key, seconds in after.items():
        spent[key[1]] = spent.get(key[1], 0.0) + seconds - before.get(key, 0.0)
    parts = sorted(((s, w) for w, s in spent.items() if s * 1e6 / events >= 0.5), reverse=True)
    return ", ".join(f"{w} {s * 1e6 / events:.0f}" for s, w in parts)


def tree_rss_mb(root: int) -> tuple[float, int]:
    """Summed RSS of the tree (MB) and how many processes it has."""
    pids = tree_pids(root)
    pages = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                pages += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return pages * PAGE / (1 << 20), len(pids)


def tree_rss_kinds_mb(root: int) -> tuple[float, float]:
    """The tree's RSS split (MB): anonymous memory (heaps, the chDB engine's arenas) and
    file-backed pages (mapped code and read-only data: chDB's library has 170 MB of it
    resident once imported, clean pages the kernel can drop and read again)."""
    anon = file = 0
    for pid in tree_pids(root):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("RssAnon:"):
                anon += int(line.split()[1])
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1])
    return anon / 1024, file / 1024


def loop_schedule(pid: int) -> tuple[float, float] | None:
    """Seconds the process's main thread (its event loop) has run, and has waited for a
    core while runnable (Linux schedstat); None where the kernel does not keep them. On a
    machine shared with the load, waiting for a core is most of a proxy's added latency."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def vm_hwm_mb(pid: int) -> float:
    """The kernel's own peak RSS of one process (misses nothing between samples)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class RssSampler:
    """Samples a tree's summed RSS in a thread: worker processes have no common VmHWM."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root, self.interval = root, interval
        self.peak_mb = 0.0
        self.peak_anon_mb = 0.0  # the most anonymous memory seen (see tree_rss_kinds_mb)
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, n = tree_rss_mb(self.root)
            self.peak_mb = max(self.peak_mb, rss)
            self.peak_anon_mb = max(self.peak_anon_mb, tree_rss_kinds_mb(self.root)[0])
            self.most_processes = max(self.most_processes, n)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- processes we start, and their cleanup ----------------------------------------------
class Processes:
    """Every process the bench starts, so that all are ended on any exit (Ctrl-C too).

    Each runs in its own session: a Ctrl-C reaches only the bench, which then stops
    them in order (a daemon's SIGTERM path drains its queues) rather than all at once.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.running.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20) -> None:
        """SIGTERM, then SIGKILL after `grace`; then the rest of its process group, by
        its id (the group is the one we created for it), for workers left behind."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


# --- the config: the shipped file with local ports and paths ------------------------------
_URL_HOST = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/:\s\"'@]+)", re.IGNORECASE)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_local(config: dict[str, Any]) -> None:
    """Refuse to run a config that could send anything off this machine (a component
    added to the shipped file later, with an address the bench does not rewrite)."""
    for text in _strings(config):
        if "${env:" in text:
            raise SystemExit(f"the bench config still reads the environment: {text!r}")
        for host in _URL_HOST.findall(text):
            if host not in LOCAL_HOSTS:
                raise SystemExit(f"the bench config points off this machine: {text!r}")


@dataclass
class Layout:
    """Where the bench's copy of the default pipeline listens and writes."""

    config: dict[str, Any]
    gateway_port: int
    webhook_port: int
    webhook_path: str
    otlp_grpc_port: int
    admin_port: int
    exporters: list[str]


def bench_config(shipped: dict[str, Any], workdir: Path, upstream_url: str) -> Layout:
    """The shipped pipeline with ports, paths, data_dir and upstreams rewritten, and
    nothing else: the processors, exporters and their defaults are what is measured."""
    config = copy.deepcopy(shipped)
    data = workdir / "data"
    for section in ("receivers", "exporters", "extensions"):
        components = config.get(section) or {}
        for name in list(components):
            block = components[name]
            if block is None:
                block = components[name] = {}
            for key in ("listen", "grpc", "http"):
                if block.get(key):
                    block[key] = f"127.0.0.1:{free_port()}"
            for upstream in (block.get("upstreams") or {}).values():
                upstream["base_url"] = upstream_url
            if section == "exporters":
                if block.get("path"):
                    block["path"] = str(data / Path(block["path"]).name)
                endpoint = block.get("endpoint")
                if isinstance(endpoint, str) and endpoint.startswith("chdb://"):
                    block["endpoint"] = f"chdb://{data / 'clickhouse'}"
    service = config.setdefault("service", {})
    service["data_dir"] = str(data)
    admin = service.get("admin") or {}
    admin["listen"] = f"127.0.0.1:{free_port()}"
    service["admin"] = admin
    assert_local(config)
    receivers = config.get("receivers") or {}
    if not {"gateway", "webhook", "otlp"} <= set(receivers):
        raise SystemExit("the shipped pipeline no longer has the gateway, webhook and otlp "
                         "receivers")

    def port(listen: str) -> int:
        return int(listen.rsplit(":", 1)[1])

    return Layout(config=config, gateway_port=port(receivers["gateway"]["listen"]),
                  webhook_port=port(receivers["webhook"]["listen"]),
                  webhook_path=receivers["webhook"].get("path", "/v1/events"),
                  otlp_grpc_port=port(receivers["otlp"]["grpc"]),
                  admin_port=port(admin["listen"]), exporters=list(config.get("exporters") or {}))


# --- the daemon ------------------------------------------------------------------------
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


_DONE = ("meterline_exporter_sent_events_total", "meterline_exporter_send_failed_events_total",
         "meterline_exporter_dropped_events_total", "meterline_exporter_filtered_events_total")


class Daemon:
    """`meterline run -c FILE` on the bench's copy of the default pipeline."""

    def __init__(self, procs: Processes, shipped: dict[str, Any], workdir: Path,
                 upstream_url: str, name: str) -> None:
        self.procs, self.name, self.workdir = procs, name, workdir
        workdir.mkdir(parents=True)
        self.layout = bench_config(shipped, workdir, upstream_url)
        self.config_path = workdir / "pipeline.yaml"
        self.config_path.write_text(yaml.safe_dump(self.layout.config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180) -> None:
        """Start and wait for /readyz: chDB and the persistent queues open before that."""
        self.proc = self.procs.start(self.name, [sys.executable, "-m", "meterline", "run", "-c",
                                                 str(self.config_path)], self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {self.proc.returncode}:\n"
                                 f"{self.procs.log_tail(self.name)}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(self._admin("/readyz"), timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise SystemExit(f"the daemon was not ready in {timeout:.0f} s:\n"
                         f"{self.procs.log_tail(self.name)}")

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)

    def _admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.layout.admin_port}{path}"

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self._admin("/metrics"), timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def wait_delivered(self, before: Metrics, receiver: str, produced: int, t0: float,
                       timeout: float, exact: bool = True) -> dict[str, float | None]:
        """Seconds from `t0` until each exporter had dealt with (sent, or given up on)
        every event of the run; None for an exporter that had not within `timeout`.

        Done means: the receiver has accepted or refused `produced` events (or, unless
        `exact`, its count has not moved for 3 s: a gateway may record a request the
        client gave up on differently), and each exporter's
        sent+failed+dropped+filtered count has grown by what all receivers accepted
        minus what processors dropped."""
        finished: dict[str, float | None] = dict.fromkeys(self.layout.exporters)
        deadline = time.monotonic() + timeout
        last_made, moved_at = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            now = self.metrics()
            made = (delta(now, before, "meterline_receiver_accepted_events_total",
                          receiver=receiver)
                    + delta(now, before, "meterline_receiver_refused_events_total",
                            receiver=receiver))
            if made != last_made:
                last_made, moved_at = made, time.monotonic()
            kept = (delta(now, before, "meterline_receiver_accepted_events_total")
                    - delta(now, before, "meterline_processor_dropped_events_total"))
            if made >= produced or (not exact and made and time.monotonic() - moved_at > 3):
                for exporter, at in finished.items():
                    dealt = sum(delta(now, before, name, exporter=exporter) for name in _DONE)
                    if at is None and dealt >= kept:
                        finished[exporter] = time.perf_counter() - t0
            if all(v is not None for v in finished.values()):
                break
            time.sleep(0.1)
        return finished


# --- payloads ---------------------------------------------------------------------------
_VOCABULARY = ("the invoice refund policy customer order shipment warehouse contract clause "
               "renewal discount account billing period premium support ticket escalation "
               "delivery delay tracking number region europe pricing tier annual monthly usage "
               "quota limit report quarter revenue forecast churn retention onboarding manager "
               "team request approval budget vendor supplier payment terms net thirty days "
               "compliance audit data retention privacy notice section paragraph")
_WORDS = _VOCABULARY.split()
_FIRST = ("alice", "bob", "chloe", "diego", "emma", "farid", "grace", "hugo", "ines", "jonas")
_LAST = ("martin", "schmidt", "rossi", "garcia", "nowak", "dubois", "jensen", "silva")


def pii_sentence(rng: random.Random) -> str:
    """A sentence with an e-mail address and a phone number: what `redact` must find."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return (f"Contact {first.title()} {last.title()} at {first}.{last}{rng.randint(1, 999)}"
            f"@example.com or +44 20 7946 {rng.randint(0, 9999):04d}.")


def prose(size: int, rng: random.Random, pii_every: int = 0) -> str:
    """About `size` bytes of sentences; every `pii_every`-th one carries PII."""
    parts: list[str] = []
    length = n = 0
    while length < size:
        n += 1
        if pii_every and n % pii_every == 0:
            sentence = pii_sentence(rng)
        else:
            words = rng.choices(_WORDS, k=rng.randint(8, 20))
            sentence = " ".join(words).capitalize() + "."
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:size]


_MODELS = (("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", 6),
           ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929", 3),
           ("mistral_ai", "mistral-small", "mistral-small-2503", 1))
_TEAMS = ("payments", "search", "support", "growth", "risk")
_FEATURES = ("refund-bot", "search-summary", "ticket-triage", "email-draft")


def ingest_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """~1.3 KB meterline events: a ~700-byte prompt with an e-mail address and a phone
    number, a ~250-byte answer, realistic models, tokens, users, teams and metadata.
    Texts come from a pool, with per-event PII, so no two prompts are the same."""
    rng = random.Random(seed)
    openings = [prose(520, rng) for _ in range(64)]
    answers = [prose(250, rng) for _ in range(64)]
    weighted = [m for m in _MODELS for _ in range(m[3])]
    base = time.time_ns() - count * 10_000_000
    events = []
    for i in range(count):
        provider, model, response_model, _ = weighted[i % len(weighted)]
        user = f"user-{rng.randint(1, 400)}"
        status = 200 if i % 97 else (429 if i % 2 else 500)
        events.append({
            "event_id": f"bench-{i:012d}", "timestamp": base + i * 10_000_000,
            "provider": provider, "operation": "chat", "request_model": model,
            "response_model": response_model, "streaming": i % 3 == 0,
            "endpoint": "/v1/chat/completions", "status_code": status,
            "finish_reasons": ["stop"] if status == 200 else [],
            "input_tokens": rng.randint(150, 220), "output_tokens": rng.randint(40, 80),
            "duration_ms": round(rng.uniform(300, 2500), 1),
            "api_key_id": f"k-{i % 12:04x}", "team": _TEAMS[i % len(_TEAMS)], "user_id": user,
            "metadata": {"customer_id": f"acme-{i % 50}", "feature": _FEATURES[i % 4]},
            "input_messages": [{"role": "user", "content": (
                f"{openings[i % 64]} {pii_sentence(rng)} What should I do next?")}],
            "output_messages": [{"role": "assistant", "content": answers[(i * 7) % 64]}],
        })
    return events


def chat_request(host: str, body: dict[str, Any]) -> bytes:
    """A whole HTTP/1.1 request, built once: the load costs the least per request."""
    payload = msgspec.json.encode(body)
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
            b"\r\nauthorization: Bearer sk-bench\r\nx-meterline-user: bench-user\r\n"
            b"content-length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))


def rag_body(size: int, seed: int, stream: bool = False) -> dict[str, Any]:
    """A retrieval-augmented prompt: `size` bytes of context documents with some PII."""
    rng = random.Random(seed)
    docs = "\n\n".join(f"[doc {d}] {prose(4000, rng, pii_every=9)}"
                       for d in range(max(1, size // 4000)))
    body: dict[str, Any] = {
        "model": "gpt-4o-mini", "max_tokens": 256, "temperature": 0.1, "stream": stream,
        "messages": [
            {"role": "system", "content": "Answer from the context only; cite the doc."},
            {"role": "user", "content": f"Context:\n{docs[:size]}\n\nQuestion: which refund "
                                        "terms apply to the contract renewal?"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# --- the load --------------------------------------------------------------------------
@dataclass
class Load:
    """What one run of concurrent clients saw."""

    latencies: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0  # requests started, warm-up included: each makes one gateway event
    elapsed: float = 0.0
    big_latencies: list[float] = field(default_factory=list)
    big_errors: int = 0
    big_sent: int = 0


def _client(url: str, connections: int) -> Upstream:
    """The gateway's own HTTP client as the load generator: a few dozen µs per request,
    so that the 2 cores go to what is measured rather than to the clients."""
    config = msgspec.convert({"base_url": url, "max_idle_connections": connections},
                             UpstreamConfig, dec_hook=lambda tp, v: tp.from_config(v))
    return Upstream("bench", config, Deadlines())


async def drive(url: str, requests: list[bytes], concurrency: int, seconds: float,
                warmup: float, big: list[bytes] | None = None,
                on_measure: Callable[[], None] | None = None,
                timeout: float = 60) -> Load:
    """`concurrency` clients in a closed loop for warmup+seconds, plus one client
    sending `big` requests when given. Every request is bounded by `timeout`."""
    loop = asyncio.get_running_loop()
    result = Load()
    measuring = False
    started_at = 0.0
    stop_at = loop.time() + warmup + seconds

    async def one(client: Upstream, data: bytes, is_big: bool) -> None:
        started = loop.time()
        first: list[float] = []
        exchange: Exchange | None = None

        def sink(_: bytes) -> None:
            if not first:
                first.append(loop.time())

        try:
            exchange = await asyncio.wait_for(client.request(data), timeout)
            exchange.attach(sink)
            await asyncio.wait_for(exchange.done, max(0.1, started + timeout - loop.time()))
            ok = exchange.status == 200
        except Exception:
            if exchange is not None:
                exchange.abort()
            ok = False
        if not measuring:
            return
        if not ok:
            if is_big:
                result.big_errors += 1
            else:
                result.errors += 1
            return
        (result.big_latencies if is_big else result.latencies).append(loop.time() - started)
        if first and not is_big:
            result.first_bytes.append(first[0] - started)

    async def worker(client: Upstream, pool: list[bytes], offset: int, is_big: bool) -> None:
        i = offset
        while loop.time() < stop_at:
            if is_big:
                result.big_sent += 1
            else:
                result.sent += 1
            await one(client, pool[i % len(pool)], is_big)
            i += 1

    async def switch_on() -> None:
        nonlocal measuring, started_at
        await asyncio.sleep(warmup)
        if on_measure is not None:
            on_measure()
        measuring, started_at = True, loop.time()

    clients = [_client(url, concurrency * 2)]
    workers = [worker(clients[0], requests, n, False) for n in range(concurrency)]
    if big:
        clients.append(_client(url, 2))
        workers.append(worker(clients[1], big, 0, True))
    switch = asyncio.create_task(switch_on())
    try:
        await asyncio.gather(*workers)
        await switch
    finally:
        switch.cancel()
        for client in clients:
            client.close()
    result.elapsed = loop.time() - started_at
    return result


# --- reporting -------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    figure: str
    pipeline: str
    floor: str = ""
    ratio: str = ""


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1e3


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    """a / b, left empty when it would mean nothing (a missing or non-positive figure)."""
    return f"{a / b:.2f}" if a is not None and b is not None and a > 0 and b > 0 else ""


def print_table(rows: list[Row]) -> None:
    heads = ("scenario", "figure", "default pipeline", "floor", "pipeline/floor")
    cells = [heads, *((r.scenario, r.figure, r.pipeline, r.floor, r.ratio) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    print()
    for n, c in enumerate(cells):
        print("  ".join(c[i].ljust(widths[i]) if i < 2 else c[i].rjust(widths[i])
                        for i in range(5)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# --- scenario 1: ingest ----------------------------------------------------------------
async def probing(sending: Coroutine[Any, Any, float], url: str,
                  every: float = 0.01) -> tuple[float, list[float]]:
    """`sending`'s result, and the latencies (s) of a GET of `url` every `every` seconds
    while it ran: how long the server's event loop keeps a client waiting under that load
    (a loop busy decoding a body answers nobody meanwhile)."""
    task = asyncio.ensure_future(sending)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not task.done():
            start = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            latencies.append(time.perf_counter() - start)
            await asyncio.wait([task], timeout=every)
    return task.result(), latencies


def serve_ingest_floor(port: int, out: str) -> None:
    """The floor for ingest: decode each JSON array, append its events as JSON lines,
    answer. What any receiver must do at least, and nothing of what a pipeline adds."""
    from aiohttp import web

    decoder, encoder = msgspec.json.Decoder(), msgspec.json.Encoder()

    async def run() -> None:
        with open(out, "ab") as sink:
            async def events(request: web.Request) -> web.Response:
                batch = decoder.decode(await request.read())
                sink.write(encoder.encode_lines(batch))
                sink.flush()
                return web.json_response({"accepted": len(batch), "rejected": []})

            app = web.Application(client_max_size=256 << 20)
            app.router.add_post("/v1/events", events)
            await serve_until_stopped(app, port)

    asyncio.run(run())


async def serve_until_stopped(app: aiohttp.web.Application, port: int) -> None:
    """A floor's HTTP side, with its `GET /healthz`, until SIGTERM or SIGINT."""
    from aiohttp import web

    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def idle_rss(pid: int, settle: float) -> float:
    """RSS after start, once start-up work (chDB, first GC) has settled."""
    time.sleep(settle)
    return tree_rss_mb(pid)[0]


def idle_kinds(pid: int) -> str:
    anon, file = tree_rss_kinds_mb(pid)
    return f"anonymous {anon:.0f} MB, file-backed {file:.0f} MB"


@dataclass
class Measures:
    """What a load run gives, in seconds: until every item was accepted, until every
    exporter had sent them (None: not within the time allowed), the process tree's CPU;
    and the latencies of `GET /healthz` asked meanwhile."""

    accepted_s: float
    delivered_s: float | None
    cpu_s: float
    health: list[float]


def rate_rows(scenario: str, item: str, doing: str, n: int, daemon: Measures,
              floor: Measures) -> list[Row]:
    """The rates, the CPU per item and `/healthz`'s wait of a run of `n` items (events or
    spans), the daemon's beside the floor's."""
    acc, facc = n / daemon.accepted_s, n / floor.accepted_s
    e2e = n / daemon.delivered_s if daemon.delivered_s else None
    fe2e = n / floor.delivered_s if floor.delivered_s else None
    us, fus = daemon.cpu_s / n * 1e6, floor.cpu_s / n * 1e6

    def waits(m: Measures) -> str:
        return f"{ms(m.health, 0.5):.1f}/{ms(m.health, 0.99):.1f}"

    return [
        Row(scenario, f"accepted {item}s/s", fmt(acc), fmt(facc), ratio(acc, facc)),
        Row(scenario, f"end-to-end {item}s/s (all exporters)", fmt(e2e), fmt(fe2e),
            ratio(e2e, fe2e)),
        Row(scenario, f"CPU us/{item} (process tree)", fmt(us), fmt(fus), ratio(us, fus)),
        Row(scenario, f"GET /healthz while {doing}, p50/p99 ms", waits(daemon), waits(floor),
            ""),
    ]


def scenario_ingest(args: argparse.Namespace, procs: Processes, shipped: dict[str, Any],
                    tmp: Path) -> list[Row]:
    events = ingest_events(args.events)
    encoder = msgspec.json.Encoder()
    bodies = [encoder.encode(events[i:i + args.batch]) for i in range(0, len(events), args.batch)]
    size = sum(map(len, bodies)) / len(events)
    del events
    print(f"\n== ingest: {args.events:,} events of {size:,.0f} B in batches of {args.batch}, "
          f"{args.concurrency} clients")

    daemon = Daemon(procs, shipped, tmp / "ingest", "http://127.0.0.1:9", "daemon-ingest")
    daemon.start()
    try:
        idle = idle_rss(daemon.pid, args.settle)
        idle_split = idle_kinds(daemon.pid)
        url = f"http://127.0.0.1:{daemon.layout.webhook_port}{daemon.layout.webhook_path}"
        before = daemon.metrics()
        cpu0 = tree_cpu_seconds(daemon.pid)
        threads0 = cpu_by_thread(daemon.pid)
        with RssSampler(daemon.pid) as rss:
            t0 = time.perf_counter()
            # Polled while the posts go on, so that an exporter done as soon as the
            # last post is answered shows as such.
            with ThreadPoolExecutor(1) as poller:
                waiting = poller.submit(daemon.wait_delivered, before, "webhook", args.events,
                                        t0, max(120.0, args.events / 100))
                accept_s, health = asyncio.run(probing(
                    post_batches(url, bodies, args.concurrency),
                    f"http://127.0.0.1:{daemon.layout.admin_port}/healthz"))
                done = waiting.result()
            cpu = tree_cpu_seconds(daemon.pid) - cpu0
            threads = where_cpu_went(threads0, cpu_by_thread(daemon.pid), args.events)
        hwm = vm_hwm_mb(daemon.pid)
        after = daemon.metrics()
    finally:
        daemon.stop()
    finished = [v for v in done.values() if v is not None]
    end_to_end = max(finished) if len(finished) == len(done) else None
    for exporter, at in done.items():
        # A retried send is a failure the run hid: it should be 0 here.
        retries = delta(after, before, "meterline_exporter_retries_total", exporter=exporter)
        print(f"  {exporter:<12} sent everything after {fmt(at, '.2f')} s; "
              f"{retries:.0f} send(s) retried")
    print(f"  daemon: accepted in {accept_s:.2f} s; CPU {cpu:.2f} s; peak RSS "
          f"{rss.peak_mb:.0f} MB over {rss.most_processes} process(es) (anonymous at most "
          f"{rss.peak_anon_mb:.0f} MB); main VmHWM "
          f"{hwm:.0f} MB; idle {idle:.0f} MB ({idle_split})")
    print(f"  daemon CPU by thread, us/event: {threads}")

    floor_dir = tmp / "ingest-floor"
    floor_dir.mkdir()
    port, out = free_port(), floor_dir / "events.jsonl"
    floor = procs.start("floor-ingest", [sys.executable, __file__, "--serve-ingest-floor",
                                         str(port), str(out)], floor_dir)
    try:
        wait_port(port, floor)
        floor_idle = idle_rss(floor.pid, 0.5)
        fcpu0 = tree_cpu_seconds(floor.pid)
        with RssSampler(floor.pid) as floor_rss:
            t0 = time.perf_counter()
            floor_accept_s, floor_health = asyncio.run(probing(
                post_batches(f"http://127.0.0.1:{port}/v1/events", bodies, args.concurrency),
                f"http://127.0.0.1:{port}/healthz"))
            written = count_lines(out)
            floor_total_s = time.perf_counter() - t0
            fcpu = tree_cpu_seconds(floor.pid) - fcpu0
        floor_hwm = vm_hwm_mb(floor.pid)
    finally:
        procs.stop(floor)
    print(f"  floor: {written:,} lines in {floor_total_s:.2f} s; CPU {fcpu:.2f} s")

    n = args.events
    return [
        *rate_rows("ingest", "event", "posting", n, Measures(accept_s, end_to_end, cpu, health),
                   # (the floor's rate end to end is the lines it wrote, by the time it took)
                   Measures(floor_accept_s, floor_total_s * n / written if written else None,
                            fcpu, floor_health)),
        Row("ingest", "peak RSS MB (tree sum)", fmt(rss.peak_mb), fmt(floor_rss.peak_mb),
            ratio(rss.peak_mb, floor_rss.peak_mb)),
        Row("ingest", "main process VmHWM MB", fmt(hwm), fmt(floor_hwm), ratio(hwm, floor_hwm)),
        Row("ingest", "idle RSS MB (tree sum)", fmt(idle), fmt(floor_idle),
            ratio(idle, floor_idle)),
    ]


# --- scenario: OTLP spans -----------------------------------------------------------------
_EXPORT_TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRIED = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")


def otlp_bodies(count: int, batch: int) -> list[bytes]:
    """`ingest_events` as `ExportTraceServiceRequest`s of `batch` spans, serialized."""
    from meterline.event import from_dict
    from meterline.exporters.otlp.encode import to_traces_request

    events = [from_dict(e) for e in ingest_events(count)]
    return [to_traces_request(events[i:i + batch]).SerializeToString()
            for i in range(0, count, batch)]


async def export_spans(target: str, bodies: list[bytes], concurrency: int) -> float:
    """Each body exported once by `concurrency` gRPC clients, a request pushed back sent
    again after 50 ms (as the SDK's exporter retries); seconds until all were taken."""
    import grpc

    pending = iter(bodies)
    async with grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        export = channel.unary_unary(_EXPORT_TRACES)

        async def client() -> None:
            for body in pending:
                while True:
                    try:
                        await export(body)
                        break
                    except grpc.aio.AioRpcError as e:
                        if e.code().name not in _RETRIED:
                            raise
                        await asyncio.sleep(0.05)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start


def serve_otlp_floor(grpc_port: int, http_port: int, out: str) -> None:
    """The floor for OTLP: parse each request, append it to a file, answer; `GET
    /healthz` served on the same event loop."""
    import grpc
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

    async def run() -> None:
        with open(out, "ab") as sink:
            async def export(body: bytes, _: Any) -> bytes:
                request = pb.ExportTraceServiceRequest.FromString(body)
                spans = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                sink.write(f"{spans}\n".encode() + body)
                sink.flush()
                return pb.ExportTraceServiceResponse().SerializeToString()

            server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                {"Export": grpc.unary_unary_rpc_method_handler(export)})])
            server.add_insecure_port(f"127.0.0.1:{grpc_port}")
            await server.start()
            await serve_until_stopped(web.Application(), http_port)
            await server.stop(None)

    asyncio.run(run())


def scenario_otlp(args: argparse.Namespace, procs: Processes, shipped: dict[str, Any],
                  tmp: Path) -> list[Row]:
    bodies = otlp_bodies(args.events, args.spans_per_request)
    size = sum(map(len, bodies)) / args.events
    print(f"\n== otlp: {args.events:,} spans of {size:,.0f} B, {args.spans_per_request} to a "
          f"gRPC request, {args.concurrency} clients")
    daemon = Daemon(procs, shipped, tmp / "otlp", "http://127.0.0.1:9", "daemon-otlp")
    daemon.start()
    try:
        target = f"127.0.0.1:{daemon.layout.otlp_grpc_port}"
        before = daemon.metrics()
        cpu0 = tree_cpu_seconds(daemon.pid)
        threads0 = cpu_by_thread(daemon.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(1) as poller:
            waiting = poller.submit(daemon.wait_delivered, before, "otlp", args.events, t0,
                                    max(120.0, args.events / 100))
            accept_s, health = asyncio.run(probing(
                export_spans(target, bodies, args.concurrency),
                f"http://127.0.0.1:{daemon.layout.admin_port}/healthz"))
            done = waiting.result()
        cpu = tree_cpu_seconds(daemon.pid) - cpu0
        threads = where_cpu_went(threads0, cpu_by_thread(daemon.pid), args.events)
    finally:
        daemon.stop()
    finished = [v for v in done.values() if v is not None]
    end_to_end = max(finished) if len(finished) == len(done) else None
    print(f"  daemon: accepted in {accept_s:.2f} s; CPU {cpu:.2f} s; everything sent after "
          f"{fmt(end_to_end, '.2f')} s")
    print(f"  daemon CPU by thread, us/span: {threads}")

    floor_dir = tmp / "otlp-floor"
    floor_dir.mkdir()
    grpc_port, http_port, out = free_port(), free_port(), floor_dir / "requests.bin"
    floor = procs.start("floor-otlp", [sys.executable, __file__, "--serve-otlp-floor",
                                       str(grpc_port), str(http_port), str(out)], floor_dir)
    try:
        wait_port(http_port, floor)
        fcpu0 = tree_cpu_seconds(floor.pid)
        floor_s, floor_health = asyncio.run(probing(
            export_spans(f"127.0.0.1:{grpc_port}", bodies, args.concurrency),
            f"http://127.0.0.1:{http_port}/healthz"))
        fcpu = tree_cpu_seconds(floor.pid) - fcpu0
    finally:
        procs.stop(floor)

    return rate_rows("otlp", "span", "exporting", args.events,
                     Measures(accept_s, end_to_end, cpu, health),
                     Measures(floor_s, floor_s, fcpu, floor_health))


# --- scenario 4: a trickle ------------------------------------------------------------
def post_steadily(url: str, bodies: list[bytes], rate: float, seconds: float) -> int:
    """POST one body after another at `rate` a second for `seconds` (none when the rate is
    0: the daemon idles); how many were posted."""
    started, sent = time.monotonic(), 0
    while rate and time.monotonic() - started < seconds:
        request = urllib.request.Request(url, bodies[sent % len(bodies)],
                                         {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
        sent += 1
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    time.sleep(max(0.0, started + seconds - time.monotonic()))
    return sent


def trickle_share(pid: int, url: str, bodies: list[bytes], rate: float,
                  seconds: float) -> tuple[float, str]:
    """The process tree's CPU, in % of a core, while `rate` single events a second come in,
    and where it went (ms a second, by thread)."""
    cpu0, threads0 = tree_cpu_seconds(pid), cpu_by_thread(pid)
    post_steadily(url, bodies, rate, seconds)
    went = where_cpu_went(threads0, cpu_by_thread(pid), int(seconds * 1000))
    return (tree_cpu_seconds(pid) - cpu0) / seconds * 100, went


def scenario_trickle(args: argparse.Namespace, procs: Processes, shipped: dict[str, Any],
                     tmp: Path) -> list[Row]:
    """What the daemon costs when little happens: one event per POST at a few a second, as
    a quiet gateway's sidecar sees them. Fixed costs (an embedded insert per batch timeout,
    a worker round trip and three durable queue writes per request) dominate here."""
    rates = [0.0, *args.trickle_rates]
    print(f"\n== trickle: one event per POST at {', '.join(f'{r:g}' for r in rates)} "
          f"events/s, {args.trickle_seconds:g} s each")
    encoder = msgspec.json.Encoder()
    bodies = [encoder.encode([e]) for e in ingest_events(1000, seed=11)]
    daemon = Daemon(procs, shipped, tmp / "trickle", "http://127.0.0.1:9", "daemon-trickle")
    daemon.start()
    try:
        time.sleep(args.settle)
        url = f"http://127.0.0.1:{daemon.layout.webhook_port}{daemon.layout.webhook_path}"
        daemon_shares = []
        for rate in rates:
            share, went = trickle_share(daemon.pid, url, bodies, rate, args.trickle_seconds)
            daemon_shares.append(share)
            print(f"  daemon at {rate:g}/s: {share:.1f}% of a core; by thread, ms a second: "
                  f"{went}")
    finally:
        daemon.stop()
    floor_dir = tmp / "trickle-floor"
    floor_dir.mkdir()
    port = free_port()
    floor = procs.start("floor-trickle", [sys.executable, __file__, "--serve-ingest-floor",
                                          str(port), str(floor_dir / "events.jsonl")], floor_dir)
    try:
        wait_port(port, floor)
        floor_shares = [trickle_share(floor.pid, f"http://127.0.0.1:{port}/v1/events", bodies,
                                      rate, args.trickle_seconds)[0] for rate in rates]
    finally:
        procs.stop(floor)
    return [Row("trickle", f"CPU % of a core at {rate:g} events/s" if rate else
                "CPU % of a core, idle", f"{share:.1f}", f"{floor_share:.1f}",
                ratio(share, floor_share))
            for rate, share, floor_share in zip(rates, daemon_shares, floor_shares, strict=True)]


# --- scenarios 2 and 3: the gateway ----------------------------------------------------
@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the process whose CPU is measured; None for direct


@dataclass
class Measured:
    load: Load
    cpu_window: float | None = None  # while the load ran
    cpu_all: float | None = None  # gateway: warm-up, load and drain until exported
    drained_s: float | None = None
    dropped: float = 0.0
    peak_mb: float | None = None
    loop: tuple[float, float] | None = None  # share of the window its loop ran, waited


class Proxies:
    """The fake upstream and the floor proxy, started once for both gateway scenarios."""

    def __init__(self, procs: Processes, tmp: Path, args: argparse.Namespace) -> None:
        self.procs, self.tmp, self.args = procs, tmp, args
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        work = self.tmp / "proxies"
        work.mkdir()
        fake_port, floor_port = free_port(), free_port()
        fake = self.procs.start("fakeupstream", [
            sys.executable, "-m", "meterline.gateway.fakeupstream",
            "--listen", f"127.0.0.1:{fake_port}",
            "--latency", self.args.delay, "--tokens", "20", "--chunk-delay", "1ms"], work)
        wait_port(fake_port, fake)
        floor = self.procs.start("floor-proxy", [
            sys.executable, str(BENCH / "gateway_bench.py"), "--serve-floor", str(floor_port),
            str(fake_port)], work)
        wait_port(floor_port, floor)
        self.upstream = f"http://127.0.0.1:{fake_port}"
        self.direct = Target("direct", self.upstream, None)
        self.floor = Target("floor", f"http://127.0.0.1:{floor_port}", floor.pid)
        self.started = True


def measure(target: Target, make: Callable[[str], list[bytes]], args: argparse.Namespace,
            daemon: Daemon | None = None,
            make_big: Callable[[str], list[bytes]] | None = None) -> Measured:
    """One load run on one target. For the gateway, wait until the run's events are
    exported, so that its CPU per request includes what the pipeline did with them."""
    host = urlsplit(target.url).netloc
    requests = make(host)
    big = make_big(host) if make_big else None
    window: dict[str, float] = {}
    schedule: dict[str, tuple[float, tuple[float, float] | None]] = {}  # (when, the loop's)

    def on_measure() -> None:
        if target.pid is not None:
            window["cpu"] = tree_cpu_seconds(target.pid)
            schedule["start"] = (time.perf_counter(), loop_schedule(target.pid))

    before = daemon.metrics() if daemon else None
    cpu0 = tree_cpu_seconds(target.pid) if target.pid else None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        rss = stack.enter_context(RssSampler(target.pid)) if target.pid else None
        load = asyncio.run(drive(target.url, requests, args.clients, args.seconds, args.warmup,
                                 big=big, on_measure=on_measure))
        out = Measured(load)
        if target.pid is not None and "cpu" in window:
            out.cpu_window = tree_cpu_seconds(target.pid) - window["cpu"]
            (since, first), last = schedule["start"], loop_schedule(target.pid)
            if first is not None and last is not None:
                wall = time.perf_counter() - since
                out.loop = ((last[0] - first[0]) / wall, (last[1] - first[1]) / wall)
        if daemon is not None and before is not None and cpu0 is not None:
            done = daemon.wait_delivered(before, "gateway", load.sent + load.big_sent, t0,
                                         timeout=args.drain_timeout, exact=False)
            finished = [v for v in done.values() if v is not None]
            out.drained_s = max(finished) if len(finished) == len(done) else None
            out.cpu_all = tree_cpu_seconds(daemon.pid) - cpu0
            out.dropped = delta(daemon.metrics(), before,
                                "meterline_receiver_refused_events_total", receiver="gateway")
        out.peak_mb = rss.peak_mb if rss else None
    return out


def describe(name: str, m: Measured, direct: Load | None) -> None:
    """One detail line per target, printed as soon as it is measured."""
    lat = m.load.latencies
    n = len(lat)
    line = (f"  {name:<8} p50 {ms(lat, .5):7.1f} ms  p99 {ms(lat, .99):7.1f} ms")
    if direct is not None:
        line += (f"  added p50 {ms(lat, .5) - ms(direct.latencies, .5):+6.1f}  "
                 f"p99 {ms(lat, .99) - ms(direct.latencies, .99):+6.1f}")
    line += f"  {n / m.load.elapsed if m.load.elapsed else 0:6.0f} req/s  errors {m.load.errors}"
    done = n + len(m.load.big_latencies)
    if m.cpu_window is not None and done:
        line += f"  CPU {m.cpu_window / done * 1e6:,.0f} us/req in the window"
    if m.cpu_all is not None:
        total_requests = m.load.sent + m.load.big_sent
        line += (f", {m.cpu_all / total_requests * 1e6:,.0f} us/req until exported "
                 f"({total_requests} requests, exported after {fmt(m.drained_s, '.1f')} s, "
                 f"{m.dropped:.0f} events dropped)")
    if m.peak_mb is not None:
        line += f"  peak RSS {m.peak_mb:.0f} MB"
    if m.loop is not None:
        line += f"  loop ran {m.loop[0]:.0%}, waited for a core {m.loop[1]:.0%}"
    if m.load.big_sent:
        big = m.load.big_latencies
        line += (f"\n  {'':<8} 1 MB requests: {len(big)} done, p50 {ms(big, .5):.0f} ms, "
                 f"max {max(big, default=float('nan')) * 1e3:.0f} ms, errors "
                 f"{m.load.big_errors}")
    print(line)


def loop_share(m: Measured) -> str:
    return f"{m.loop[0]:.0%} / {m.loop[1]:.0%}" if m.loop else "n/a"


def added(m: Measured, direct: Measured) -> tuple[float, float]:
    return (ms(m.load.latencies, .5) - ms(direct.load.latencies, .5),
            ms(m.load.latencies, .99) - ms(direct.load.latencies, .99))


def scenario_gateway(args: argparse.Namespace, procs: Processes, shipped: dict[str, Any],
                     tmp: Path, proxies: Proxies) -> list[Row]:
    proxies.start()
    size = args.prompt_kb * 1024
    print(f"\n== gateway: {args.clients} clients, ~{args.prompt_kb} KB RAG prompts, upstream "
          f"delay {args.delay}, {args.seconds:g} s measured after {args.warmup:g} s")
    bodies = [rag_body(size, seed) for seed in range(8)]

    def make(host: str) -> list[bytes]:
        return [chat_request(host, b) for b in bodies]

    daemon = Daemon(procs, shipped, tmp / "gateway", proxies.upstream, "daemon-gateway")
    daemon.start()
    try:
        target = Target("gateway", f"http://127.0.0.1:{daemon.layout.gateway_port}", daemon.pid)
        direct = measure(proxies.direct, make, args)
        describe("direct", direct, None)
        floor = measure(proxies.floor, make, args)
        describe("floor", floor, direct.load)
        gw = measure(target, make, args, daemon)
        describe("gateway", gw, direct.load)
    finally:
        daemon.stop()
    ga, fa = added(gw, direct), added(floor, direct)
    gw_rps = len(gw.load.latencies) / gw.load.elapsed
    fl_rps = len(floor.load.latencies) / floor.load.elapsed
    gw_us = gw.cpu_all / (gw.load.sent + gw.load.big_sent) * 1e6 if gw.cpu_all else None
    fl_us = (floor.cpu_window / len(floor.load.latencies) * 1e6
             if floor.cpu_window is not None and floor.load.latencies else None)
    lat = direct.load.latencies
    return [
        Row("gateway", f"latency p50/p99 ms (direct {ms(lat, .5):.1f}/{ms(lat, .99):.1f})",
            f"{ms(gw.load.latencies, .5):.1f}/{ms(gw.load.latencies, .99):.1f}",
            f"{ms(floor.load.latencies, .5):.1f}/{ms(floor.load.latencies, .99):.1f}"),
        Row("gateway", "added latency p50/p99 ms", f"{ga[0]:.1f}/{ga[1]:.1f}",
            f"{fa[0]:.1f}/{fa[1]:.1f}", ratio(ga[0], fa[0])),
        Row("gateway", f"req/s ({args.clients} clients)", fmt(gw_rps), fmt(fl_rps),
            ratio(gw_rps, fl_rps)),
        Row("gateway", "CPU us/request (gateway: until exported)", fmt(gw_us), fmt(fl_us),
            ratio(gw_us, fl_us)),
        Row("gateway", "loop ran / waited for a core, % of the time", loop_share(gw),
            loop_share(floor)),
        Row("gateway", "errors; events dropped", f"{gw.load.errors}; {gw.dropped:.0f}",
            f"{floor.load.errors}"),
    ]


def scenario_big(args: argparse.Namespace, procs: Processes, shipped: dict[str, Any],
                 tmp: Path, proxies: Proxies) -> list[Row]:
    proxies.start()
    print(f"\n== big: {args.clients} clients streaming ~{args.small_kb} KB prompts, alone and "
          f"beside one client sending {args.big_mb:g} MB prompts in a loop")
    small = [rag_body(args.small_kb * 1024, 100 + seed, stream=True) for seed in range(8)]
    huge = [rag_body(int(args.big_mb * (1 << 20)), 200 + seed) for seed in range(2)]

    def make(host: str) -> list[bytes]:
        return [chat_request(host, b) for b in small]

    def make_big(host: str) -> list[bytes]:
        return [chat_request(host, b) for b in huge]

    daemon = Daemon(procs, shipped, tmp / "big", proxies.upstream, "daemon-big")
    daemon.start()
    results: dict[tuple[str, bool], Measured] = {}
    try:
        target = Target("gateway", f"http://127.0.0.1:{daemon.layout.gateway_port}", daemon.pid)
        for with_big in (False, True):
            print(f"  -- {'with' if with_big else 'without'} the {args.big_mb:g} MB sender")
            for t in (proxies.direct, proxies.floor, target):
                m = measure(t, make, args, daemon if t is target else None,
                            make_big if with_big else None)
                results[t.name, with_big] = m
                describe(t.name, m, None if t.name == "direct" else
                         results["direct", with_big].load)
    finally:
        daemon.stop()
    rows = []
    for with_big in (False, True):
        direct = results["direct", with_big]
        ga, fa = added(results["gateway", with_big], direct), added(results["floor", with_big],
                                                                    direct)
        label = f"with {args.big_mb:g} MB sender" if with_big else "alone"
        rows.append(Row("big", f"streams' added p50/p99 ms, {label}", f"{ga[0]:.1f}/{ga[1]:.1f}",
                        f"{fa[0]:.1f}/{fa[1]:.1f}", ratio(ga[0], fa[0])))
    gw, fl = results["gateway", True], results["floor", True]
    rows.append(Row("big", f"{args.big_mb:g} MB requests done (p50 ms)",
                    f"{len(gw.load.big_latencies)} ({ms(gw.load.big_latencies, .5):.0f})",
                    f"{len(fl.load.big_latencies)} ({ms(fl.load.big_latencies, .5):.0f})"))
    return rows


# --- main ------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("ingest", "otlp", "gateway", "big", "trickle"))
    parser.add_argument("--quick", action="store_true", help="every scenario shrunk")
    parser.add_argument("--events", type=int, help="ingest, otlp: events (60,000; quick 6,000)")
    parser.add_argument("--batch", type=int, default=1000, help="ingest: events per POST")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="ingest, otlp: posting clients")
    parser.add_argument("--spans-per-request", type=int, default=512, help="otlp: spans")
    parser.add_argument("--seconds", type=float, help="gateway, big: measured (10; quick 2)")
    parser.add_argument("--warmup", type=float, help="gateway, big: unmeasured (1; quick 0.5)")
    parser.add_argument("--clients", type=int, default=16, help="gateway, big: clients")
    parser.add_argument("--delay", default="50ms", help="the fake upstream's delay")
    parser.add_argument("--prompt-kb", type=int, default=60, help="gateway: prompt size")
    parser.add_argument("--small-kb", type=int, default=2, help="big: the streams' prompts")
    parser.add_argument("--big-mb", type=float, default=1.0, help="big: the big prompt")
    parser.add_argument("--trickle-rates", type=float, nargs="+", default=[2.0, 20.0],
                        help="trickle: single events a second (besides idle)")
    parser.add_argument("--trickle-seconds", type=float,
                        help="trickle: each rate measured for (30 s; quick 5 s)")
    parser.add_argument("--drain-timeout", type=float,
                        help="gateway, big: how long to wait for exporters (300 s; quick 60 s)")
    parser.add_argument("--serve-ingest-floor", nargs=2, metavar=("PORT", "FILE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--serve-otlp-floor", nargs=3, metavar=("GRPC", "HTTP", "FILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ingest_floor:
        serve_ingest_floor(int(args.serve_ingest_floor[0]), args.serve_ingest_floor[1])
        return
    if args.serve_otlp_floor:
        grpc_port, http_port, out = args.serve_otlp_floor
        serve_otlp_floor(int(grpc_port), int(http_port), out)
        return
    quick = args.quick
    args.events = args.events or (6000 if quick else 60_000)
    args.seconds = args.seconds or (2.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.drain_timeout = args.drain_timeout or (60.0 if quick else 300.0)
    args.trickle_seconds = args.trickle_seconds or (5.0 if quick else 30.0)
    args.settle = 1.0 if quick else 3.0

    # SIGTERM ends the bench as Ctrl-C does: through the `finally` that stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shipped = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="default-pipeline-bench-"))
    logs = tmp / "logs"
    logs.mkdir()
    procs = Processes(logs)
    proxies = Proxies(procs, tmp, args)
    rows: list[Row] = []
    interrupted = False
    print(f"default pipeline: {ROOT / 'pipeline.yaml'}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f} (a shared machine: figures are noisy)")
    try:
        scenarios: dict[str, Callable[[], list[Row]]] = {
            "ingest": lambda: scenario_ingest(args, procs, shipped, tmp),
            "otlp": lambda: scenario_otlp(args, procs, shipped, tmp),
            "gateway": lambda: scenario_gateway(args, procs, shipped, tmp, proxies),
            "big": lambda: scenario_big(args, procs, shipped, tmp, proxies),
            "trickle": lambda: scenario_trickle(args, procs, shipped, tmp)}
        for name, run in scenarios.items():
            if args.only in (None, name):
                rows += run()
        print_table(rows)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping what the bench started", file=sys.stderr)
        if rows:
            print_table(rows)
        interrupted = True
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
