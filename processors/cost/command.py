"""`meterline pricing MODEL`: the price entry a model resolves to, and why.
`meterline pricing update FILE`: merge a newer LiteLLM price map into the daemon's.

`pricing MODEL` builds the table as the `cost` processor of the given `pipeline.yaml`
would (its `prices`, `price_files`, `aliases`, `bundled`, and the map `pricing update`
keeps in the data directory), so an operator can check an override or a price file
before the daemon uses it.

`pricing update FILE` merges FILE (LiteLLM's `model_prices_and_context_window.json`,
or any map in its format) into `<data_dir>/prices/litellm.json` (or `--into PATH`, e.g.
a file the config lists in `price_files`): models it adds are added, prices it changes
are changed, models it lacks are kept unless `--prune`. It prints each change, and
refuses a malformed file (not JSON, an entry that is not an object, a price that is not
a non-negative number) naming the line and the key, leaving the map as it was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from meterline import config as config_mod
from meterline.cli import DEFAULT_CONFIG
from meterline.genai import provider_name
from meterline.processors.cost import CostConfig, updated_prices
from meterline.processors.cost.prices import Price, Rates, Resolution, litellm_layer


def add(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "pricing", help="show the price entry a model resolves to, and why")
    parser.add_argument("model", help="a model name as events report it, e.g. "
                                      "gpt-4o-2024-08-06; or `update`, to merge FILE")
    parser.add_argument("file", nargs="?", help="(update) a LiteLLM price map (JSON)")
    parser.add_argument("--into", help="(update) the price map to merge into (default: "
                                       "<data_dir>/prices/litellm.json, which the cost "
                                       "processor reads when it starts)")
    parser.add_argument("--prune", action="store_true",
                        help="(update) remove the models FILE does not list")
    parser.add_argument("--dry-run", action="store_true",
                        help="(update) print the changes, write nothing")
    parser.add_argument("--provider", help="the provider serving it (openai, aws.bedrock...)")
    parser.add_argument("-c", "--config", help=f"read the cost processor's prices from this "
                                               f"pipeline.yaml (default: {DEFAULT_CONFIG} if it "
                                               "exists, else the bundled table alone)")
    parser.add_argument("--processor", help="which cost processor of the file (e.g. cost/eu), "
                                            "when it has several")
    parser.add_argument("--json", action="store_true", help="print the entry as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model == "update":
        return update(args)
    if args.file is not None:
        print(f"unexpected argument {args.file!r} (only `pricing update` takes a file)",
              file=sys.stderr)
        return 2
    try:
        config, origin, data_dir = _cost_config(args.config, args.processor)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    provider = provider_name(args.provider)
    try:
        table = config.table(data_dir)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 1
    found = table.resolve(provider, args.model)
    if found.price is None:
        print(f"no price for {args.model!r} (provider {provider or 'not given'}) in {origin}; "
              f"looked up as: {', '.join(found.tried)}", file=sys.stderr)
        return 1
    if args.json:
        print(msgspec.json.encode(_as_dict(found, provider, origin)).decode())
    else:
        print(_as_text(found, provider, origin))
    return 0


def _cost_config(path: str | None, processor: str | None) -> tuple[CostConfig, str, str]:
    """The cost config to price with, a description of where it came from, and the
    daemon's data directory."""
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return CostConfig(), "a cost processor's defaults (no pipeline.yaml here)", \
            _DEFAULT_DATA_DIR
    path = path or DEFAULT_CONFIG
    try:
        loaded = config_mod.load(path)
    except config_mod.ConfigError as e:
        raise ValueError(f"{path}: invalid configuration:\n" +
                         "\n".join(f"  {p}" for p in e.problems)) from e
    data_dir = loaded.service.data_dir
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
        return (CostConfig(), f"a cost processor's defaults ({path} has no cost processor)",
                data_dir)
    config = costs[chosen]
    assert isinstance(config, CostConfig)
    return config, f"{path} (processor {chosen})", data_dir


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
        f"config     {origin}",
        "USD per 1M tokens (cache rates default to the input rate, reasoning to the output "
        "rate, audio to the text rate of its side, one-hour cache writes to cache writes):",
        f"  {_rate_line(price.rates)}",
    ]
    for tier in price.tiers:
        lines.append(f"  above {tier.above:,} prompt tokens: {_rate_line(tier.rates)}")
    for name, service in price.service_tiers:
        lines.append(f"  served by the {name} tier: {_rate_line(service.rates)}")
        lines += [f"    above {tier.above:,} prompt tokens: {_rate_line(tier.rates)}"
                  for tier in service.tiers]
    if multiples := _multiples(price):
        lines.append(f"  token costs multiplied: {', '.join(multiples)}")
    if (fractions := price.batch_fractions) is not None:
        inp, out = fractions
        share = f"{inp:.0%}" if inp == out else f"input {inp:.0%}, output {out:.0%}"
        lines.append(f"  batch API: {share} of these")
    if price.units is not None:
        lines.append("USD per unit (image, minute of audio, 1M characters, second of video, "
                     "1,000 searches):")
        lines.append("  " + "  ".join(f"{name.replace('_', ' ')} {value}" for name, value in
                                      price.units.as_spec().items()))
    if not price.tokens:
        lines.append("  (no token prices: this entry bills units only)")
    return "\n".join(lines)


def _multiples(price: Price) -> list[str]:
    """What multiplies a call's token costs: where it was processed, how fast it ran."""
    return [*(f"processed in {region} x{m:g}" for region, m in price.data_residency),
            *([f"at a Vertex AI regional endpoint x{price.regional_endpoint:g}"]
              if price.regional_endpoint is not None else []),
            *(f"run at {speed} speed x{m:g}" for speed, m in price.speeds)]


def _as_dict(found: Resolution, provider: str | None, origin: str) -> dict[str, object]:
    price = found.price
    assert price is not None
    return {
        "model": found.model, "provider": provider, "entry": price.key,
        "origin": price.origin, "steps": found.steps, "source": price.source,
        "as_of": price.as_of,
        "table": origin, "usd_per_million_tokens": price.rates._asdict(),
        "tiers": [{"above": t.above, **t.rates._asdict()} for t in price.tiers],
        "service_tiers": {name: {**s.rates._asdict(), "tiers": [
            {"above": t.above, **t.rates._asdict()} for t in s.tiers]}
            for name, s in price.service_tiers},
        "data_residency": dict(price.data_residency),
        "regional_endpoint": price.regional_endpoint,
        "speeds": dict(price.speeds),
        "batch": price.batch,
        "batch_output": price.batch_output,
        "units_usd": price.units.as_spec() if price.units is not None else {},
        "tokens_priced": price.tokens,
    }


# --- pricing update -------------------------------------------------------------------

_DEFAULT_DATA_DIR = "./data"


class Malformed(ValueError):
    """A price map meterline refuses, with where."""


def update(args: argparse.Namespace) -> int:
    if args.file is None:
        print("usage: meterline pricing update FILE [--into PATH] [--prune] [--dry-run]",
              file=sys.stderr)
        return 2
    try:
        if args.into is not None:
            target = Path(args.into)
        else:
            target = updated_prices(_data_dir(args.config))
        newer = read_map(Path(args.file))
        current = read_map(target) if target.exists() else {}
    except (Malformed, OSError) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    merged, lines, counts = merge(current, newer, prune=args.prune)
    try:
        litellm_layer(merged, target.name)  # what the daemon will load must load
    except (ValueError, msgspec.ValidationError) as e:
        print(f"refused: {args.file}: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    verb = "would write" if args.dry_run else "wrote"
    print(f"{counts['added']} added, {counts['changed']} changed, {counts['removed']} "
          f"removed, {counts['kept']} kept (not in {args.file}"
          f"{'' if args.prune else '; --prune removes them'}), {counts['same']} unchanged; "
          f"{verb} {target}")
    if not args.dry_run and (lines or not target.exists()):
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, target)
    return 0


def _data_dir(path: str | None) -> str:
    if path is None and not os.path.exists(DEFAULT_CONFIG):
        return _DEFAULT_DATA_DIR
    try:
        return config_mod.load(path or DEFAULT_CONFIG).service.data_dir
    except config_mod.ConfigError as e:
        raise Malformed(f"{path or DEFAULT_CONFIG}: invalid configuration:\n" +
                        "\n".join(f"  {p}" for p in e.problems)) from e


def read_map(path: Path) -> dict[str, Any]:
    """A LiteLLM price map, checked: a JSON object of objects whose prices (`*cost*`
    keys) are finite non-negative numbers (or objects of them:
    `search_context_cost_per_query`)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Malformed(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})"
                        ) from None
    except RecursionError:
        raise Malformed(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise Malformed(f"{path}: expected a JSON object keyed by model name")
    for key, entry in data.items():
        if key == "sample_spec":
            continue
        if not isinstance(entry, dict):
            raise Malformed(f"{path}:{_line(text, key)}: {key}: expected an object, got "
                            f"{type(entry).__name__}")
        for field, value in entry.items():
            if "cost" in field and not _is_price(value):
                raise Malformed(f"{path}:{_line(text, key, field)}: {key}.{field}: expected "
                                f"a finite non-negative number, got {value!r}")
    return data


def _is_price(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_price(v) for v in value.values())
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return 0 <= float(value) < math.inf  # (NaN, infinity and 1e400 are no price)
    except OverflowError:  # an integer too large for a float
        return False


def _line(text: str, key: str, field: str | None = None) -> int:
    """The line of `key` (and of `field` after it) in the JSON text, 1-based."""
    at = text.find(json.dumps(key) + ":")
    if at < 0:
        at = text.find(json.dumps(key))
    if field is not None and at >= 0:
        found = text.find(json.dumps(field), at)
        at = found if found >= 0 else at
    return text.count("\n", 0, max(at, 0)) + 1


def _prices(entry: Any) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if "cost" in k} if isinstance(entry, dict) else {}


def merge(current: dict[str, Any], newer: dict[str, Any], prune: bool
          ) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    """The merged map, a line per change, and the counts of each kind of change."""
    merged = dict(current)
    added: list[str] = []
    changed: list[str] = []
    removed: list[str] = []
    counts = dict.fromkeys(("added", "changed", "removed", "kept", "same"), 0)
    for key, entry in newer.items():
        if key == "sample_spec":
            merged[key] = entry
            continue
        old = current.get(key)
        merged[key] = entry
        if old is None:
            counts["added"] += 1
            kind = f"{entry.get('litellm_provider', '?')}, {entry.get('mode', '?')}"
            added.append(f"added    {key}  ({kind})")
            continue
        before, after = _prices(old), _prices(entry)
        if before == after:
            counts["same"] += 1
            continue
        counts["changed"] += 1
        changes = [f"{f} {_show(before.get(f))} -> {_show(after.get(f))}"
                   for f in sorted(before.keys() | after.keys()) if before.get(f) != after.get(f)]
        changed.append(f"changed  {key}  {'; '.join(changes)}")
    for key in sorted(current.keys() - newer.keys()):
        if key == "sample_spec":
            continue
        if prune:
            del merged[key]
            counts["removed"] += 1
            removed.append(f"removed  {key}")
        else:
            counts["kept"] += 1
    return merged, added + changed + removed, counts


def _show(value: Any) -> str:
    return "none" if value is None else json.dumps(value)
