"""Price tables: what a model's tokens cost, where the figure comes from, and how a
reported model name finds its entry.

A table is built from layers, lowest precedence first: the bundled `prices.yaml`,
price files named in the config (meterline's own format, or LiteLLM's
`model_prices_and_context_window.json`), then the `prices` written in
`pipeline.yaml`. A model name resolves by trying ever less specific forms of it
(`us.anthropic.claude-sonnet-4-5-20250929-v1:0` down to `claude-sonnet-4-5`); the
first form that is priced wins. For a form, the highest layer with an entry of the
event's provider, or one written without a provider, gives the price; failing that,
the entry of the model's maker does (so Claude served by Vertex AI finds Anthropic's
price when no layer has a Vertex AI entry for it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from meterline.genai import provider_name

# Providers that make the models they serve: their price of a model stands for it when
# another provider (Vertex AI serving Claude, or an unnamed provider) has none. Clouds
# and hosts of open models (Bedrock, Azure, Groq, Together...) never do: their price is
# theirs alone.
MAKERS = frozenset({"openai", "anthropic", "gcp.gemini", "mistral_ai", "deepseek", "x_ai",
                    "cohere"})


class Rates(NamedTuple):
    """USD per million tokens. Every rate is filled in: a cache rate the table does
    not give is the input rate, a reasoning rate it does not give is the output rate."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    reasoning: float


class TierSpec(msgspec.Struct, forbid_unknown_fields=True):
    above: int  # prompt tokens (cache included) above which the whole call is priced so
    input: float | None = None  # the tier's input rate; default: the entry's
    output: float | None = None  # the tier's output rate; default: the entry's
    cache_read: float | None = None  # the tier's cache read rate; default: the entry's
    cache_write: float | None = None  # the tier's cache write rate; default: the entry's
    reasoning: float | None = None  # the tier's reasoning rate; default: the entry's


class PriceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One model's prices as written in YAML, USD per million tokens."""

    input: float  # USD per million input tokens
    output: float = 0.0  # embeddings have no output
    cache_read: float | None = None  # cached input tokens read; default: the input rate
    cache_write: float | None = None  # input tokens written to the cache; default: input
    reasoning: float | None = None  # reasoning tokens; default: the output rate
    tiers: list[TierSpec] = msgspec.field(default_factory=list)  # long-prompt prices
    batch: float | None = None  # batch-API price as a fraction of the standard one (0.5)
    batch_output: float | None = None  # the output's own fraction, when not `batch`
    source: str | None = None  # a key of the file's `sources`, or a URL
    as_of: str | None = None  # when this entry's figures were published, if not the file's

    def __post_init__(self) -> None:
        rates = [self.input, self.output, self.cache_read, self.cache_write, self.reasoning]
        for tier in self.tiers:
            rates += [tier.input, tier.output, tier.cache_read, tier.cache_write, tier.reasoning]
        if any(r is not None and r < 0 for r in rates):
            raise ValueError("prices must not be negative")
        for name in ("batch", "batch_output"):
            fraction = getattr(self, name)
            if fraction is not None and not 0 < fraction <= 1:
                raise ValueError(f"{name} is a fraction of the standard price in (0, 1], "
                                 f"got {fraction}")
        if any(t.above <= 0 for t in self.tiers):
            raise ValueError("a tier's `above` is a positive number of prompt tokens")


class PriceFileSpec(msgspec.Struct, forbid_unknown_fields=True):
    """meterline's price file format (the bundled `prices.yaml` is one)."""

    as_of: str
    models: dict[str, PriceSpec]
    currency: str = "USD"
    unit: str = "per 1M tokens"
    sources: dict[str, str] = msgspec.field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        if self.currency != "USD":
            raise ValueError(f"prices must be in USD, got {self.currency}")
        if self.unit != "per 1M tokens":
            raise ValueError(f"prices must be per 1M tokens, got {self.unit!r}")


@dataclass(frozen=True)
class Tier:
    above: int
    rates: Rates


@dataclass(frozen=True)
class Price:
    """One resolved table entry."""

    key: str  # "openai/gpt-4o", or "gpt-4o" when written without a provider
    origin: str  # "bundled", a price file's name, or "config"
    source: str
    as_of: str | None
    rates: Rates
    tiers: tuple[Tier, ...] = ()  # ascending by `above`
    batch: float | None = None  # batch-API fraction of the input rates (and of the output's
    batch_output: float | None = None  # unless this one is given)

    @property
    def batch_fractions(self) -> tuple[float, float] | None:
        """(input, output) fractions of the standard price for batch-API calls."""
        if self.batch is None and self.batch_output is None:
            return None
        inp = 1.0 if self.batch is None else self.batch
        return inp, inp if self.batch_output is None else self.batch_output

    @property
    def ref(self) -> str:
        """What the event's `pricing_ref` says (refined by `Priced.ref`)."""
        return f"{self.key}@{self.origin}"

    def tier_for(self, prompt_tokens: int) -> Tier | None:
        found = None
        for tier in self.tiers:
            if prompt_tokens > tier.above:
                found = tier
        return found


def make_price(key: str, spec: PriceSpec, origin: str, source: str,
               as_of: str | None) -> Price:
    base = _rates(spec.input, spec.output, spec.cache_read, spec.cache_write, spec.reasoning)
    tiers = tuple(sorted(
        (Tier(t.above, _rates(
            _or(t.input, base.input), _or(t.output, base.output),
            # a tier without its own cache rate scales the base one with the input rate
            _or(t.cache_read, _scaled(base.cache_read, base.input, t.input)),
            _or(t.cache_write, _scaled(base.cache_write, base.input, t.input)),
            _or(t.reasoning, _scaled(base.reasoning, base.output, t.output))))
         for t in spec.tiers), key=lambda t: t.above))
    return Price(key, origin, source, spec.as_of or as_of, base, tiers, spec.batch,
                 spec.batch_output)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _scaled(rate: float, base: float, new: float | None) -> float:
    return rate if new is None or base == 0 else rate * new / base


def _rates(input_: float, output: float, cache_read: float | None, cache_write: float | None,
           reasoning: float | None) -> Rates:
    return Rates(input_, output, _or(cache_read, input_), _or(cache_write, input_),
                 _or(reasoning, output))


# --- model names ----------------------------------------------------------------------

_BEDROCK_REGION = re.compile(r"^(?:us-gov|us|eu|apac|au|ca|jp|global)\.(?=[a-z0-9-]+\.)")
_VERSION = re.compile(r"(?:-v\d+:\d+|-\d+:\d+|:\d+)$")  # Bedrock: -v1:0, -1:0
_VENDOR = re.compile(r"^(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|openai|qwen|"
                     r"writer|google|moonshot|minimax)\.")
_DATES = (
    (re.compile(r"-\d{4}-\d{2}-\d{2}$"), "snapshot date"),  # gpt-4o-2024-08-06
    (re.compile(r"-20\d{6}$"), "snapshot date"),  # claude-sonnet-4-5-20250929
    (re.compile(r"-\d{2}-20\d{2}$"), "snapshot date"),  # command-a-03-2025
    (re.compile(r"-\d{4}$"), "snapshot suffix"),  # gpt-4-0613, mistral-large-2411
    (re.compile(r"-\d{3}$"), "version suffix"),  # gemini-2.0-flash-001
)


def name_forms(model: str) -> list[tuple[str, str]]:
    """The forms a reported model name is looked up under, most specific first, each
    with what was dropped to get it."""
    name = model.strip().lower()
    forms = [(name, "as reported")]

    def drop(new: str, why: str) -> str:
        if new and new != forms[-1][0]:
            forms.append((new, why))
        return new

    while "/" in name:  # openai/gpt-4o, models/gemini-2.5-pro, groq/openai/gpt-oss-120b
        head, _, rest = name.partition("/")
        name = drop(rest, f"dropped prefix '{head}/'")
    if "@" in name:  # Vertex AI: claude-sonnet-4-5@20250929
        head, _, tail = name.partition("@")
        name = drop(head, f"dropped version '@{tail}'")
    if m := _BEDROCK_REGION.match(name):
        name = drop(name[m.end():], f"dropped Bedrock inference profile '{m.group()}'")
    if m := _VERSION.search(name):
        name = drop(name[:m.start()], f"dropped version suffix '{m.group()}'")
    if m := _VENDOR.match(name):
        name = drop(name[m.end():], f"dropped Bedrock vendor '{m.group()}'")
    for pattern, what in _DATES:
        if m := pattern.search(name):
            name = drop(name[:m.start()], f"dropped {what} '{m.group()}'")
            break
    if name.endswith("-latest"):
        drop(name.removesuffix("-latest"), "dropped '-latest'")
    return forms


# --- layers and the table -------------------------------------------------------------

@dataclass
class Layer:
    """The entries of one price source."""

    name: str
    by_provider: dict[tuple[str, str], Price] = field(default_factory=dict)
    any_provider: dict[str, Price] = field(default_factory=dict)
    first_party: dict[str, Price] = field(default_factory=dict)

    def add(self, provider: str | None, model: str, price: Price) -> None:
        model = model.lower()
        if provider is None:
            self.any_provider[model] = price
            return
        self.by_provider[(provider, model)] = price
        if provider in MAKERS:
            self.first_party.setdefault(model, price)

    def __len__(self) -> int:
        return len(self.by_provider) + len(self.any_provider)


class Resolution(NamedTuple):
    price: Price | None
    model: str  # the reported name that was looked up
    tried: list[str]  # its forms, up to the one that matched
    steps: list[str]  # how the name became the last of them


class PriceTable:
    def __init__(self, layers: list[Layer], aliases: dict[str, str] | None = None) -> None:
        self.layers = list(reversed(layers))  # highest precedence first
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def resolve(self, provider: str | None, model: str) -> Resolution:
        steps: list[str] = []
        looked_up = model
        if (target := self.aliases.get(model.strip().lower())) is not None:
            steps.append(f"alias '{model}' -> '{target}'")
            looked_up = target
        tried: list[str] = []
        for form, why in name_forms(looked_up):
            if why != "as reported":
                steps.append(why)
            tried.append(form)
            if (price := self._find(provider, form)) is not None:
                return Resolution(price, model, tried, steps)
        return Resolution(None, model, tried, steps)

    def _find(self, provider: str | None, model: str) -> Price | None:
        """An entry for this provider, or for any provider, from the highest layer that
        has one; only then the maker's entry (a price file's OpenAI gpt-4o must not hide
        the bundled Azure one)."""
        layers = self.layers
        for layer in layers:
            if provider is not None and (
                    found := layer.by_provider.get((provider, model))) is not None:
                return found
            if (found := layer.any_provider.get(model)) is not None:
                return found
        for layer in layers:
            if (found := layer.first_party.get(model)) is not None:
                return found
        return None


# --- loading --------------------------------------------------------------------------

def _split_key(key: str) -> tuple[str | None, str]:
    """`openai/gpt-4o` -> ('openai', 'gpt-4o'); a key without a provider -> (None, key)."""
    head, sep, rest = key.partition("/")
    return (head, rest) if sep else (None, key)


def meterline_layer(spec: PriceFileSpec, origin: str, default_source: str) -> Layer:
    """Entries name their source by a key of `sources` or a URL; without one, the
    source of their provider applies, else `default_source`."""
    layer = Layer(origin)
    for key, entry in spec.models.items():
        provider, model = _split_key(key)
        source_name = entry.source or provider or ""
        source = spec.sources.get(source_name, entry.source or default_source)
        layer.add(provider, model, make_price(key, entry, origin, source, spec.as_of or None))
    return layer


def config_layer(prices: dict[str, PriceSpec]) -> Layer:
    """The `prices` written in pipeline.yaml: negotiated or self-hosted prices."""
    return meterline_layer(PriceFileSpec(as_of="", models=prices), "config",
                           "pipeline.yaml (processors.cost.prices)")


_LITELLM_RATE = {
    "input_cost_per_token": "input", "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read", "cache_creation_input_token_cost": "cache_write",
    "output_cost_per_reasoning_token": "reasoning",
}
_LITELLM_TIER = re.compile(r"^(input_cost_per_token|output_cost_per_token|"
                           r"cache_read_input_token_cost|cache_creation_input_token_cost)"
                           r"_above_(\d+)k_tokens$")


def litellm_provider(raw: str) -> str | None:
    """LiteLLM's provider families (`bedrock_converse`, `vertex_ai-anthropic_models`)
    to `gen_ai.provider.name`."""
    if raw.startswith("vertex_ai"):
        raw = "vertex_ai"
    elif raw.startswith("bedrock"):
        raw = "bedrock"
    elif raw.startswith("cohere"):
        raw = "cohere"
    return provider_name(raw)


def litellm_layer(data: Any, origin: str) -> Layer:
    """A layer from LiteLLM's `model_prices_and_context_window.json` (USD per token;
    `sample_spec` and entries priced per image, second or call are skipped)."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object keyed by model name")
    layer = Layer(origin)
    for key, entry in data.items():
        if key == "sample_spec" or not isinstance(entry, dict):
            continue
        per_token = {f: v for f, v in entry.items() if isinstance(v, int | float)
                     and not isinstance(v, bool)}
        if "input_cost_per_token" not in per_token:
            continue
        fields = {name: per_token[f] * 1e6 for f, name in _LITELLM_RATE.items() if f in per_token}
        tiers: dict[int, dict[str, float]] = {}
        for f, value in per_token.items():
            if m := _LITELLM_TIER.match(f):
                tiers.setdefault(int(m.group(2)) * 1000, {})[
                    _LITELLM_RATE[m.group(1)]] = value * 1e6
        spec = msgspec.convert({
            **fields,
            "tiers": [{"above": above, **rates} for above, rates in sorted(tiers.items())],
            "batch": _fraction(per_token.get("input_cost_per_token_batches"),
                               per_token["input_cost_per_token"]),
            "batch_output": _fraction(per_token.get("output_cost_per_token_batches"),
                                      per_token.get("output_cost_per_token")),
            "source": entry.get("source") if isinstance(entry.get("source"), str) else None,
        }, PriceSpec)
        raw_provider = entry.get("litellm_provider")
        provider = litellm_provider(raw_provider) if isinstance(raw_provider, str) else None
        model = key
        head, sep, rest = key.partition("/")
        if sep and raw_provider and (head == raw_provider or litellm_provider(head) == provider):
            model = rest
        ref = f"{provider}/{model}" if provider else model
        layer.add(provider, model,
                  make_price(ref, spec, origin, spec.source or f"{origin}: {key}", None))
    return layer


def _fraction(batch: float | None, standard: float | None) -> float | None:
    """A batch price as a fraction of the standard one (None when it is not a discount)."""
    return batch / standard if batch and standard and batch <= standard else None


def load_file(path: str) -> tuple[Layer, str]:
    """A price file, in meterline's format (YAML or JSON with `as_of` and `models`) or
    LiteLLM's; returns its layer and a digest of its content (to notice a change)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read price file {path}: {e.strerror}") from e
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw) if p.suffix == ".json" else msgspec.yaml.decode(raw)
    except (ValueError, msgspec.DecodeError) as e:
        raise ValueError(f"price file {path} is not valid {p.suffix[1:] or 'YAML'}: {e}") from e
    try:
        if isinstance(data, dict) and "models" in data and "as_of" in data:
            spec = msgspec.convert(data, PriceFileSpec)
            return meterline_layer(spec, p.name, f"price file {path}"), digest
        return litellm_layer(data, p.name), digest
    except (msgspec.ValidationError, ValueError) as e:
        raise ValueError(f"price file {path}: {e}") from e


@cache
def bundled() -> tuple[PriceFileSpec, Layer]:
    """The table shipped with meterline (`prices.yaml` beside this module)."""
    raw = resources.files(__package__).joinpath("prices.yaml").read_bytes()
    spec = msgspec.yaml.decode(raw, type=PriceFileSpec)
    return spec, meterline_layer(spec, "bundled", "meterline's bundled table")
