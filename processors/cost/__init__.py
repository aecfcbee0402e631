"""Processor `cost`: the estimated spend of every event, from a price table.

Token counts follow the OpenTelemetry GenAI conventions: `input_tokens` includes
the cache reads and writes and the audio tokens, `output_tokens` the reasoning and
audio tokens. So the uncached text input is priced at the input rate, cache reads and
writes at their own rates (never a second time at the input rate), reasoning tokens at
the reasoning rate, which is the output rate unless the table gives one, and audio
tokens at the audio rates, which are the text rates unless the table gives them. A
call whose prompt passes a tier's threshold is priced whole at that tier's rates (audio
at the entry's audio rates, if it gives them); a batch call (`batch: true`, or a call
to a batch endpoint, `batch_endpoints`) gets the entry's batch discount.

What a call bills besides tokens is priced per unit: images (by size and quality),
audio transcribed and synthesised (per minute), characters synthesised, video (per
second), searches (rerank search units, built-in web searches, per 1,000); see `_cost`
for how units and tokens combine.

An event whose model has no price keeps a null cost (an unknown figure, not a
free call): it is counted per model and logged once. So does an event with a unit
its entry gives no price for (`cost_usd` null; the side of the bill that is known,
`cost_input_usd` or `cost_output_usd`, is kept). The cost the source reported
(`actual_cost_usd`) is never touched.

A cache hit (`cache_hit: true`: answered from a cache, a proxy's or a gateway's,
without calling the provider) was billed nothing: its `cost_input_usd`,
`cost_output_usd` and `cost_usd` are 0, whatever its tokens and whether or not its
model has a price. What the cache saved is the price of its tokens, what the provider
would have billed: it goes into `saved_cost_usd` unless the source reported it
(LiteLLM's `saved_cache_cost`), and `pricing_ref` says which entry priced it, with
`;cache_hit`. A cache hit whose model has no price keeps `saved_cost_usd` null
(unknown) and is not counted as unpriced (its cost, 0, is known).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from meterline.genai import INFERENCE_GEO, SPEED
from meterline.processors.cost.prices import (
    NO_UNITS,
    Layer,
    Price,
    PriceSpec,
    PriceTable,
    Rates,
    bundled,
    config_layer,
    tier_for,
)
from meterline.processors.cost.prices import load_file as load_price_file
from meterline.processors.redact.engine import masked


def updated_prices(data_dir: Path | str) -> Path:
    """Where `meterline pricing update` keeps the LiteLLM price map it merged."""
    return Path(data_dir) / "prices" / "litellm.json"


_MEMO_LIMIT = 10_000  # distinct (provider, model) pairs remembered; cleared beyond
_LOG_LIMIT = 1_000  # distinct unpriced models logged


class PriceFile:
    """A price file named in the config, read when the config is: `meterline validate`
    reports a bad one, and a reload notices that its content changed."""

    __slots__ = ("digest", "layer", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.layer, self.digest = load_price_file(path)

    @classmethod
    def from_config(cls, value: Any) -> PriceFile:
        if not isinstance(value, str):
            raise ValueError(f"expected the path of a price file, got {value!r}")
        return cls(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PriceFile) and (other.path, other.digest) == (
            self.path, self.digest)

    def __hash__(self) -> int:
        return hash((self.path, self.digest))

    def __repr__(self) -> str:
        return f"PriceFile({self.path!r})"


class CostConfig(Config):
    # prices by model (`provider/model`, `model`, or `provider/*`: that provider's models no
    # entry names), over the bundled table and files
    prices: dict[str, PriceSpec] = msgspec.field(default_factory=dict)
    # price files (meterline's YAML, or LiteLLM's JSON), later ones win
    price_files: list[PriceFile] = msgspec.field(default_factory=list)
    bundled: bool = True  # false: price only from price_files and prices
    aliases: dict[str, str] = msgspec.field(default_factory=dict)  # e.g. Azure deployments
    # calls whose endpoint contains one of these get the batch-API price
    batch_endpoints: list[str] = msgspec.field(default_factory=lambda: ["/batches"])

    def __post_init__(self) -> None:
        config_layer(self.prices)  # refuses a key no table takes (a `*` without provider)

    def table(self, data_dir: Path | str | None = None) -> PriceTable:
        """The table: the bundled one, the price map `meterline pricing update` keeps in
        `data_dir` (if any), the price files, then the `prices` written here."""
        layers: list[Layer] = [bundled()[1]] if self.bundled else []
        if data_dir is not None and (updated := updated_prices(data_dir)).is_file():
            layers.append(load_price_file(str(updated))[0])
        layers += [f.layer for f in self.price_files]
        layers.append(config_layer(self.prices))
        return PriceTable(layers, self.aliases)


class CostProcessor(Processor):
    def __init__(self, config: CostConfig, context: Context) -> None:
        self.table = config.table(context.data_dir)
        self.batch_endpoint = re.compile("|".join(map(re.escape, config.batch_endpoints))
                                         or "(?!)").search
        self.log = context.log
        self.id = context.id
        self._memo: dict[tuple[str | None, str | None, str | None], Price | None] = {}
        self._logged: set[tuple[str | None, str]] = set()
        self._names: dict[str, str] = {}  # a client's model name as logged and labelled
        self._unpriced = context.meter.create_counter(
            "meterline_cost_unpriced_events",
            description="Events with usage whose model, or one of whose units, has no price "
                        "(cost left null)")

    def process(self, events: list[Event]) -> list[Event]:
        memo = self._memo
        unpriced: dict[str, int] = {}
        for e in events:
            if e.input_tokens is None and e.output_tokens is None and not _has_units(e):
                if e.cache_hit:
                    _unbilled(e)
                continue
            key = (e.provider, e.response_model, e.request_model)
            try:
                price = memo[key]
            except KeyError:
                price = self._resolve(key)
            if price is None:
                if e.cache_hit:
                    _unbilled(e)
                    continue
                model = e.response_model or e.request_model or "(none)"
                unpriced[model] = unpriced.get(model, 0) + 1
                self._warn_once(e.provider, model, "no price for this model; its cost stays "
                                "null (add it under prices, or load a price file with "
                                "price_files)")
                continue
            batch = e.batch if e.batch is not None else (
                (endpoint := e.endpoint) is not None and bool(self.batch_endpoint(endpoint)))
            cost_in, cost_out, ref = _cost(e, price, batch)
            known = not isinstance(cost_in, _Unknown) and not isinstance(cost_out, _Unknown)
            if e.cache_hit:
                if e.saved_cost_usd is None and known:
                    e.saved_cost_usd = _known(cost_in) + _known(cost_out)
                _unbilled(e)
                e.pricing_ref = f"{ref};cache_hit"
                continue
            e.cost_input_usd = None if isinstance(cost_in, _Unknown) else cost_in
            e.cost_output_usd = None if isinstance(cost_out, _Unknown) else cost_out
            e.pricing_ref = ref
            if not known:
                e.cost_usd = None  # a unit without a price: the total is unknown
                model = e.response_model or e.request_model or "(none)"
                unpriced[model] = unpriced.get(model, 0) + 1
                self._warn_once(e.provider, model, "no price for some units of this model's "
                                "calls; their cost stays null (add the unit prices under "
                                "`prices`)", entry=price.ref, units=_units_of(e))
                continue
            e.cost_usd = _known(cost_in) + _known(cost_out)
        for model, count in unpriced.items():
            self._unpriced.add(count, {"processor": self.id, "model": self._name(model)})
        return events

    def _name(self, text: str) -> str:
        """`text` (a model or provider name, as the client sent it: the processor may run
        before `redact`) with any PII or secret in it masked, for the logs and metrics."""
        try:
            return self._names[text]
        except KeyError:
            pass
        if len(self._names) >= _MEMO_LIMIT:
            self._names.clear()
        name = self._names[text] = masked([text])[0]
        return name

    def _warn_once(self, provider: str | None, model: str, message: str,
                   **context: Any) -> None:
        """A model's calls left unpriced, logged once per model (a cache hit of it costs 0,
        and is not)."""
        if (provider, model) not in self._logged and len(self._logged) < _LOG_LIMIT:
            self._logged.add((provider, model))
            self.log.warning(message, provider=provider and self._name(provider),
                             model=self._name(model), **context)

    def _resolve(self, key: tuple[str | None, str | None, str | None]) -> Price | None:
        """The response model is what served the call (a dated snapshot, or the model
        behind an Azure deployment name); the requested model is the fallback."""
        provider, response_model, request_model = key
        price = self.table.resolve(
            provider, *dict.fromkeys(m for m in (response_model, request_model) if m)).price
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = price
        return price


class _Unknown:
    """A side of the bill (input or output) with a unit the entry has no price for."""

    def __repr__(self) -> str:
        return "unknown"


_UNKNOWN: Final = _Unknown()
Cost = float | None | _Unknown  # None: nothing to bill on that side


def _has_units(e: Event) -> bool:
    return (e.images is not None or e.audio_input_seconds is not None or e.characters
            is not None or e.audio_output_seconds is not None or e.video_seconds is not None
            or bool(e.search_queries))


def _units_of(e: Event) -> list[str]:
    return [name for name in ("images", "audio_input_seconds", "characters",
                              "audio_output_seconds", "video_seconds", "search_queries")
            if getattr(e, name)]


def _cost(e: Event, price: Price, batch: bool) -> tuple[Cost, Cost, str]:
    """(input cost, output cost, pricing_ref) of one call.

    Tokens are priced at the token rates (the tier's for a long prompt), units at the
    unit rates. Media units (images, audio, characters, video) are what the tokens of
    their side measure when a call reports both (gpt-image-1 reports the tokens of its
    images, gpt-4o-transcribe those of its audio): they are priced per unit only when
    the entry has no token rate for that side or the call reports no tokens for it.
    Searches are billed on top of tokens. A unit the entry has no price for makes its
    side unknown; a batch call gets the entry's batch fractions on tokens and units. A call
    a service tier served takes that tier's rates; one processed in a region the entry
    prices apart (OpenAI's data residency, a Vertex AI regional endpoint) has its token
    costs multiplied by that region's uplift, and one run at a speed it prices apart
    (Anthropic's fast mode) by that speed's multiple."""
    rates, tiers, ref = price.rates, price.tiers, price.ref
    if e.service_tier and (service := price.service_tier(e.service_tier)) is not None:
        name, served = service
        rates, tiers, ref = served.rates, served.tiers, f"{ref};{name}"
    inp, out = e.input_tokens, e.output_tokens
    if tiers and inp and (tier := tier_for(tiers, inp)) is not None:
        rates = tier.rates
        ref = f"{ref};above_{tier.above}"
    uplift = 1.0
    attributes = e.attributes or {}
    region = price.uplift(attributes.get(INFERENCE_GEO), e.upstream,
                          attributes.get("server.address"), e.endpoint)
    if region is not None:
        name, uplift = region
        ref += f";{name}"
    if (speed := price.speed(attributes.get(SPEED))) is not None:
        name, multiple = speed
        uplift *= multiple
        ref += f";{name}"
    scale_in = scale_out = 1.0
    if batch and (fractions := price.batch_fractions) is not None:
        scale_in, scale_out = fractions
        ref += ";batch"
    units = price.units or NO_UNITS
    # input: tokens, audio transcribed, characters synthesised, searches
    tokens_in: Cost = None
    if inp is not None:
        tokens_in = _input_tokens(e, inp, rates) * uplift if price.tokens else _UNKNOWN
    by_tokens = price.tokens and inp is not None and rates.input > 0
    media_in = [(e.audio_input_seconds, units.audio_input_second),
                (e.characters, units.character)]
    cost_in = _side(tokens_in, by_tokens, media_in, (e.search_queries, units.search))
    # output: tokens, images, audio synthesised, video
    tokens_out: Cost = None
    if out is not None:
        tokens_out = _output_tokens(e, out, rates) * uplift if price.tokens else _UNKNOWN
    by_tokens = price.tokens and out is not None and rates.output > 0
    image = units.image_price(e.image_size, e.image_quality) if e.images else None
    media_out = [(e.images, image), (e.audio_output_seconds, units.audio_output_second),
                 (e.video_seconds, units.video_second)]
    cost_out = _side(tokens_out, by_tokens, media_out, (None, None))
    return _scaled(cost_in, scale_in), _scaled(cost_out, scale_out), ref


def _input_tokens(e: Event, inp: int, rates: Rates) -> float:
    """USD of a call's input tokens: cache reads and writes at their rates (a write for an
    hour at the one-hour rate), the audio tokens
    among the others at the audio rate, the rest (text) at the input rate. An audio token
    the cache counts too (a realtime session's cached audio) is billed once, as cached."""
    cached = e.cache_read_tokens or 0
    written = e.cache_creation_tokens or 0
    for_an_hour = min(e.cache_creation_1h_tokens or 0, written)
    uncached = max(inp - cached - written, 0)
    audio = min(e.audio_input_tokens or 0, uncached)
    return ((uncached - audio) * rates.input + audio * rates.input_audio
            + cached * rates.cache_read + (written - for_an_hour) * rates.cache_write
            + for_an_hour * rates.cache_write_1h) * 1e-6


def _output_tokens(e: Event, out: int, rates: Rates) -> float:
    """USD of a call's output tokens: reasoning at the reasoning rate, the audio tokens
    among the others at the audio rate, the rest (text) at the output rate."""
    reasoning = e.reasoning_tokens or 0
    answer = max(out - reasoning, 0)
    audio = min(e.audio_output_tokens or 0, answer)
    return ((answer - audio) * rates.output + audio * rates.output_audio
            + reasoning * rates.reasoning) * 1e-6


def _side(tokens: Cost, by_tokens: bool, media: list[tuple[float | None, float | None]],
          extra: tuple[float | None, float | None]) -> Cost:
    total: float | None = None if isinstance(tokens, _Unknown) else tokens
    billed_by_units = False
    for count, rate in media:
        if count is None or by_tokens:
            continue
        if rate is None:
            return _UNKNOWN
        billed_by_units = True
        total = (total or 0.0) + count * rate
    if isinstance(tokens, _Unknown) and not billed_by_units:
        return _UNKNOWN  # tokens, and no token rate: no unit bills them either
    count, rate = extra
    if count:
        if rate is None:
            return _UNKNOWN
        total = (total or 0.0) + count * rate
    return total


def _known(cost: Cost) -> float:
    return cost if isinstance(cost, float) else 0.0


def _scaled(cost: Cost, scale: float) -> Cost:
    return cost * scale if isinstance(cost, float) else cost


def _unbilled(e: Event) -> None:
    """A cache hit: the provider billed nothing."""
    e.cost_input_usd = e.cost_output_usd = e.cost_usd = 0.0


factory = Factory(kind="processor", type="cost", config=CostConfig, create=CostProcessor)
