"""meterline's prices against LiteLLM's own cost calculation (a differential test).

A FinOps user loads LiteLLM's price map into meterline (`price_files`) and compares what
meterline says with what LiteLLM says: the two must agree wherever the same entry prices
a call, or differ by a choice that docs/processors.md states (under `cost`, "LiteLLM's
cost calculation"). A seeded sample of calls to the chat models of LiteLLM's own map (the
one inside the `litellm` package, `LITELLM_LOCAL_MODEL_COST_MAP`: never downloaded),
across its providers, with prompts at and past the `_above_Nk_tokens` and
`tiered_pricing` thresholds, cache reads and writes (some kept for an hour), reasoning and
audio tokens, served by the standard, `flex` or `priority` tier, in a data-residency region,
at a Vertex AI regional endpoint or where Anthropic says it ran them, in Anthropic's fast
mode or not, is priced twice:

- by LiteLLM 1.100.5 (`cost_per_token` with the usage object its responses carry), for
  the whole sample in one process of its own virtual environment (tests/litellm_costs.py);
- by the `cost` processor configured with that map as a price file, on the events the
  LiteLLM decoder makes of the logging payloads LiteLLM would post for those calls (their
  `response.usage` as LiteLLM made it).

Input and output costs must match to 1e-9 relative. LiteLLM is installed once per
machine (tests/litellm_proxy.py); the tests are skipped, with the reason, only when it
cannot be.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meterline.config import convert
from meterline.event import Event
from meterline.processors.cost import CostConfig, CostProcessor
from meterline.receivers.decoders import decode_item
from tests import litellm_proxy
from tests.helpers import make_context

SEED = 1005
CALLS = 400
AUDIO_CALLS = 40
SERVED_CALLS = 120  # to entries with service tiers or one-hour cache writes
REGIONAL_CALLS = 40  # to entries with a regional uplift
FAST_CALLS = 12  # to entries that price Anthropic's fast mode
SCRIPT = Path(__file__).with_name("litellm_costs.py")
KINDS = ("cache_read", "cache_write", "reasoning", "audio_in", "audio_out")
AUDIO_RATES = frozenset({"input_cost_per_audio_token", "output_cost_per_audio_token"})
_THRESHOLD = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
ONE_HOUR = "cache_creation_input_token_cost_above_1hr"


REGIONS = ("regional_processing_uplift_multiplier_eu", "regional_processing_uplift_multiplier_us",
           "regional_endpoint_uplift_multiplier")


def geos(entry: dict[str, Any]) -> list[str]:
    """The places an entry prices apart by where the provider says it ran a call (its
    `provider_specific_entry`: Anthropic's `inference_geo`; `fast` is a speed)."""
    specific = entry.get("provider_specific_entry") or {}
    return [k for k, v in specific.items() if k != "fast" and isinstance(v, int | float)]


def fast_mode(entry: dict[str, Any]) -> bool:
    """Whether an entry prices Anthropic's fast mode (`provider_specific_entry.fast`)."""
    return isinstance((entry.get("provider_specific_entry") or {}).get("fast"), int | float)


def where_served(entry: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Where a call to `entry` was processed: an OpenAI regional host (the LiteLLM payload's
    `api_base`, LiteLLM's `data_residency`), a Vertex AI location or where Anthropic ran it
    (its usage's `inference_geo`, `global` included), when the entry prices one apart (half
    the time); else nowhere in particular."""
    if (places := geos(entry)) and rng.random() < 0.5:  # (in Anthropic's form of usage)
        return {"inference_geo": rng.choice([*places, "global"]), "form": "anthropic"}
    regions = [r for r in ("eu", "us") if f"regional_processing_uplift_multiplier_{r}" in entry]
    if regions and rng.random() < 0.5:
        region = rng.choice(regions)
        return {"api_base": f"https://{region}.api.openai.com/v1", "data_residency": region}
    if "regional_endpoint_uplift_multiplier" in entry and rng.random() < 0.5:
        location = rng.choice(["us-east5", "europe-west1", "global"])
        return {"api_base": f"https://{'' if location == 'global' else location + '-'}"
                            f"aiplatform.googleapis.com/v1/projects/p/locations/{location}",
                "vertex_location": location}
    return {}


def service_tiers(entry: dict[str, Any]) -> list[str]:
    """The service tiers an entry prices apart (`input_cost_per_token_flex`...)."""
    return [t for t in ("flex", "priority") if f"input_cost_per_token_{t}" in entry
            or f"output_cost_per_token_{t}" in entry]


@dataclass
class Call:
    """One sampled call: its usage as LiteLLM counts it, and what LiteLLM made of it."""

    usage: dict[str, Any]  # model (a key of the map), prompt, completion, cache_read...
    answer: dict[str, Any]  # provider, entry, usage (LiteLLM's form), input, output (USD)
    entry: dict[str, Any]  # the entry of the map LiteLLM priced it by


def thresholds(entry: dict[str, Any]) -> list[int]:
    """The prompt sizes where an entry's prices change."""
    above = [int(m.group(1)) * 1000 for k in entry if (m := _THRESHOLD.match(k))]
    ranges = [int(t["range"][0]) for t in entry.get("tiered_pricing") or () if "range" in t]
    return [t for t in above + ranges if t > 0]


def usage_for(model: str, entry: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A call's usage, as LiteLLM counts it: `prompt` includes the cache reads, writes and
    audio tokens, `completion` the reasoning and audio ones; `form` is the form of
    LiteLLM's usage object (tests/litellm_costs.py). A prompt has one token at
    least (every chat call has one; LiteLLM bills the answer to an empty prompt of a
    `tiered_pricing` entry nothing, as it finds no range for it)."""
    prompt = rng.choice([rng.randint(1, 4000), rng.randint(4000, 120_000)])
    if (limits := thresholds(entry)) and rng.random() < 0.5:
        prompt = rng.choice(limits) + rng.choice([0, 1, rng.randint(2, 50_000)])
    read = rng.randint(1, prompt // 2) if prompt > 1 and rng.random() < (
        0.6 if "cache_read_input_token_cost" in entry else 0.1) else 0
    written = rng.randint(1, (prompt - read) // 3) if prompt - read > 3 and rng.random() < (
        0.8 if "cache_creation_input_token_cost" in entry else 0.05) else 0
    audio_in = rng.randint(1, (prompt - read - written) // 2) if (
        prompt - read - written > 2 and rng.random() < (
            0.5 if "input_cost_per_audio_token" in entry else 0.05)) else 0
    completion = rng.randint(1, 8000)
    reasoning = rng.randint(1, completion) if rng.random() < 0.5 else 0
    audio_out = rng.randint(1, completion - reasoning) if completion > reasoning and (
        rng.random() < (0.5 if "output_cost_per_audio_token" in entry else 0.05)) else 0
    # (LiteLLM's OpenAI form of usage has no place for the writes kept for an hour)
    for_an_hour = rng.randint(1, written) if written and ONE_HOUR in entry and (
        rng.random() < 0.5) else 0
    tiers = service_tiers(entry)
    tier = rng.choice(tiers) if tiers and rng.random() < 0.8 else None
    if tier == "priority" and rng.random() < 0.3:
        tier = "fast"  # (billed as priority)
    call = {"model": model, "form": "anthropic" if for_an_hour else rng.choice(
                ["anthropic", "openai"]), "prompt": prompt,
            "completion": completion, "cache_read": read, "cache_write": written,
            "reasoning": reasoning, "audio_in": audio_in, "audio_out": audio_out,
            "cache_write_1h": for_an_hour, "service_tier": tier, **where_served(entry, rng)}
    if fast_mode(entry):  # (in Anthropic's form of usage)
        call |= {"speed": rng.choice(["fast", "fast", "standard"]), "form": "anthropic"}
    return call


def sample(price_map: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """`CALLS` calls to chat models: a quarter to those whose prices change past a prompt
    size or that price cache writes, the rest to any; then `AUDIO_CALLS` to those that
    price audio tokens, and `SERVED_CALLS` to those that price service tiers or one-hour
    cache writes (half of them to entries with a `flex` tier), `REGIONAL_CALLS` to those
    with a regional uplift and `FAST_CALLS` to those that price Anthropic's fast mode. Each
    part but the last is taken in turn from each provider family of the map (so that Groq's
    or Cohere's few models count as much as Bedrock's hundreds)."""
    chat = {k: e for k, e in price_map.items() if isinstance(e, dict) and e.get("mode") ==
            "chat" and ("input_cost_per_token" in e or e.get("tiered_pricing"))}
    special = {k: e for k, e in chat.items()
               if thresholds(e) or "cache_creation_input_token_cost" in e}
    served = {k: e for k, e in chat.items() if service_tiers(e) or ONE_HOUR in e}
    flexible = {k: e for k, e in served.items() if "flex" in service_tiers(e)}
    regional = {k: e for k, e in chat.items() if REGIONS & e.keys() or geos(e)}
    audio = {k: e for k, e in chat.items() if AUDIO_RATES & e.keys()}
    fast = sorted(k for k, e in chat.items() if fast_mode(e))
    models = in_turn(special, CALLS // 4, rng) + in_turn(chat, CALLS - CALLS // 4, rng)
    usages = [usage_for(model, price_map[model], rng) for model in models]
    return usages + [usage_for(model, price_map[model], rng)
                     for model in [*in_turn(audio, AUDIO_CALLS, rng),
                                   *in_turn(served, SERVED_CALLS // 2, rng),
                                   *in_turn(flexible, SERVED_CALLS // 2, rng),
                                   *in_turn(regional, REGIONAL_CALLS, rng),
                                   *(rng.choice(fast) for _ in range(FAST_CALLS))]]


def in_turn(entries: dict[str, Any], count: int, rng: random.Random) -> list[str]:
    """`count` keys of `entries`, one of each provider family in turn."""
    families: dict[str, list[str]] = {}
    for key, entry in entries.items():
        families.setdefault(str(entry.get("litellm_provider")), []).append(key)
    queues = [rng.sample(families[f], len(families[f])) for f in sorted(families)]
    keys: list[str] = []
    while len(keys) < count and any(queues):
        keys += [queue.pop() for queue in queues if queue][:count - len(keys)]
    return keys


def litellm_answers(venv: Path, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LiteLLM's answer for every call, from one process (LiteLLM takes seconds to
    import)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LITELLM_")},
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    done = subprocess.run([str(venv / "bin" / "python"), str(SCRIPT)], input=json.dumps(calls),
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} exited {done.returncode}:\n{done.stderr[-3000:]}")
    answers: list[dict[str, Any]] = json.loads(done.stdout)
    return answers


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Call, Event]]:
    """Every sampled call LiteLLM could price, with meterline's event of it, priced."""
    try:
        venv = litellm_proxy.ensure_installed().parent.parent
    except litellm_proxy.Unavailable as e:
        pytest.skip(str(e))
    map_file = next(venv.glob("lib/python*/site-packages/litellm/"
                              "model_prices_and_context_window_backup.json"))
    price_map = json.loads(map_file.read_text())
    usages = sample(price_map, random.Random(SEED))
    calls = [Call(u, a, price_map[a["entry"]])
             for u, a in zip(usages, litellm_answers(venv, usages), strict=True)
             if "error" not in a]  # a key LiteLLM itself cannot call or price
    tmp = tmp_path_factory.mktemp("cost")
    cost = CostProcessor(convert({"price_files": [str(map_file)]}, CostConfig),
                         make_context(tmp, "cost"))
    return list(zip(calls, cost.process([decode_item(payload(c)) for c in calls]),
                    strict=True))


def payload(call: Call) -> dict[str, Any]:
    """The part of LiteLLM's logging payload (StandardLoggingPayload) that prices a call."""
    return {"call_type": "completion", "status": "success",
            "startTime": 1_760_000_000.0, "endTime": 1_760_000_001.0,
            "model": call.usage["model"], "model_group": call.usage["model"],
            "custom_llm_provider": call.answer["provider"],
            **({"api_base": call.usage["api_base"]} if "api_base" in call.usage else {}),
            "prompt_tokens": call.usage["prompt"], "completion_tokens": call.usage["completion"],
            "response": {"usage": call.answer["usage"],
                         "service_tier": call.usage["service_tier"]},
            "response_cost": call.answer["input"] + call.answer["output"]}


def deliberate(call: Call) -> str | None:
    """Why meterline prices this call otherwise than LiteLLM, on purpose (each reason is
    a difference docs/processors.md states), or None."""
    usage, entry = call.usage, call.entry
    ranged = bool(entry.get("tiered_pricing"))  # its ranges price cache tokens at input
    if usage["audio_in"] and "input_cost_per_audio_token" not in entry:
        return "audio input without an audio price: LiteLLM 0, meterline the input rate"
    if usage["cache_read"] and "cache_read_input_token_cost" not in entry and not ranged:
        return "cache reads without a cache read price: LiteLLM 0, meterline the input rate"
    if usage["cache_write"] and "cache_creation_input_token_cost" not in entry \
            and not ranged:
        return "cache writes without a cache write price: LiteLLM 0, meterline the input rate"
    tier = {"fast": "priority"}.get(usage["service_tier"], usage["service_tier"])
    if usage["audio_in"] and f"input_cost_per_audio_token_{tier}" in entry:
        return ("audio input on a service tier with its own audio price: LiteLLM's model "
                "info drops that price (the standard one), meterline the tier's")
    if call.answer["provider"] == "xai" and usage["prompt"] in thresholds(entry):
        return "xAI at a threshold: LiteLLM bills the tier from it, meterline above it"
    if re.search(r"model[-_]router", usage["model"]):
        return "Azure's model router: LiteLLM adds its fee to the routed model's price"
    return None


def differs(ours: float | None, theirs: float) -> bool:
    return ours is None or not math.isclose(ours, theirs, rel_tol=1e-9)


def test_every_call_costs_what_litellm_says_but_where_docs_say_why(
        priced: list[tuple[Call, Event]]) -> None:
    mismatches = [
        f"{c.usage} as {c.answer['entry']}: meterline {e.cost_input_usd} + "
        f"{e.cost_output_usd} ({e.pricing_ref}), LiteLLM {c.answer['input']} + "
        f"{c.answer['output']}"
        for c, e in priced if deliberate(c) is None and (
            differs(e.cost_input_usd, c.answer["input"])
            or differs(e.cost_output_usd, c.answer["output"]))]
    assert not mismatches, f"{len(mismatches)} calls:\n" + "\n".join(mismatches[:20])


def test_every_call_is_priced_by_the_litellm_file(priced: list[tuple[Call, Event]]) -> None:
    refs = {e.pricing_ref for _, e in priced}
    assert all(r and "@model_prices_and_context_window_backup.json" in r for r in refs), refs


def test_the_sample_spans_providers_and_every_kind_of_usage(
        priced: list[tuple[Call, Event]]) -> None:
    compared = [c for c, _ in priced if deliberate(c) is None]
    providers = Counter(c.answer["provider"] for c in compared)
    assert len(compared) >= 300, len(compared)
    assert {"openai", "anthropic", "gemini", "vertex_ai", "bedrock", "bedrock_mantle",
            "mistral", "groq", "cohere_chat", "xai", "deepseek", "azure",
            "dashscope"} <= set(providers), providers
    kinds = Counter(k for c in compared for k in KINDS if c.usage[k])
    assert min(kinds[k] for k in ("cache_read", "cache_write", "reasoning")) >= 30, kinds
    assert min(kinds[k] for k in ("audio_in", "audio_out")) >= 5, kinds
    tiered = [c for c in compared if any(c.usage["prompt"] > t for t in thresholds(c.entry))]
    assert len(tiered) >= 20, len(tiered)
    served = Counter(c.usage["service_tier"] for c in compared)
    assert min(served[t] for t in ("flex", "priority", "fast")) >= 10, served
    assert sum(1 for c in compared if c.usage["cache_write_1h"]) >= 10
    regions = Counter(c.usage.get("data_residency") or c.usage.get("vertex_location")
                      for c in compared)
    assert min(regions[r] for r in ("eu", "us")) >= 3, regions
    geo = Counter(c.usage.get("inference_geo") for c in compared)
    assert geo["us"] >= 3 and geo["global"] >= 1, geo
    speeds = Counter(c.usage.get("speed") for c in compared)
    assert speeds["fast"] >= 5 and speeds["standard"] >= 1, speeds
    assert sum(regions[r] for r in ("us-east5", "europe-west1")) >= 5, regions
