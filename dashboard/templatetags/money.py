"""Presentation of money: nanos in, dollars out, rounded only here."""

from decimal import ROUND_HALF_UP, Decimal

from django import template

from billing.pricing import nanos_to_usd

register = template.Library()


@register.filter
def usd(nanos: int | None, places: int = 2) -> str:
    """Nano-USD as "$1,234.56" (half-up rounding at `places` decimals)."""
    amount = nanos_to_usd(nanos or 0).quantize(Decimal(1).scaleb(-int(places)), ROUND_HALF_UP)
    return f"${amount:,.{int(places)}f}"
