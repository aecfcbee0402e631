"""Processor `cost`: the estimated spend of every event, from a price table.

Token counts follow the OpenTelemetry GenAI conventions: `input_tokens` includes
the cache reads and writes, `output_tokens` includes the reasoning tokens. So
the uncached input is priced at the input rate, cache reads and writes at their
own rates (never a second time at the input rate), and reasoning tokens at the
reasoning rate, which is the output rate unless the table gives one. A call whose
prompt passes a tier's threshold is priced whole at that tier's rates; a call
to a batch endpoint (`batch_endpoints`) gets the entry's batch discount.

An event whose model has no price keeps a null cost (an unknown figure, not a
free call): it is counted per model and logged once. The cost the source reported
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
from typing import Any

import msgspec

from meterline.component import Config, Context, Factory, Processor
from meterline.event import Event
from meterline.processors.cost.prices import (
    Layer,
    Price,
    PriceSpec,
    PriceTable,
    bundled,
    config_layer,
)
from meterline.processors.cost.prices import load_file as load_price_file

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
    # prices by model (`provider/model` or `model`), over the bundled table and files
    prices: dict[str, PriceSpec] = msgspec.field(default_factory=dict)
    # price files (meterline's YAML, or LiteLLM's JSON), later ones win
    price_files: list[PriceFile] = msgspec.field(default_factory=list)
    bundled: bool = True  # false: price only from price_files and prices
    aliases: dict[str, str] = msgspec.field(default_factory=dict)  # e.g. Azure deployments
    # calls whose endpoint contains one of these get the batch-API price
    batch_endpoints: list[str] = msgspec.field(default_factory=lambda: ["/batches"])

    def table(self) -> PriceTable:
        layers: list[Layer] = [bundled()[1]] if self.bundled else []
        layers += [f.layer for f in self.price_files]
        layers.append(config_layer(self.prices))
        return PriceTable(layers, self.aliases)


class CostProcessor(Processor):
    def __init__(self, config: CostConfig, context: Context) -> None:
        self.table = config.table()
        self.batch_endpoint = re.compile("|".join(map(re.escape, config.batch_endpoints))
                                         or "(?!)").search
        self.log = context.log
        self.id = context.id
        self._memo: dict[tuple[str | None, str | None, str | None], Price | None] = {}
        self._logged: set[tuple[str | None, str]] = set()
        self._unpriced = context.meter.create_counter(
            "meterline_cost_unpriced_events",
            description="Events with token usage whose model has no price (cost left null)")

    def process(self, events: list[Event]) -> list[Event]:
        memo = self._memo
        unpriced: dict[str, int] = {}
        for e in events:
            inp = e.input_tokens
            out = e.output_tokens
            if inp is None and out is None:
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
                continue
            rates = price.rates
            ref = price.ref
            if price.tiers and inp and (tier := price.tier_for(inp)) is not None:
                rates = tier.rates
                ref = f"{ref};above_{tier.above}"
            scale = scale_out = 1e-6
            if (fractions := price.batch_fractions) is not None \
                    and (endpoint := e.endpoint) is not None and self.batch_endpoint(endpoint):
                scale *= fractions[0]
                scale_out *= fractions[1]
                ref += ";batch"
            cost_in = cost_out = None
            if inp is not None:
                cached = e.cache_read_tokens or 0
                written = e.cache_creation_tokens or 0
                uncached = inp - cached - written
                cost_in = (max(uncached, 0) * rates.input + cached * rates.cache_read
                           + written * rates.cache_write) * scale
            if out is not None:
                reasoning = e.reasoning_tokens or 0
                cost_out = ((max(out - reasoning, 0)) * rates.output
                            + reasoning * rates.reasoning) * scale_out
            if e.cache_hit:
                if e.saved_cost_usd is None:
                    e.saved_cost_usd = (cost_in or 0.0) + (cost_out or 0.0)
                _unbilled(e)
                e.pricing_ref = f"{ref};cache_hit"
                continue
            e.cost_input_usd = cost_in
            e.cost_output_usd = cost_out
            e.cost_usd = (cost_in or 0.0) + (cost_out or 0.0)
            e.pricing_ref = ref
        for model, count in unpriced.items():
            self._unpriced.add(count, {"processor": self.id, "model": model})
        return events

    def _resolve(self, key: tuple[str | None, str | None, str | None]) -> Price | None:
        """The response model is what served the call (a dated snapshot, or the model
        behind an Azure deployment name); the requested model is the fallback."""
        provider, response_model, request_model = key
        price = None
        for model in dict.fromkeys(m for m in (response_model, request_model) if m):
            price = self.table.resolve(provider, model).price
            if price is not None:
                break
        if price is None:
            model = response_model or request_model or "(none)"
            if (provider, model) not in self._logged and len(self._logged) < _LOG_LIMIT:
                self._logged.add((provider, model))
                self.log.warning("no price for this model; its cost stays null (add it under "
                                 "prices, or load a price file with price_files)",
                                 provider=provider, model=model)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = price
        return price


def _unbilled(e: Event) -> None:
    """A cache hit: the provider billed nothing."""
    e.cost_input_usd = e.cost_output_usd = e.cost_usd = 0.0


factory = Factory(kind="processor", type="cost", config=CostConfig, create=CostProcessor)
