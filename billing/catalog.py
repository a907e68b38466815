"""List prices read from the `genai-prices` package's bundled data.

Only the data shipped inside the installed package is read: its optional
auto-update fetches prices over the network and is never used, so an import
gives the same rows on every machine with the same pinned version.

The package is imported on first use, not with this module: its data is ~25 MB
of objects, which a web worker needs only when an admin adds a deployment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib.metadata import version
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genai_prices import types as catalog_types

CATALOG_PACKAGE = "genai-prices"

# Tollgate provider kind -> the catalog's provider ids, most specific first: a
# model name is priced by the first of them that knows it. Kinds that are not
# here (self-hosted servers, generic OpenAI-compatible hosts, the mock) have no
# list price in the catalog. Billing must not import routing, so the kinds are
# spelled out as the strings routing stores in `provider_kind`.
CATALOG_PROVIDERS: Mapping[str, tuple[str, ...]] = {
    "openai": ("openai",),
    "azure": ("azure", "openai"),
    "anthropic": ("anthropic",),
    "gemini": ("google",),
    "groq": ("groq",),
    "together": ("together",),
    "mistral": ("mistral",),
    "deepseek": ("deepseek",),
    "fireworks": ("fireworks",),
    "openrouter": ("openrouter",),
}

# ModelPrice stores DecimalField(max_digits=14, decimal_places=6).
_RATE_QUANTUM = Decimal("0.000001")
_RATE_LIMIT = Decimal(10) ** 8


@dataclass(frozen=True, slots=True)
class CatalogPrice:
    """One list price, in USD per million tokens, for a model name at a provider kind."""

    provider_kind: str
    model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None  # None: same as input
    reasoning_usd_per_mtok: Decimal | None  # None: same as output


@dataclass(frozen=True, slots=True)
class CatalogSkip:
    """A catalog entry whose price Tollgate's rate card cannot hold exactly."""

    provider_kind: str
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class CatalogListing:
    prices: tuple[CatalogPrice, ...]
    skipped: tuple[CatalogSkip, ...]


class _Unrepresentable(Exception):
    """The catalog's price needs more than input/output/cached/reasoning rates."""


def catalog_version() -> str:
    """The installed catalog package's version, e.g. "0.2.3"."""
    return version(CATALOG_PACKAGE)


def catalog_prices_read(
    *, moment: datetime, kinds: Mapping[str, tuple[str, ...]] = CATALOG_PROVIDERS
) -> CatalogListing:
    """Every list price the bundled catalog gives for `kinds`, as in force at `moment`.

    A model is listed under its catalog id and the exact aliases the catalog
    matches it by, each priced by the model the catalog itself would pick for
    that name. Prices that are tiered, depend on the time of day, or need
    units beyond tokens are returned in `skipped` instead of approximated.
    """
    prices: list[CatalogPrice] = []
    skipped: list[CatalogSkip] = []
    for kind, provider_ids in kinds.items():
        providers = _providers(provider_ids)
        for name in _model_names(providers):
            model = _find_model(providers, name)
            if model is None:  # an id the catalog's own matching does not resolve
                continue
            try:
                prices.append(_price(kind, name, model, moment))
            except _Unrepresentable as exc:
                skipped.append(CatalogSkip(provider_kind=kind, model=name, reason=str(exc)))
    return CatalogListing(prices=tuple(prices), skipped=tuple(skipped))


def catalog_price_match(
    provider_kind: str, model_name: str, *, moment: datetime | None = None
) -> CatalogPrice | CatalogSkip | None:
    """The list price the catalog's own match rules give `model_name`, as in force at `moment`.

    Unlike `catalog_prices_read`, which lists only ids and exact aliases, this
    also recognises the names the catalog matches by prefix, suffix, substring
    or regex (dated and variant names such as `claude-sonnet-4-20250514`), and
    compact dates (`-20240718` for `-2024-07-18`), exactly as genai-prices
    itself would. The price is returned under `model_name` as given. None:
    the kind has no catalog provider or no catalog model matches; a
    CatalogSkip: the matched price cannot be held exactly.
    """
    if not model_name.strip():
        return None  # an empty name would satisfy every `contains` clause
    model = _find_model(_providers(CATALOG_PROVIDERS.get(provider_kind, ())), model_name)
    if model is None:
        return None
    try:
        return _price(provider_kind, model_name, model, moment or datetime.now(UTC))
    except _Unrepresentable as exc:
        return CatalogSkip(provider_kind=provider_kind, model=model_name, reason=str(exc))


@cache
def _types() -> ModuleType:
    from genai_prices import types

    return types


@cache
def _providers_by_id() -> Mapping[str, catalog_types.Provider]:
    from genai_prices.data import providers

    return {provider.id: provider for provider in providers}


def _providers(provider_ids: tuple[str, ...]) -> list[catalog_types.Provider]:
    by_id = _providers_by_id()
    return [by_id[provider_id] for provider_id in provider_ids if provider_id in by_id]


def _find_model(
    providers: list[catalog_types.Provider], name: str
) -> catalog_types.ModelInfo | None:
    """The catalog's own pick for `name`: the first provider that matches it wins.

    No `all_providers` is passed, so the catalog's cross-provider fallbacks are
    not followed: CATALOG_PROVIDERS says which providers a kind resells.
    """
    return next((found for p in providers if (found := p.find_model(name)) is not None), None)


def _model_names(providers: list[catalog_types.Provider]) -> Iterator[str]:
    """Each model's id and exact aliases, first spelling first, without repeats."""
    seen: set[str] = set()
    for provider in providers:
        for model in provider.models:
            for name in (model.id, *_exact_names(model.match)):
                if name not in seen:
                    seen.add(name)
                    yield name


def _exact_names(match: object) -> Iterator[str]:
    # Only names a deployment can be configured with verbatim; prefix, suffix
    # and regex clauses cover dated variants that cannot be listed.
    types = _types()
    if isinstance(match, types.ClauseEquals):
        yield match.equals
    elif isinstance(match, types.ClauseOr):
        for clause in match.or_:
            yield from _exact_names(clause)


def _price(kind: str, name: str, model: catalog_types.ModelInfo, moment: datetime) -> CatalogPrice:
    types = _types()
    if not isinstance(model.prices, types.ModelPrice) and any(
        isinstance(conditional.constraint, types.TimeOfDateConstraint)
        for conditional in model.prices
    ):
        raise _Unrepresentable("price depends on the time of day")
    # The standard price in force at `moment` (no request context: no
    # batch/flex/priority variants, which Tollgate does not route to).
    standard = vars(model.get_prices(moment))
    rates = {key: value for key, value in standard.items() if value is not None}
    if "input_mtok" not in rates:
        raise _Unrepresentable("no per-token input price")
    if "output_mtok" not in rates and any(
        _direction(key) == "output" for key in rates if key != "output_reasoning_mtok"
    ):
        raise _Unrepresentable("output priced by modality only")
    return CatalogPrice(
        provider_kind=kind,
        model=name,
        input_usd_per_mtok=_rate(rates["input_mtok"]),
        # No output price (embeddings, moderation): the catalog charges nothing for output.
        output_usd_per_mtok=_rate(rates.get("output_mtok", Decimal(0))),
        cached_input_usd_per_mtok=_optional_rate(rates.get("cache_read_mtok")),
        reasoning_usd_per_mtok=_optional_rate(rates.get("output_reasoning_mtok")),
    )


def _direction(price_key: str) -> str | None:
    return _directions().get(price_key)


@cache
def _directions() -> Mapping[str, str]:
    """Price key -> "input" or "output", from the catalog's own unit definitions."""
    from genai_prices.data_units import unit_data

    return {
        unit["price_key"]: unit["dimensions"]["direction"]
        for unit in unit_data.values()
        if "price_key" in unit and "direction" in unit.get("dimensions", {})
    }


def _optional_rate(value: object) -> Decimal | None:
    return None if value is None else _rate(value)


def _rate(value: object) -> Decimal:
    """The exact rate as a Decimal that fits the rate card's column, or unrepresentable."""
    if isinstance(value, _types().TieredPrices):
        raise _Unrepresentable("tiered by prompt length")
    try:
        # Via str: the catalog's Decimals pass unchanged and no float ever sneaks in.
        rate = Decimal(str(value))
    except InvalidOperation:
        raise _Unrepresentable(f"rate {value!r} is not a number") from None
    if not rate.is_finite() or rate < 0 or rate >= _RATE_LIMIT:
        raise _Unrepresentable(f"rate {rate} is out of range")
    if rate != rate.quantize(_RATE_QUANTUM):
        raise _Unrepresentable(f"rate {rate} has more than 6 decimal places")
    return rate
