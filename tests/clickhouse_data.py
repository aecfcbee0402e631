"""A generated data set for the FinOps tests, and the plain-Python sums its answers must equal.

Costs, weights and latencies are dyadic fractions (0.125, 2.0, 100.5...), so float
sums are exact in any order and a ClickHouse total equals the Python one exactly.
Timestamps keep clear (20+ minutes) of the 24h/7d/30d/60d/90d window edges, so a
test that runs for minutes still sees each event on the same side of every edge.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from meterline.event import Event
from meterline.genai import failure

MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"),
          ("anthropic", "claude-haiku-3"), ("mistral_ai", "mistral-large")]
CONSTANT_LATENCY_MODEL = "claude-haiku-3"  # every call 250.5 ms: percentiles are exact
HOUR = 3600
# Offsets before now, in seconds, as (low, high) bands away from the window edges.
_BANDS = [(0.5 * HOUR, 23 * HOUR), (25 * HOUR, 6.5 * 24 * HOUR),
          (7.5 * 24 * HOUR, 29 * 24 * HOUR), (31 * 24 * HOUR, 59 * 24 * HOUR),
          (61 * 24 * HOUR, 89 * 24 * HOUR)]


def dataset(now: datetime, count: int = 600, seed: int = 5) -> list[Event]:
    rng = random.Random(seed)
    now_s = int(now.timestamp())
    events = []
    for i in range(count):
        low, high = rng.choice(_BANDS)
        ts = (now_s - rng.randint(int(low), int(high))) * 1_000_000_000 + rng.randint(0, 999)
        provider, model = rng.choice(MODELS)
        status = rng.choice([200] * 8 + [429, 500, 499])  # 499: cancelled, no error
        error = {429: "rate_limit_error", 500: "server_error"}.get(status)
        cost = rng.choice([0.125, 0.25, 0.5, 1.0, 2.5, None])
        anonymous_model = rng.random() < 0.1
        events.append(Event(
            event_id=f"ds-{seed}-{i:06d}", timestamp=ts, source="gateway",
            provider=provider, operation="chat",
            request_model=None if anonymous_model else model, response_model=model + "-2025",
            status_code=status, error_type=error,
            input_tokens=rng.randint(1, 2000) if status == 200 else None,
            output_tokens=rng.randint(1, 800) if status == 200 else None,
            duration_ms=250.5 if model == CONSTANT_LATENCY_MODEL else rng.choice(
                [100.5, 200.25, 400.75, 800.0, 1600.5]),
            ttft_ms=rng.choice([None, 50.5, 80.25]),
            team=rng.choice(["search", "support", None]),
            user_id=rng.choice(["u1", "u2", "u3", "u4", "u5", None]),
            **dict(zip(("api_key_id", "api_key_name"),
                       rng.choice([("k1", "prod"), ("k2", "staging"), (None, None)]),
                       strict=True)),
            metadata=rng.choice([{"customer": "acme"}, {"customer": "globex"},
                                 {"customer": "initech", "env": "prod"}, None]),
            cost_usd=cost,
            actual_cost_usd=(cost + rng.choice([0.125, -0.0625, 0.0])
                             if cost is not None and rng.random() < 0.3 else None),
            sample_weight=rng.choice([1.0, 1.0, 1.0, 2.0, 4.0]),
            session_id=f"s{i % 7}" if i % 3 else None,
        ))
    return events


# --- the oracle --------------------------------------------------------------------------
def model_of(e: Event) -> str:
    return e.request_model or e.response_model or ""


def is_error(e: Event) -> bool:
    return failure(e.error_type, e.status_code) is not None


KEYS: dict[str, Callable[[Event], Any]] = {
    "provider": lambda e: e.provider,
    "model": model_of,
    "team": lambda e: e.team,
    "api_key": lambda e: e.api_key_id,
    "user": lambda e: e.user_id,
    "status": lambda e: e.status_code,
    "day": lambda e: datetime.fromtimestamp(e.timestamp // 10**9, UTC).strftime("%Y-%m-%d"),
    "hour": lambda e: datetime.fromtimestamp(e.timestamp // 10**9, UTC).strftime(
        "%Y-%m-%dT%H:00:00Z"),
    "metadata.customer": lambda e: (e.metadata or {}).get("customer"),
    "metadata.env": lambda e: (e.metadata or {}).get("env"),
    "organization": lambda e: e.organization,
    "route": lambda e: e.route,
    "service_tier": lambda e: e.service_tier,
}


def in_window(events: Iterable[Event], answer: dict[str, Any]) -> list[Event]:
    """The events inside the window an answer reports (`since`, `until`)."""
    since = _ns(answer["since"])
    until = _ns(answer["until"])
    return [e for e in events if since <= e.timestamp < until]


def _ns(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) * 1_000_000_000


def totals(events: Iterable[Event]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for e in events:
        w = e.sample_weight
        out["requests"] += w
        out["errors"] += w if is_error(e) else 0
        out["input_tokens"] += (e.input_tokens or 0) * w
        out["output_tokens"] += (e.output_tokens or 0) * w
        out["cost_usd"] += (e.cost_usd or 0) * w
        out["unpriced_requests"] += w if e.cost_usd is None else 0
        out["cache_hits"] += w if e.cache_hit else 0
        out["saved_cost_usd"] += (e.saved_cost_usd or 0) * w
        if e.actual_cost_usd is not None:
            out["actual_cost_usd"] += e.actual_cost_usd * w
            out["estimated_cost_of_actual_usd"] += (e.cost_usd or 0) * w
            out["actual_cost_requests"] += w
    out["total_tokens"] = out["input_tokens"] + out["output_tokens"]
    return out


def by(events: Iterable[Event], key: str) -> dict[Any, dict[str, float]]:
    groups: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        value = KEYS[key](e)
        groups[None if value in ("", None) else value].append(e)
    return {k: totals(v) for k, v in groups.items()}
