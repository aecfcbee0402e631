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
import math
import re
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import msgspec

from meterline.genai import provider_name

# Providers that make the models they serve: their price of a model stands for it when
# another provider (Vertex AI serving Claude, or an unnamed provider) has none. Clouds
# and hosts of open models (Bedrock, Azure, Groq, Together...) never do: their price is
# theirs alone.
MAKERS = frozenset({"openai", "anthropic", "gcp.gemini", "mistral_ai", "deepseek", "x_ai",
                    "cohere", "elevenlabs", "stability_ai", "black_forest_labs", "runway",
                    "luma"})
# The model of a provider-wide entry (`vllm/*`): the price of that provider's models that
# no entry names (self-hosted fleets: one rate, whatever model a team deploys).
ANY_MODEL: Final = "*"
T = TypeVar("T")


class Rates(NamedTuple):
    """USD per million tokens. Every rate is filled in: a cache rate the table does
    not give is the input rate, a reasoning rate it does not give is the output rate, an
    audio rate it does not give is the text rate of its side, a one-hour cache write
    rate it does not give is the (five-minute) cache write rate."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    reasoning: float
    input_audio: float
    output_audio: float
    cache_write_1h: float


class TierSpec(msgspec.Struct, forbid_unknown_fields=True):
    above: int  # prompt tokens (cache included) above which the whole call is priced so
    input: float | None = None  # the tier's input rate; default: the entry's
    output: float | None = None  # the tier's output rate; default: the entry's
    cache_read: float | None = None  # the tier's cache read rate; default: the entry's
    cache_write: float | None = None  # the tier's cache write rate; default: the entry's
    reasoning: float | None = None  # the tier's reasoning rate; default: the entry's
    cache_write_1h: float | None = None  # the tier's one-hour cache write rate; default:
    # the entry's


class ServiceTierSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The rates of a service tier (OpenAI's `flex` and `priority`: the tier that served
    the call, `service_tier`). A rate it does not give is the entry's own; `tiers` are its
    long-prompt rates, at the entry's thresholds (a rate they do not give is the entry's
    tier's, else this tier's)."""

    input: float | None = None  # USD per million input tokens; default: the entry's
    output: float | None = None  # USD per million output tokens; default: the entry's
    cache_read: float | None = None  # cached input tokens read; default: the entry's
    cache_write: float | None = None  # input tokens written to the cache; default: the entry's
    reasoning: float | None = None  # default: this tier's output rate if it gives one
    input_audio: float | None = None  # audio input tokens; default: the entry's
    tiers: list[TierSpec] = msgspec.field(default_factory=list)  # its long-prompt prices


class PriceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One model's prices as written in YAML: tokens in USD per million, and the units a
    model bills besides tokens (images, audio, video, characters, searches) in USD."""

    input: float | None = None  # USD per million input tokens; none: it bills no tokens
    output: float = 0.0  # embeddings have no output
    cache_read: float | None = None  # cached input tokens read; default: the input rate
    cache_write: float | None = None  # input tokens written to the cache; default: input
    cache_write_1h: float | None = None  # written for an hour (Anthropic); default: cache_write
    reasoning: float | None = None  # reasoning tokens; default: the output rate
    input_audio: float | None = None  # audio input tokens; default: the input rate
    output_audio: float | None = None  # audio output tokens; default: the output rate
    tiers: list[TierSpec] = msgspec.field(default_factory=list)  # long-prompt prices
    # by service tier (flex, priority): the rates of a call that tier served
    service_tiers: dict[str, ServiceTierSpec] = msgspec.field(default_factory=dict)
    # multipliers of a call's token costs: by region, for OpenAI's data residency
    # (`eu.api.openai.com`: {eu: 1.1}); at a Vertex AI regional endpoint (not `global`)
    data_residency: dict[str, float] = msgspec.field(default_factory=dict)  # by region (eu, us)
    regional_endpoint: float | None = None  # a Vertex AI location other than `global`
    # multipliers of a call's token costs by the speed it ran at (Anthropic's fast mode:
    # {fast: 2}); the standard speed is the standard price
    speeds: dict[str, float] = msgspec.field(default_factory=dict)
    batch: float | None = None  # batch-API price as a fraction of the standard one (0.5)
    batch_output: float | None = None  # the output's own fraction, when not `batch`
    image: float | None = None  # USD per image generated, whatever its size and quality
    images: dict[str, float] = msgspec.field(default_factory=dict)  # USD per image, by
        # `size/quality` (1024x1792/hd), `size` or `quality`; `image` for the others
    audio_input_minute: float | None = None  # USD per minute of audio transcribed
    audio_output_minute: float | None = None  # USD per minute of audio synthesised
    characters: float | None = None  # USD per million characters synthesised into speech
    video_second: float | None = None  # USD per second of video generated
    searches: float | None = None  # USD per 1,000 searches (rerank search units, web search)
    source: str | None = None  # a key of the file's `sources`, or a URL
    as_of: str | None = None  # when this entry's figures were published, if not the file's

    def __post_init__(self) -> None:
        rates = [self.input, self.output, self.cache_read, self.cache_write, self.reasoning,
                 self.input_audio, self.output_audio, self.cache_write_1h, *self.units(),
                 *self.images.values()]
        for service in self.service_tiers.values():
            rates += [service.input, service.output, service.cache_read, service.cache_write,
                      service.reasoning, service.input_audio]
        for tier in [*self.tiers, *(t for s in self.service_tiers.values() for t in s.tiers)]:
            rates += [tier.input, tier.output, tier.cache_read, tier.cache_write, tier.reasoning,
                      tier.cache_write_1h]
        if any(r is not None and not (0 <= r < math.inf) for r in rates):
            raise ValueError("prices must be finite numbers, not negative")
        if self.input is None and not self.images and all(u is None for u in self.units()):
            raise ValueError("an entry gives `input` (USD per 1M tokens) or a unit price "
                             "(image, images, audio_input_minute, audio_output_minute, "
                             "characters, video_second, searches)")
        for name in ("batch", "batch_output"):
            fraction = getattr(self, name)
            if fraction is not None and not 0 < fraction <= 1:
                raise ValueError(f"{name} is a fraction of the standard price in (0, 1], "
                                 f"got {fraction}")
        if any(t.above <= 0 for t in self.tiers):
            raise ValueError("a tier's `above` is a positive number of prompt tokens")
        uplifts = [*self.data_residency.values(), self.regional_endpoint]
        if any(u is not None and not 0 < u <= 10 for u in uplifts):
            raise ValueError("data_residency and regional_endpoint are multipliers of the "
                             "token costs in (0, 10] (1.1: 10% more)")
        if any(not 0 < m <= 10 for m in self.speeds.values()):
            raise ValueError("speeds are multipliers of the token costs in (0, 10] (2: twice "
                             "the standard price)")

    def units(self) -> tuple[float | None, ...]:
        return (self.image, self.audio_input_minute, self.audio_output_minute, self.characters,
                self.video_second, self.searches)


class PriceFileSpec(msgspec.Struct, forbid_unknown_fields=True):
    """meterline's price file format (the bundled `prices.yaml` is one)."""

    as_of: str
    models: dict[str, PriceSpec]
    currency: str = "USD"
    unit: str = "per 1M tokens"
    sources: dict[str, str] = msgspec.field(default_factory=dict)
    # USD per 1,000 web searches by provider: the price of every entry of that provider
    # that prices tokens and gives no `searches` of its own (its search tool's price)
    searches: dict[str, float] = msgspec.field(default_factory=dict)
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
class ServiceTier:
    """The rates of a call a service tier served, and its long-prompt tiers."""

    rates: Rates
    tiers: tuple[Tier, ...] = ()


# What a provider answers as the tier that served a call, to the price table's name of
# it (LiteLLM's `fast` is billed as `priority`; Gemini's `trafficType` as LiteLLM reads
# it); `default`, `auto`, `standard`, `scale`, `on_demand` and the others are the standard
# rates.
SERVICE_TIERS: Final = {"flex": "flex", "priority": "priority", "fast": "priority",
                        "on_demand_priority": "priority", "on_demand_flex": "flex"}
# A region as a provider names where it ran a call (Anthropic's `inference_geo`: `us`)
_REGION: Final = re.compile(r"[A-Za-z]{2}")
# OpenAI's regional hosts (projects with data residency must call them), by region
_OPENAI_REGIONAL_HOSTS: Final = {"eu.api.openai.com": "eu", "us.api.openai.com": "us"}
# A Vertex AI location: in the path called (`/locations/us-east5/`), or the host's
_VERTEX_LOCATION: Final = re.compile(r"/locations/([^/]+)")
_VERTEX_HOST: Final = re.compile(r"([a-z0-9-]+)-aiplatform\.googleapis\.com")


def size_key(size: str) -> str:
    """`1024x1024`, `1024-x-1024` (LiteLLM's keys), `1024X1024` -> `1024x1024`."""
    return size.strip().lower().replace("-x-", "x").replace(" ", "")


@dataclass(frozen=True)
class Units:
    """What a model bills besides tokens, USD per one unit (None: not priced)."""

    image: float | None = None  # an image whose size and quality `images` does not list
    images: tuple[tuple[str, float], ...] = ()  # by `size/quality`, `size` or `quality`
    audio_input_second: float | None = None
    audio_output_second: float | None = None
    character: float | None = None
    video_second: float | None = None
    search: float | None = None

    @classmethod
    def of(cls, spec: PriceSpec, searches: float | None = None) -> Units | None:
        per_1k = spec.searches if spec.searches is not None else searches
        units = cls(spec.image, tuple(sorted((_image_key(k), v) for k, v in spec.images.items())),
                    _per(spec.audio_input_minute, 60), _per(spec.audio_output_minute, 60),
                    _per(spec.characters, 1e6), spec.video_second, _per(per_1k, 1000))
        return None if units == NO_UNITS else units

    def image_price(self, size: str | None, quality: str | None) -> float | None:
        """The price of one image: by size and quality, by size, by quality, else `image`."""
        by = dict(self.images)
        size = size_key(size) if size else None
        quality = quality.strip().lower() if quality else None
        for key in (f"{size}/{quality}" if size and quality else None, size, quality):
            if key is not None and key in by:
                return by[key]
        return self.image

    def as_spec(self) -> dict[str, Any]:
        """The unit prices as `PriceSpec` writes them (per minute, per 1M characters...)."""
        spec = {"image": self.image, "images": dict(self.images) or None,
                "audio_input_minute": _times(self.audio_input_second, 60),
                "audio_output_minute": _times(self.audio_output_second, 60),
                "characters": _times(self.character, 1e6), "video_second": self.video_second,
                "searches": _times(self.search, 1000)}
        return {k: v for k, v in spec.items() if v is not None}


NO_UNITS: Final = Units()


def _image_key(key: str) -> str:
    size, sep, quality = key.partition("/")
    return f"{size_key(size)}/{quality.strip().lower()}" if sep else (
        size_key(key) if "x" in key.lower() and key[:1].isdigit() else key.strip().lower())


def _per(value: float | None, count: float) -> float | None:
    return None if value is None else value / count


def _times(value: float | None, count: float) -> float | None:
    return None if value is None else round(value * count, 12)


@dataclass(frozen=True)
class Price:
    """One resolved table entry."""

    key: str  # "openai/gpt-4o", or "gpt-4o" when written without a provider
    origin: str  # "bundled", a price file's name, or "config"
    source: str
    as_of: str | None
    rates: Rates
    tiers: tuple[Tier, ...] = ()  # ascending by `above`
    service_tiers: tuple[tuple[str, ServiceTier], ...] = ()  # by name: flex, priority
    data_residency: tuple[tuple[str, float], ...] = ()  # token cost multipliers by region
    regional_endpoint: float | None = None  # token cost multiplier off Vertex AI's global
    batch: float | None = None  # batch-API fraction of the input rates (and of the output's
    batch_output: float | None = None  # unless this one is given)
    units: Units | None = None  # what it bills besides tokens
    tokens: bool = True  # it bills tokens (false: an entry of unit prices only)
    speeds: tuple[tuple[str, float], ...] = ()  # token cost multipliers by speed (fast)

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

    def uplift(self, region: Any, *places: Any) -> tuple[str, float] | None:
        """What a call's token costs are multiplied by where it was processed, and a name
        for it: the `data_residency` region the provider said it ran in (`region`:
        Anthropic's `inference_geo`, `us`) or that an OpenAI regional host says
        (`eu.api.openai.com`), a Vertex AI regional endpoint (a location other than
        `global`). `places` are what the event says of where the call went (URLs, hosts,
        the path called: its `upstream`, `server.address`, `endpoint`). None: the
        standard price."""
        if not (self.data_residency or self.regional_endpoint):
            return None
        if isinstance(region, str) and (found := self._residency(region.lower())):
            return found
        for place in places:
            if not isinstance(place, str) or not place:
                continue
            host_region, regional = _processed_at(place)
            if host_region and (found := self._residency(host_region)):
                return found
            if regional and self.regional_endpoint is not None:
                return "regional", self.regional_endpoint
        return None

    def _residency(self, region: str) -> tuple[str, float] | None:
        return _named(self.data_residency, region)

    def speed(self, name: Any) -> tuple[str, float] | None:
        """What a call's token costs are multiplied by for the speed it ran at (`name`, as
        the provider answered it: Anthropic's `usage.speed`), and its name; None: the
        standard price."""
        if not self.speeds or not isinstance(name, str):
            return None
        return _named(self.speeds, name.strip().lower())

    def service_tier(self, name: str | None) -> tuple[str, ServiceTier] | None:
        """The rates of the service tier called `name` (as a provider answers it), if the
        entry prices it apart."""
        wanted = SERVICE_TIERS.get(name.strip().lower()) if name else None
        return _named(self.service_tiers, wanted) if wanted else None


def _named(pairs: tuple[tuple[str, T], ...], name: str) -> tuple[str, T] | None:
    """The pair of `pairs` (name, value) called `name`: an entry's few tiers, regions or
    speeds, where a scan costs less than a dict per entry."""
    return next((pair for pair in pairs if pair[0] == name), None)


@lru_cache(maxsize=1024)  # (a daemon's upstreams, hosts and paths repeat)
def _processed_at(place: str) -> tuple[str | None, bool]:
    """Where a URL, host or path says a call was processed: the OpenAI data-residency
    region of its host (or None), and whether it names a Vertex AI location other than
    `global`."""
    try:
        where = urlsplit(place if "://" in place or place[0] == "/" else f"//{place}")
    except ValueError:  # ("http://[::1": a source's value, not a URL)
        return None, False
    host = (where.hostname or "").lower()
    location = _VERTEX_LOCATION.search(where.path) or _VERTEX_HOST.fullmatch(host)
    return _OPENAI_REGIONAL_HOSTS.get(host), bool(location and location[1] != "global")


def tier_for(tiers: tuple[Tier, ...], prompt_tokens: int) -> Tier | None:
    """The highest of `tiers` (ascending) whose threshold the prompt passes."""
    found = None
    for tier in tiers:
        if prompt_tokens > tier.above:
            found = tier
    return found


def make_price(key: str, spec: PriceSpec, origin: str, source: str,
               as_of: str | None, searches: float | None = None) -> Price:
    """A tier keeps the entry's audio rates, as LiteLLM's do (an entry without one bills
    audio at the tier's text rates)."""
    base = _rates(_or(spec.input, 0.0), spec.output, spec.cache_read, spec.cache_write,
                  spec.reasoning, spec.input_audio, spec.output_audio, spec.cache_write_1h)
    tiers = tuple(sorted(
        (Tier(t.above, _rates(
            _or(t.input, base.input), _or(t.output, base.output),
            # a tier without its own cache rate scales the base one with the input rate
            _or(t.cache_read, _scaled(base.cache_read, base.input, t.input)),
            _or(t.cache_write, _scaled(base.cache_write, base.input, t.input)),
            _or(t.reasoning, _scaled(base.reasoning, base.output, t.output)),
            spec.input_audio, spec.output_audio,
            t.cache_write_1h if t.cache_write_1h is not None else spec.cache_write_1h))
         for t in spec.tiers), key=lambda t: t.above))
    services = tuple(sorted((name, _service_tier(spec, service))
                            for name, service in spec.service_tiers.items()))
    return Price(key, origin, source, spec.as_of or as_of, base, tiers, services,
                 tuple(sorted(spec.data_residency.items())), spec.regional_endpoint, spec.batch,
                 spec.batch_output, Units.of(spec, searches), spec.input is not None,
                 tuple(sorted(spec.speeds.items())))


def _service_tier(spec: PriceSpec, service: ServiceTierSpec) -> ServiceTier:
    """A service tier's rates, as LiteLLM reads them: a rate the tier does not give is the
    entry's own (reasoning: the tier's output rate when it gives one), and a long prompt
    takes, rate by rate, the tier's own long-prompt rate, else the entry's, else the
    tier's flat one. The one-hour cache write rate is the entry's."""
    rates = _rates(_or(service.input, _or(spec.input, 0.0)), _or(service.output, spec.output),
                   _or(service.cache_read, spec.cache_read),
                   _or(service.cache_write, spec.cache_write),
                   service.reasoning if service.reasoning is not None else (
                       service.output if service.output is not None else spec.reasoning),
                   _or(service.input_audio, spec.input_audio), spec.output_audio,
                   spec.cache_write_1h)
    own = {t.above: t for t in service.tiers}
    tiers = []
    for standard in sorted(spec.tiers, key=lambda t: t.above):
        mine = own.get(standard.above, TierSpec(standard.above))

        def rate(kind: str, flat: float, tier: TierSpec = mine,
                 std: TierSpec = standard) -> float:
            return next((v for v in (getattr(tier, kind), getattr(std, kind)) if v is not None),
                        flat)

        output = rate("output", rates.output)
        reasoning = next((r for r in (mine.reasoning, service.reasoning) if r is not None), (
            output if service.output is not None or spec.reasoning is None else spec.reasoning))
        tiers.append(Tier(standard.above, rates._replace(
            input=rate("input", rates.input), output=output,
            cache_read=rate("cache_read", rates.cache_read),
            cache_write=rate("cache_write", rates.cache_write), reasoning=reasoning,
            output_audio=_or(spec.output_audio, output),
            cache_write_1h=rate("cache_write_1h", rates.cache_write_1h))))
    return ServiceTier(rates, tuple(tiers))


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _scaled(rate: float, base: float, new: float | None) -> float:
    return rate if new is None or base == 0 else rate * new / base


def _rates(input_: float, output: float, cache_read: float | None, cache_write: float | None,
           reasoning: float | None, input_audio: float | None,
           output_audio: float | None, cache_write_1h: float | None) -> Rates:
    write = _or(cache_write, input_)
    return Rates(input_, output, _or(cache_read, input_), write, _or(reasoning, output),
                 _or(input_audio, input_), _or(output_audio, output), _or(cache_write_1h, write))


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
    provider_wide: dict[str, Price] = field(default_factory=dict)  # `vllm/*`

    def add(self, provider: str | None, model: str, price: Price) -> None:
        model = model.lower()
        if model == ANY_MODEL:
            if provider is None:
                raise ValueError(f"'{ANY_MODEL}' prices every model of one provider: write "
                                 f"it as `provider/{ANY_MODEL}` (such as vllm/{ANY_MODEL})")
            self.provider_wide[provider] = price
            return
        if provider is None:
            self.any_provider[model] = price
            return
        self.by_provider[(provider, model)] = price
        if provider in MAKERS:
            self.first_party.setdefault(model, price)

    def __len__(self) -> int:
        return len(self.by_provider) + len(self.any_provider) + len(self.provider_wide)


class Resolution(NamedTuple):
    price: Price | None
    model: str  # the reported name that was looked up
    tried: list[str]  # its forms, up to the one that matched
    steps: list[str]  # how the name became the last of them


class PriceTable:
    def __init__(self, layers: list[Layer], aliases: dict[str, str] | None = None) -> None:
        self.layers = list(reversed(layers))  # highest precedence first
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def resolve(self, provider: str | None, *models: str) -> Resolution:
        """The entry of the first of `models` (each looked up in all its forms, most
        specific first) that has one. A form's entry is this provider's or any
        provider's, from the highest layer that has one; only then the maker's (a price
        file's OpenAI gpt-4o must not hide the bundled Azure one). A provider with a
        `provider/*` entry has a price of its own for every model: an entry naming the
        model wins over it, a maker's does not (a vLLM server's gpt-oss is not billed at
        OpenAI's rates)."""
        wide = next((found for layer in self.layers if provider is not None
                     and (found := layer.provider_wide.get(provider)) is not None), None)
        tried: list[str] = []
        steps: list[str] = []
        for model in models:
            for form, steps in self._forms(model):
                tried.append(form)
                price = self._named(provider, form) or (None if wide else self._maker(form))
                if price is not None:
                    return Resolution(price, model, tried, steps)
        reported = models[0] if models else ""
        if wide is not None:
            return Resolution(wide, reported, tried,
                              [f"no entry names it: the entry of every {provider} model"])
        return Resolution(None, reported, tried, steps)

    def _forms(self, model: str) -> list[tuple[str, list[str]]]:
        """The names `model` is looked up under (its alias's, if it has one), each with
        the steps that led to it."""
        steps: list[str] = []
        looked_up = model
        if (target := self.aliases.get(model.strip().lower())) is not None:
            steps.append(f"alias '{model}' -> '{target}'")
            looked_up = target
        forms = []
        for form, why in name_forms(looked_up):
            if why != "as reported":
                steps = [*steps, why]
            forms.append((form, steps))
        return forms

    def _named(self, provider: str | None, model: str) -> Price | None:
        """An entry naming `model` for this provider, or for any provider, from the
        highest layer that has one."""
        for layer in self.layers:
            if provider is not None and (
                    found := layer.by_provider.get((provider, model))) is not None:
                return found
            if (found := layer.any_provider.get(model)) is not None:
                return found
        return None

    def _maker(self, model: str) -> Price | None:
        """The entry of the provider that makes `model`, from the highest layer."""
        return next((found for layer in self.layers
                     if (found := layer.first_party.get(model)) is not None), None)


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
        searches = spec.searches.get(provider or "") if entry.input is not None else None
        layer.add(provider, model, make_price(key, entry, origin, source, spec.as_of or None,
                                              searches))
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
# audio token rates: LiteLLM has no tier of them (`_above_Nk_tokens`), nor does a tier here
_LITELLM_AUDIO = {"input_cost_per_audio_token": "input_audio",
                  "output_cost_per_audio_token": "output_audio"}
_LITELLM_1H = "cache_creation_input_token_cost_above_1hr"  # a one-hour cache write
_LITELLM_TIER = re.compile(r"^(input_cost_per_token|output_cost_per_token|"
                           r"cache_read_input_token_cost|cache_creation_input_token_cost|"
                           r"cache_creation_input_token_cost_above_1hr)"
                           r"_above_(\d+)k_tokens(?:_(flex|priority))?$")
_LITELLM_TIER_RATE = {**_LITELLM_RATE, _LITELLM_1H: "cache_write_1h"}
# a service tier's rates (`input_cost_per_token_priority`): LiteLLM's names of them
_LITELLM_SERVICE = re.compile(r"^(input_cost_per_token|output_cost_per_token|"
                              r"cache_read_input_token_cost|cache_creation_input_token_cost|"
                              r"output_cost_per_reasoning_token|input_cost_per_audio_token)"
                              r"_(flex|priority)$")
_LITELLM_SERVICE_RATE = {**_LITELLM_RATE, "input_cost_per_audio_token": "input_audio"}


def litellm_provider(raw: str) -> str | None:
    """LiteLLM's provider families (`bedrock_converse`, `vertex_ai-anthropic_models`)
    to `gen_ai.provider.name`. `bedrock_mantle` (Bedrock's OpenAI-compatible endpoint) is
    no family of `bedrock`: LiteLLM calls it under that name, and prices the same model
    ids apart (`openai.gpt-oss-20b`)."""
    if raw.startswith("vertex_ai"):
        raw = "vertex_ai"
    elif raw in ("bedrock", "bedrock_converse"):
        raw = "bedrock"
    elif raw.startswith("cohere"):
        raw = "cohere"
    return provider_name(raw)


_LITELLM_PIXELS = re.compile(r"^(?:(?P<quality>[a-z]+)/)?(?P<w>\d+)-x-(?P<h>\d+)/(?P<model>.+)$")


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {f: n for f, v in entry.items() if (n := _number(v)) is not None}


def _number(value: Any) -> float | None:
    """A JSON number as a float (an integer too large for one: infinite, which the checks
    of `PriceSpec` refuse, naming the entry); None for anything else."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _litellm_units(entry: dict[str, Any], numbers: dict[str, float]) -> dict[str, Any]:
    """The unit prices of a LiteLLM entry, as `PriceSpec` fields. Its per-second and
    per-character prices mean what its `mode` says (Vertex AI's chat models carry
    `input_cost_per_character` too: those are not speech)."""
    mode = entry.get("mode")
    units: dict[str, Any] = {}
    if "output_cost_per_image" in numbers:
        units["image"] = numbers["output_cost_per_image"]
    if (second := numbers.get("input_cost_per_second")) is not None \
            and mode in ("audio_transcription", None):
        units["audio_input_minute"] = second * 60
    if (second := numbers.get("output_cost_per_second")) is not None:
        if mode == "audio_speech":
            units["audio_output_minute"] = second * 60
        elif mode == "video_generation":
            units["video_second"] = second
    if "output_cost_per_video_per_second" in numbers:
        units["video_second"] = numbers["output_cost_per_video_per_second"]
    if mode == "audio_speech":
        per_char = numbers.get("input_cost_per_character", numbers.get(
            "output_cost_per_character"))
        if per_char is not None:
            units["characters"] = per_char * 1e6
    if "input_cost_per_query" in numbers:  # rerank
        units["searches"] = numbers["input_cost_per_query"] * 1000
    search = entry.get("search_context_cost_per_query")
    if isinstance(search, dict):  # web search, by context size: the default (medium)
        per_query = _numbers(search)
        value = per_query.get("search_context_size_medium", per_query.get(
            "search_context_size_low"))
        if value is not None:
            units["searches"] = value * 1000
    return units


def litellm_layer(data: Any, origin: str) -> Layer:
    """A layer from LiteLLM's `model_prices_and_context_window.json`: USD per token, and
    per image (`output_cost_per_image`; per pixel under `quality/WxH/model` keys), second
    of audio or video, character of speech, rerank query or web search. `sample_spec` and
    entries with no price meterline reads are skipped."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object keyed by model name")
    layer = Layer(origin)
    specs: dict[tuple[str | None, str], _Found] = {}
    for key, entry in data.items():
        if key == "sample_spec" or not isinstance(entry, dict):
            continue
        numbers = _numbers(entry)
        raw_provider = entry.get("litellm_provider")
        provider = litellm_provider(raw_provider) if isinstance(raw_provider, str) else None
        if (pixels := _LITELLM_PIXELS.match(key)) and "input_cost_per_pixel" in numbers:
            size = f"{pixels['w']}x{pixels['h']}"
            per_image = numbers["input_cost_per_pixel"] * int(pixels["w"]) * int(pixels["h"])
            image_key = f"{size}/{pixels['quality']}" if pixels["quality"] else size
            found = specs.setdefault(
                (provider, _model_of(pixels["model"], raw_provider, provider)),
                _Found(f"{origin}: {key}", {}, named=False))
            found.fields.setdefault("images", {})[image_key] = round(per_image, 9)
            continue
        fields = _litellm_units(entry, numbers)
        if ranges := _litellm_ranges(entry.get("tiered_pricing")):
            fields.update(_litellm_ranged(ranges))
        elif "input_cost_per_token" in numbers:
            fields.update(_litellm_tokens(numbers))
        if not fields:
            continue
        specific = entry.get("provider_specific_entry")
        if geo := _litellm_geo(specific):
            fields["data_residency"] = {**geo, **fields.get("data_residency", {})}
        if isinstance(specific, dict) and (fast := _number(specific.get("fast"))) is not None:
            fields["speeds"] = {"fast": fast}
        if isinstance(entry.get("source"), str):
            fields["source"] = entry["source"]
        model = _model_of(key, raw_provider, provider)
        _keep(specs, (provider, model), _Found(f"{origin}: {key}", fields, named=model != key))
    for (provider, model), found in specs.items():
        try:
            spec = msgspec.convert(found.fields, PriceSpec)
        except msgspec.ValidationError as e:  # (a price out of range: name the entry)
            raise ValueError(f"{found.where}: {e}") from None
        ref = f"{provider}/{model}" if provider else model
        layer.add(provider, model, make_price(ref, spec, origin, spec.source or found.where,
                                              None))
    return layer


@dataclass
class _Found:
    """The prices a LiteLLM map gives one (provider, model), and the key that gave them."""

    where: str
    fields: dict[str, Any]
    named: bool  # its key names the provider (`deepseek/deepseek-chat`)


def _keep(specs: dict[tuple[str | None, str], _Found], at: tuple[str | None, str],
          new: _Found) -> None:
    """Two keys of a map may name one model of one provider, at different prices
    (`deepseek-chat` and `deepseek/deepseek-chat`, `moonshotai.kimi-k2.5` and
    `bedrock/moonshotai.kimi-k2.5`). LiteLLM prices a call by the key that names its
    provider first, so that key's entry is kept, whole, wherever it stands in the map;
    between two keys of the same form, the later one. The images its `quality/WxH/model`
    keys price are kept either way."""
    old = specs.get(at)
    if old is not None and old.named and not new.named:
        return
    if old is not None and "images" in old.fields:
        new.fields["images"] = old.fields["images"]
    specs[at] = new


def _litellm_tokens(numbers: dict[str, float]) -> dict[str, Any]:
    fields: dict[str, Any] = {name: numbers[f] * 1e6 for f, name in (
        *_LITELLM_RATE.items(), *_LITELLM_AUDIO.items()) if f in numbers}
    if _LITELLM_1H in numbers:
        fields["cache_write_1h"] = numbers[_LITELLM_1H] * 1e6
    # long-prompt tiers and service tiers (None: the standard rates)
    tiers: dict[str | None, dict[int, dict[str, float]]] = {}
    services: dict[str, dict[str, Any]] = {}
    for f, value in numbers.items():
        if m := _LITELLM_TIER.match(f):
            above = tiers.setdefault(m.group(3), {}).setdefault(int(m.group(2)) * 1000, {})
            above[_LITELLM_TIER_RATE[m.group(1)]] = value * 1e6
        elif m := _LITELLM_SERVICE.match(f):
            services.setdefault(m.group(2), {})[_LITELLM_SERVICE_RATE[m.group(1)]] = value * 1e6
    fields["tiers"] = _tier_list(tiers.get(None, {}))
    thresholds = tiers.get(None, {}).keys()  # (LiteLLM reads the standard ones only)
    fields["service_tiers"] = {
        name: {**rates, "tiers": _tier_list({above: r for above, r in tiers.get(name, {}).items()
                                             if above in thresholds})}
        for name, rates in services.items()}
    uplifts = {region: f"regional_processing_uplift_multiplier_{region}"
               for region in _OPENAI_REGIONAL_HOSTS.values()}
    fields["data_residency"] = {region: numbers[key] for region, key in uplifts.items()
                                if key in numbers}
    fields["regional_endpoint"] = numbers.get("regional_endpoint_uplift_multiplier")
    fields["batch"] = _fraction(numbers.get("input_cost_per_token_batches"),
                                numbers["input_cost_per_token"])
    fields["batch_output"] = _fraction(numbers.get("output_cost_per_token_batches"),
                                       numbers.get("output_cost_per_token"))
    return fields


def _litellm_geo(specific: Any) -> dict[str, float]:
    """The multipliers of LiteLLM's `provider_specific_entry` by the region a provider says
    it ran a call in (Anthropic's `usage.inference_geo`: `{us: 1.1}`), as LiteLLM applies
    them to the token costs. Only its keys that name a region (two letters: `us`, `eu`)
    are read: its `fast` is Anthropic's fast mode, a speed, and its other keys
    (`bedrock_invocation_schema`) are no price, so that a newer map's other settings
    neither price a place nor have the map refused."""
    if not isinstance(specific, dict):
        return {}
    return {key.lower(): number for key, value in specific.items()
            if isinstance(key, str) and _REGION.fullmatch(key)
            and (number := _number(value)) is not None}


def _tier_list(tiers: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    return [{"above": above, **rates} for above, rates in sorted(tiers.items())]


def _litellm_ranges(tiers: Any) -> list[tuple[int, dict[str, float]]]:
    """The token rates of LiteLLM's `tiered_pricing` (Alibaba's DashScope, Volcengine),
    by the start of their range of prompt tokens (`[start, end]`), lowest first."""
    ranges = []
    for tier in tiers if isinstance(tiers, list) else ():
        span = tier.get("range") if isinstance(tier, dict) else None
        numbers = _numbers(tier) if isinstance(tier, dict) else {}
        if isinstance(span, list) and span and isinstance(span[0], int | float) \
                and "input_cost_per_token" in numbers:
            ranges.append((int(span[0]), numbers))
    return sorted(ranges, key=lambda r: r[0])


def _litellm_ranged(ranges: list[tuple[int, dict[str, float]]]) -> dict[str, Any]:
    """A whole call is billed at the rates of the range its prompt falls in (`start <
    prompt <= end`; past the last range, the last), which is a tier above each range's
    start: the lowest range gives the entry's rates, each other one a tier. Such an entry
    has no flat rates of its own (LiteLLM reads the ranges first when both are given)."""
    (_, lowest), *higher = ranges
    fields = _litellm_tokens(lowest)
    fields["tiers"] = [{"above": start, **{name: numbers[f] * 1e6
                                           for f, name in _LITELLM_RATE.items() if f in numbers}}
                       for start, numbers in higher if start > 0]
    return fields


def _model_of(key: str, raw_provider: Any, provider: str | None) -> str:
    """A LiteLLM key without its provider prefix (`gemini/gemini-2.5-pro`)."""
    head, sep, rest = key.partition("/")
    if sep and raw_provider and (head == raw_provider or litellm_provider(head) == provider):
        return rest
    return key


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
    except RecursionError:
        raise ValueError(f"price file {path} is nested too deeply") from None
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
