"""Shared pieces of the fuzz suite (tests/test_fuzz_*.py): Hypothesis settings, strategies
for hostile JSON, and a daemon component run on a background event loop, so that
synchronous Hypothesis tests can drive a real listener over its socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from meterline import config as config_mod
from meterline.event import FIELDS
from meterline.service import Service
from tests.helpers import config_text, pipeline

T = TypeVar("T")

# Deterministic (the same examples on every run), no per-example deadline (the machine is
# shared and loaded: time is bounded by `within` instead), no example database.
settings.register_profile(
    "fuzz", derandomize=True, deadline=None, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def fuzz(max_examples: int) -> settings:
    """The suite's settings with this many examples (the profile is not loaded globally:
    the other test modules keep Hypothesis' defaults)."""
    return settings(settings.get_profile("fuzz"), max_examples=max_examples)


def within(seconds: float, f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`f(*args)`, failing when it took longer than `seconds` (no hang, no blow-up: what a
    single input costs is bounded). Generous: the machine is shared."""
    start = time.monotonic()
    try:
        return f(*args, **kwargs)
    finally:
        took = time.monotonic() - start
        assert took < seconds, f"{getattr(f, '__name__', f)} took {took:.1f}s (> {seconds}s)"


# --- hostile JSON ------------------------------------------------------------------
HUGE_INTS = st.sampled_from([
    2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**30),
    10**400, 10**9, 10**9 + 1, 10**12 + 1, -1])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, 5e-324, 1.7e9, 1.7e18, -0.0])
NUMERIC_STRINGS = st.sampled_from([
    "inf", "-inf", "Infinity", "nan", "NaN", "1e400", "-1e400", "1e308", "0x10", "1_000",
    "²", "٣", "½", "9" * 5000, "1" * 20, "-1", "", " ", "12abc", "1.5", "true", "null"])
TEXT = st.text(max_size=40) | st.sampled_from([
    "\x00", "a\x00b", "\r\n", "\x1b[31m", "\u2028", "\ufeff", "\U0001f600", "é" * 300,
    "x" * 5000, "Bearer sk-" + "a" * 40, "../../etc/passwd", "%00", "{{7*7}}", "$$", "${env:X}"])
SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTS | FLOATS | TEXT
           | NUMERIC_STRINGS)

OTOROSHI_KEYS = ["@type", "audit", "@timestamp", "@id", "@env", "usage", "output", "rate_limit",
                 "apikey", "route", "user", "consumed_using", "duration", "error", "costs",
                 "provider", "provider_kind", "provider_details", "model", "input_prompt",
                 "instance-name"]
LITELLM_KEYS = ["litellm_call_id", "call_type", "custom_llm_provider", "model_group",
                "response_cost", "startTime", "endTime", "completionStartTime", "stream",
                "metadata", "response", "status", "error_information", "error_str", "model",
                "model_id", "cache_hit", "request_tags", "end_user", "trace_id", "id",
                "api_base", "model_parameters", "prompt_tokens", "completion_tokens",
                "session_id", "messages"]
NESTED_KEYS = ["usage", "prompt_tokens", "generation_tokens", "reasoning_tokens", "choices",
               "finish_reason", "message", "role", "content", "metadata", "teams", "_loc",
               "tenant", "clientId", "clientName", "tags", "user_api_key_hash",
               "user_api_key_alias", "user_api_key_team_id", "user_api_key_user_id",
               "spend_logs_metadata", "error_code", "error_class", "prompt_tokens_details",
               "cached_tokens", "options", "temperature", "total_cost", "currency", "name",
               "id", "frontend", "domains", "generations", "type", "code"]
KEYS = (st.sampled_from(sorted(FIELDS) + OTOROSHI_KEYS + LITELLM_KEYS + NESTED_KEYS)
        | st.text(max_size=12))


def json_values(max_leaves: int = 25) -> st.SearchStrategy[Any]:
    """Any JSON-like value (NaN, infinities and integers beyond 64 bits included)."""
    return st.recursive(SCALARS, lambda children: st.lists(children, max_size=5)
                        | st.dictionaries(KEYS, children, max_size=6), max_leaves=max_leaves)


_DEPTHS = st.integers(50, 5000)


def deep(depth: st.SearchStrategy[int] = _DEPTHS) -> st.SearchStrategy[Any]:
    """Lists nested `depth` deep (Python objects, not text)."""
    def build(n: int) -> Any:
        value: Any = []
        for _ in range(n):
            value = [value]
        return value
    return depth.map(build)


def _objects(required: dict[str, Any], keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    value = json_values(12) | deep(st.integers(50, 990))  # (to as deep as the parser goes)
    return st.fixed_dictionaries(required, optional={k: value for k in keys
                                                     if k not in required}) \
        .flatmap(lambda d: st.dictionaries(KEYS, json_values(6), max_size=3).map(
            lambda extra: {**extra, **d}))


_TOKENS = st.integers(-5, 10**9 + 5) | HUGE_INTS | FLOATS | NUMERIC_STRINGS
_TIME = st.floats(1e9, 2e9) | FLOATS | NUMERIC_STRINGS | HUGE_INTS


def meterline_events() -> st.SearchStrategy[dict[str, Any]]:
    """Near-valid meterline events: every field optional, values of the right type often
    (at and past their bounds), of any type sometimes."""
    typed = {
        "event_id": TEXT, "timestamp": st.integers(9 * 10**17, 2 * 10**18) | HUGE_INTS | FLOATS,
        "input_tokens": _TOKENS, "output_tokens": _TOKENS, "status_code": st.integers(-1, 70000),
        "duration_ms": FLOATS, "sample_weight": FLOATS, "cost_usd": FLOATS,
        "metadata": st.dictionaries(TEXT, TEXT | SCALARS, max_size=4),
        "attributes": st.dictionaries(TEXT, json_values(8) | deep(), max_size=4),
        "finish_reasons": st.lists(TEXT, max_size=3) | TEXT,
        "input_messages": st.lists(st.dictionaries(KEYS, json_values(5), max_size=3), max_size=3),
        "params": st.dictionaries(TEXT, SCALARS, max_size=3), "streaming": SCALARS,
        "redactions": st.dictionaries(TEXT, _TOKENS, max_size=3),
    }
    anything = json_values(8)
    optional = {name: (typed[name] | anything) if name in typed else (TEXT | anything)
                for name in sorted(FIELDS)}
    optional["schema_version"] = st.sampled_from([1, 2, "1", None])
    return st.fixed_dictionaries({}, optional=optional)


def otoroshi_audits() -> st.SearchStrategy[dict[str, Any]]:
    return _objects({"audit": st.just("LLMUsageAudit") | SCALARS,
                     "@timestamp": _TIME}, OTOROSHI_KEYS) | st.fixed_dictionaries(
        {"audit": st.just("LLMUsageAudit"), "@timestamp": _TIME},
        optional={"usage": st.fixed_dictionaries({}, optional={
                      "prompt_tokens": _TOKENS, "generation_tokens": _TOKENS,
                      "reasoning_tokens": _TOKENS}),
                  "duration": _TIME, "consumed_using": TEXT | st.just("chat/streaming"),
                  "apikey": st.fixed_dictionaries({}, optional={
                      "clientId": SCALARS, "tags": json_values(6), "metadata": json_values(6),
                      "_loc": st.fixed_dictionaries({}, optional={"teams": json_values(6),
                                                                 "tenant": SCALARS})}),
                  "rate_limit": st.dictionaries(st.sampled_from(
                      ["requests_limit", "tokens_remaining"]), _TOKENS),
                  "provider_details": st.fixed_dictionaries({}, optional={
                      "options": st.dictionaries(st.sampled_from(["temperature", "seed", "n"]),
                                                 _TOKENS)}),
                  "costs": st.dictionaries(st.sampled_from(
                      ["total_cost", "input_cost", "currency"]), _TOKENS | TEXT),
                  "error": json_values(6), "user": json_values(6), "model": SCALARS})


def litellm_payloads() -> st.SearchStrategy[dict[str, Any]]:
    return _objects({"litellm_call_id": SCALARS, "startTime": _TIME}, LITELLM_KEYS) \
        | st.fixed_dictionaries(
            {"litellm_call_id": TEXT, "startTime": _TIME},
            optional={"endTime": _TIME, "completionStartTime": _TIME, "stream": SCALARS,
                      "prompt_tokens": _TOKENS, "completion_tokens": _TOKENS,
                      "response_cost": _TOKENS, "status": st.sampled_from(["failure", "success"]),
                      "error_information": st.fixed_dictionaries({}, optional={
                          "error_code": _TOKENS, "error_class": SCALARS,
                          "error_message": SCALARS}),
                      "metadata": st.fixed_dictionaries({}, optional={
                          "user_api_key_hash": SCALARS, "user_api_key_team_id": SCALARS,
                          "spend_logs_metadata": json_values(6)}),
                      "response": st.fixed_dictionaries({}, optional={
                          "usage": json_values(8), "model": SCALARS,
                          "choices": st.lists(json_values(6), max_size=3)}),
                      "model_parameters": json_values(6), "messages": json_values(8),
                      "call_type": SCALARS | st.sampled_from(["completion", "aembedding"])})


def items() -> st.SearchStrategy[Any]:
    """One JSON item, of any of the three formats or of none."""
    return meterline_events() | otoroshi_audits() | litellm_payloads() | json_values()


def _dumps(value: Any, ensure_ascii: bool) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):  # 10**400 is over the int-to-str limit; too deep
        return b"null"


@st.composite
def json_bodies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A webhook body and whether it is sent as NDJSON: a JSON object, array or NDJSON of
    items (with NaN and Infinity written as Python writes them, which is not JSON), nested
    too deep, cut short, or any bytes."""
    kind = draw(st.sampled_from(["object", "array", "ndjson", "deep", "cut", "bytes"]))
    ascii_ = draw(st.booleans())
    if kind == "object":
        return _dumps(draw(items()), ascii_), draw(st.booleans())
    if kind == "array":
        return _dumps(draw(st.lists(items(), max_size=5)), ascii_), False
    if kind == "ndjson":
        lines = [_dumps(i, ascii_) for i in draw(st.lists(items(), max_size=5))]
        sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
        return sep.join(lines), draw(st.booleans())
    if kind == "deep":
        n = draw(st.integers(100, 20_000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"),
                                               (b'[{"attributes":', b"}]")]))
        return opener * n + b"1" + closer * n, draw(st.booleans())
    if kind == "cut":
        whole = _dumps(draw(st.lists(items(), min_size=1, max_size=3)), ascii_)
        return whole[:draw(st.integers(0, len(whole)))], draw(st.booleans())
    return draw(st.binary(max_size=200)), draw(st.booleans())


# --- a daemon on a background loop --------------------------------------------------
class LoopThread:
    """An event loop on its own thread: the listeners under test run there while the
    (synchronous) Hypothesis test talks to them over sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:  # (connections the server left behind)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_the_rest(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def service_in_thread(receivers: dict[str, Any], tmp_path: Path
                      ) -> Iterator[tuple[LoopThread, Service]]:
    """A Service taking events with `receivers` (their config, by id) into a file."""
    body = pipeline(receivers, service={"workers": 1, "shutdown_timeout": "200ms"})
    with daemon_in_thread(body, tmp_path) as running:
        yield running


@contextlib.contextmanager
def daemon_in_thread(body: str, tmp_path: Path) -> Iterator[tuple[LoopThread, Service]]:
    """A Service running the pipeline.yaml `body` (`{data}`: a directory under `tmp_path`)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_text(body, tmp_path))
    thread = LoopThread()

    async def start() -> Service:
        service = Service(config_mod.load(str(path)))
        await service.start()
        return service

    service: Service | None = None
    try:
        service = thread.run(start())
        yield thread, service
    finally:
        if service is not None:
            with contextlib.suppress(Exception):
                thread.run(service.shutdown())
        thread.close()
