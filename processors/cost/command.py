"""`meterline pricing MODEL`: the price entry a model resolves to, and why.

It builds the table as the `cost` processor of the given `pipeline.yaml` would
(its `prices`, `price_files`, `aliases`, `bundled`), so an operator can check an
override or a price file before the daemon uses it.
"""

from __future__ import annotations

import argparse
import os
import sys

import msgspec

from meterline import config as config_mod
from meterline.cli import DEFAULT_CONFIG
from meterline.genai import provider_name
from meterline.processors.cost import CostConfig
from meterline.processors.cost.prices import Price, Rates, Resolution


def add(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "pricing", help="show the price entry a model resolves to, and why")
    parser.add_argument("model", help="a model name as events report it, e.g. gpt-4o-2024-08-06")
    parser.add_argument("--provider", help="the provider serving it (openai, aws.bedrock...)")
    parser.add_argument("-c", "--config", help=f"read the cost processor's prices from this "
                                               f"pipeline.yaml (default: {DEFAULT_CONFIG} if it "
                                               "exists, else the bundled table alone)")
    parser.add_argument("--processor", help="which cost processor of the file (e.g. cost/eu), "
                                            "when it has several")
    parser.add_argument("--json", action="store_true", help="print the entry as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config, origin = _cost_config(args.config, args.processor)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    provider = provider_name(args.provider)
    found = config.table().resolve(provider, args.model)
    if found.price is None:
        print(f"no price for {args.model!r} (provider {provider or 'not given'}) in {origin}; "
              f"looked up as: {', '.join(found.tried)}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(_as_dict(found, provider, origin)).decode())
    else:
        print(_as_text(found, provider, origin))
    return 0


def _cost_config(path: str | None, processor: str | None) -> tuple[CostConfig, str]:
    """The cost config to price with, and a description of where it came from."""
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return CostConfig(), "the bundled table"
    path = path or DEFAULT_CONFIG
    try:
        loaded = config_mod.load(path)
    except config_mod.ConfigError as e:
        raise ValueError(f"{path}: invalid configuration:\n" +
                         "\n".join(f"  {p}" for p in e.problems)) from e
    costs = {cid: spec.config for cid, spec in loaded.processors.items()
             if spec.factory.type == "cost"}
    if processor is not None:
        if processor not in costs:
            raise ValueError(f"{path} has no cost processor '{processor}' "
                             f"(it has: {', '.join(costs) or 'none'})")
        chosen = processor
    elif len(costs) > 1:
        raise ValueError(f"{path} has several cost processors ({', '.join(costs)}): "
                         "choose one with --processor")
    elif costs:
        chosen = next(iter(costs))
    else:
        return CostConfig(), f"the bundled table ({path} has no cost processor)"
    config = costs[chosen]
    assert isinstance(config, CostConfig)
    return config, f"{path} (processor {chosen})"


def _origin(price: Price) -> str:
    if price.origin == "bundled":
        return "meterline's bundled table"
    if price.origin == "config":
        return "pipeline.yaml `prices`"
    return f"price file {price.origin}"


def _rate_line(rates: Rates) -> str:
    return "  ".join(f"{name.replace('_', ' ')} {value:g}"
                     for name, value in rates._asdict().items())


def _as_text(found: Resolution, provider: str | None, origin: str) -> str:
    price = found.price
    assert price is not None
    lines = [
        f"model      {found.model}" + (f"  (provider {provider})" if provider else ""),
        f"entry      {price.key}  from {_origin(price)}",
        f"why        {'; '.join(found.steps) or 'exact match'}",
        f"source     {price.source}",
        f"as of      {price.as_of or 'not given'}",
        f"table      {origin}",
        "USD per 1M tokens (cache rates default to the input rate, reasoning to the output rate):",
        f"  {_rate_line(price.rates)}",
    ]
    for tier in price.tiers:
        lines.append(f"  above {tier.above:,} prompt tokens: {_rate_line(tier.rates)}")
    if (fractions := price.batch_fractions) is not None:
        inp, out = fractions
        share = f"{inp:.0%}" if inp == out else f"input {inp:.0%}, output {out:.0%}"
        lines.append(f"  batch API: {share} of these")
    return "\n".join(lines)


def _as_dict(found: Resolution, provider: str | None, origin: str) -> dict[str, object]:
    price = found.price
    assert price is not None
    return {
        "model": found.model, "provider": provider, "entry": price.key,
        "origin": price.origin, "steps": found.steps, "source": price.source,
        "as_of": price.as_of,
        "table": origin, "usd_per_million_tokens": price.rates._asdict(),
        "tiers": [{"above": t.above, **t.rates._asdict()} for t in price.tiers],
        "batch": price.batch,
        "batch_output": price.batch_output,
    }
