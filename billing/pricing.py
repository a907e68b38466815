"""The one place where rates meet token counts."""

from collections.abc import Iterable
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from billing.contracts import PriceRates, TokenUsage

NANOS_PER_USD = 10**9
_NANOS_PER_USD_PER_MTOK = Decimal(NANOS_PER_USD) / Decimal(1_000_000)


def cost_nanos(*, usage: TokenUsage, rates: PriceRates) -> int:
    """Cost of one request in nano-USD, rounded once (half up) to a whole nano."""
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    reasoning = min(usage.reasoning_tokens, usage.output_tokens)
    cached_rate = rates.cached_input_usd_per_mtok
    reasoning_rate = rates.reasoning_usd_per_mtok
    usd_per_mtok_tokens = (
        (usage.input_tokens - cached) * rates.input_usd_per_mtok
        + cached * (rates.input_usd_per_mtok if cached_rate is None else cached_rate)
        + (usage.output_tokens - reasoning) * rates.output_usd_per_mtok
        + reasoning * (rates.output_usd_per_mtok if reasoning_rate is None else reasoning_rate)
    )
    nanos = usd_per_mtok_tokens * _NANOS_PER_USD_PER_MTOK
    return int(nanos.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _later(current: PriceRates | None, candidate: PriceRates) -> PriceRates:
    if current is None or candidate.effective_from > current.effective_from:
        return candidate
    return current


def price_pick(
    candidates: Iterable[PriceRates], *, org_id: int, moment: datetime
) -> PriceRates | None:
    """The price in force at `moment`: the org's override first, else the list price.

    Among rows of the same owner the one that took effect last wins.
    """
    override: PriceRates | None = None
    list_price: PriceRates | None = None
    for rates in candidates:
        if not rates.applies_at(moment):
            continue
        if rates.org_id == org_id:
            override = _later(override, rates)
        elif rates.org_id is None:
            list_price = _later(list_price, rates)
    return override or list_price


def nanos_to_usd(nanos: int) -> Decimal:
    """Exact dollars for display; round only where it is shown."""
    return Decimal(nanos) / NANOS_PER_USD


def usd_exact(nanos: int) -> str:
    """Nano-USD as dollars with all 9 places ("0.000000120"): exact, never a float, never
    an exponent (str() of a small Decimal says "1.2E-7")."""
    return f"{Decimal(nanos).scaleb(-9):f}"
