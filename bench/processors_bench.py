"""Processor throughput on one core: events/s for labels, cost, redact and sample, and
the MB/s of text redact scans.

Each processor gets batches of events (fresh copies each round: processors change
events in place) and only its `process` call is timed, in this one process. The
events are chat calls with token usage, cache and reasoning counts, metadata, and
~1 KB of message text of which one message in ten carries PII or a secret. Redact is
also measured on the daemon's usual event (a 700-byte prompt with an e-mail address
and a phone number, a 250-byte answer, metadata), on the same with every other string
field filled (ids, `error_message`, `params`, `attributes`), on the tests' labelled PII
corpus (dense PII), and on one 1 MB prompt with PII spread through it.

    python bench/processors_bench.py --events 50000 --batch 1000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's meterline

from meterline import logs
from meterline.component import Context, Processor
from meterline.config import MetricsConfig, convert
from meterline.event import Event, api_key_id, clone
from meterline.registry import factory
from meterline.telemetry import Telemetry

PROSE = ("Summarize the attached quarterly report for the leadership team, keeping the "
         "figures on revenue, churn and hiring, and suggest three follow-up questions. ")
PII = ["Contact me at jane.doe@acme-corp.com or +44 20 7946 0958.",
       "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00.",
       "key sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78 and server 203.0.113.7",
       "SSN 123-45-6789, Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0"]
MODELS = [("openai", "gpt-4o-2024-08-06"), ("openai", "gpt-4.1-mini"),
          ("anthropic", "claude-sonnet-4-5-20250929"), ("gcp.gemini", "gemini-2.5-flash"),
          ("aws.bedrock", "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
          ("azure.ai.openai", "prod-chat"), ("mistral_ai", "mistral-large-latest")]

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("labels", "labels {}", {}),
    ("labels", "labels: static, api-key table, 3 actions", {
        "static": {"environment": "prod", "region": "eu-west-1"},
        "api_keys": {"keys": {f"ak_{i}": {"name": f"key-{i}", "team": f"team-{i % 7}",
                                          "metadata": {"cost_center": str(4700 + i)}}
                              for i in range(200)}},
        "actions": [{"copy": "user_id", "to": "metadata.user"},
                    {"rename": "metadata.cust", "to": "metadata.customer_id"},
                    {"delete": "metadata.debug"}]}),
    ("cost", "cost {}", {}),
    ("cost", "cost: aliases + overrides", {"aliases": {"prod-chat": "gpt-4o"},
                                           "prices": {"gpt-4.1-mini": {"input": 0.3,
                                                                       "output": 1.2}}}),
    ("redact", "redact {}", {}),
    ("redact", "redact: hash e-mails", {"detectors": {"email": "hash"},
                                        "hash_key": "0123456789abcdef0123"}),
    ("sample", "sample {} (keeps all)", {}),
    ("sample", "sample rate 0.1", {"rate": 0.1}),
    ("sample", "sample content mode 0.1", {"mode": "content", "rate": 0.1}),
    ("sample", "sample 2 rules, 1000/s limit", {
        "rate": 0.5, "max_per_second": 1000,
        "rules": [{"match": {"provider": "anthropic"}, "rate": 1.0},
                  {"match": {"metadata.env": "dev"}, "rate": 0.01}]}),
]


def make_events(n: int, seed: int = 1) -> list[Event]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        provider, model = MODELS[i % len(MODELS)]
        text = PROSE * 6
        if i % 10 == 0:
            text = f"{text} {PII[(i // 10) % len(PII)]}"
        events.append(Event(
            event_id=f"evt-{i:09d}", trace_id=f"{rng.getrandbits(128):032x}",
            source="gateway", provider=provider, operation="chat", request_model=model,
            endpoint="/v1/chat/completions",
            status_code=200, input_tokens=1200 + i % 300, cache_read_tokens=512,
            output_tokens=300, reasoning_tokens=100, duration_ms=900.0,
            user_id=f"u-{i % 500}", api_key_id=f"ak_{i % 250}",
            metadata={"cust": f"c-{i % 90}", "feature": "summary", "debug": "1"},
            input_messages=[{"role": "system", "content": "You are a helpful analyst."},
                            {"role": "user", "content": text}],
            output_messages=[{"role": "assistant", "content": PROSE * 2}]))
    return events


def daemon_events(n: int) -> list[Event]:
    """The daemon's usual event: a 700-byte prompt with one e-mail address and one phone
    number, a 250-byte answer, metadata."""
    prompt = (PROSE * 5)[:640] + " Reply to ann.lee@example.org or call +1 415 555 0132."
    answer = (PROSE * 2)[:250]
    return [Event(event_id=f"d{i}", provider="openai", operation="chat",
                  request_model="gpt-4o", input_tokens=180, output_tokens=60,
                  metadata={"cust": f"c-{i % 90}", "feature": "support"},
                  input_messages=[{"role": "user", "content": prompt}],
                  output_messages=[{"role": "assistant", "content": answer}])
            for i in range(n)]


def field_events(n: int) -> list[Event]:
    """`daemon_events` with every other string field filled as the OTLP receiver and the
    gateway fill them: ids, team and organization, a session, `finish_reasons`, `params`,
    eight resource and span `attributes`; one user in ten is an e-mail address, and one
    event in twenty an upstream's 401 echoing the key."""
    events = daemon_events(n)
    rng = random.Random(2)
    for i, e in enumerate(events):
        e.trace_id = f"{rng.getrandbits(128):032x}"
        e.span_id, e.parent_span_id = f"{rng.getrandbits(64):016x}", f"{rng.getrandbits(64):016x}"
        e.event_id = f"{e.trace_id}-{e.span_id}"
        e.user_id = f"user{i % 300}@example.org" if i % 10 == 0 else f"u-{i % 300}"
        e.session_id = f"sess-{i // 8:06d}"
        e.api_key_id, e.api_key_name = api_key_id(f"key-{i % 25}"), f"key-{i % 25}"
        e.team, e.organization = f"team-{i % 7}", "acme"
        e.source, e.endpoint, e.route = "otlp", "/v1/chat/completions", "chat"
        e.finish_reasons = ["stop"]
        e.params = {"temperature": 0.2, "max_tokens": 512, "top_p": 1.0, "stream": False}
        e.attributes = {"service.name": "checkout-api", "service.version": "2.14.1",
                        "host.name": f"ip-10-0-{i % 4}-17", "deployment.environment": "prod",
                        "telemetry.sdk.name": "opentelemetry", "telemetry.sdk.language": "python",
                        "server.address": "api.openai.com", "server.port": 443}
        if i % 20 == 0:
            e.status_code, e.error_type = 401, "invalid_request_error"
            e.error_message = ("Incorrect API key provided: sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12"
                               "Mn34Op56Qr78. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.")
    return events


def big_prompt(megabytes: float = 1.0) -> list[Event]:
    """One prompt of `megabytes` of prose with PII every ~4 KB (one of `PII` each time)."""
    parts: list[str] = []
    size = 0
    while size < megabytes * 1e6:
        parts += [PROSE * 25, PII[len(parts) % len(PII)], " "]
        size += len(parts[-3]) + len(parts[-2]) + 1
    return [Event(event_id="big", input_messages=[{"role": "user", "content": "".join(parts)}])]


def corpus_events() -> list[Event]:
    """The labelled redaction corpus of the tests, one text per event: text dense in
    PII, secrets and numbers, in several languages."""
    path = Path(__file__).resolve().parent.parent / "tests/fixtures/redact-corpus.yaml"
    items = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [Event(event_id=f"c{i}", input_messages=[{"role": "user", "content": item["text"]}])
            for i, item in enumerate(items)]


def text_bytes(events: list[Event]) -> int:
    total = 0
    for e in events:
        for messages in (e.input_messages, e.output_messages):
            for m in messages or ():
                total += len(str(m.get("content", "")).encode())
    return total


def build(type_: str, config: dict[str, Any], data_dir: Path) -> Processor:
    f = factory("processor", type_)
    context = Context(type_, data_dir, Telemetry(MetricsConfig()), logs.get(component=type_))
    return f.create(convert(config, f.config), context)


def run(processor: Processor, batches: list[list[Event]], rounds: int) -> float:
    """Seconds of CPU spent in `process` over all rounds (copies made outside the clock)."""
    spent = 0.0
    for _ in range(rounds):
        fresh = [clone(b) for b in batches]
        start = time.process_time()
        for batch in fresh:
            processor.process(batch)
        spent += time.process_time() - start
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logs.configure("warning")
    events = make_events(args.events)
    batches = [events[i:i + args.batch] for i in range(0, len(events), args.batch)]
    scanned = text_bytes(events)
    print(f"{args.events} events in batches of {args.batch}, {args.rounds} rounds, "
          f"{scanned / len(events):.0f} B of message text per event; CPU time of process()")
    with tempfile.TemporaryDirectory() as tmp:
        for type_, label, config in CONFIGS:
            processor = build(type_, config, Path(tmp))
            run(processor, batches[:2], 1)  # warm caches (model resolution, regex)
            seconds = run(processor, batches, args.rounds)
            rate = args.events * args.rounds / seconds
            line = f"{label:42s} {rate:12,.0f} events/s  {1e6 / rate:7.2f} us/event"
            if type_ == "redact":
                line += f"  {scanned * args.rounds / seconds / 1e6:7.1f} MB/s of text"
            print(line)
        redact = build("redact", {}, Path(tmp))
        daemon = daemon_events(args.events)
        batches = [daemon[i:i + args.batch] for i in range(0, len(daemon), args.batch)]
        seconds = run(redact, batches, args.rounds)
        rate = len(daemon) * args.rounds / seconds
        print(f"{'redact {} on 700 B prompts with e-mail+phone':42s} {rate:12,.0f} events/s  "
              f"{1e6 / rate:7.2f} us/event  "
              f"{text_bytes(daemon) * args.rounds / seconds / 1e6:7.1f} MB/s of text")
        fields = field_events(args.events)
        batches = [fields[i:i + args.batch] for i in range(0, len(fields), args.batch)]
        seconds = run(redact, batches, args.rounds)
        rate = len(fields) * args.rounds / seconds
        print(f"{'redact {} on those, every string field filled':42s} {rate:12,.0f} events/s  "
              f"{1e6 / rate:7.2f} us/event")
        corpus = corpus_events()
        seconds = run(redact, [corpus], args.rounds * 10)
        print(f"{'redact {} on the PII corpus (dense PII)':42s} "
              f"{text_bytes(corpus) * args.rounds * 10 / seconds / 1e6:7.1f} MB/s of text")
        big = big_prompt()
        seconds = run(redact, [big], args.rounds)
        print(f"{'redact {} on one 1 MB prompt (PII every 4 KB)':42s} "
              f"{text_bytes(big) * args.rounds / seconds / 1e6:7.1f} MB/s of text")


if __name__ == "__main__":
    main()
