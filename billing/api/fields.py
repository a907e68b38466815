"""Serializer fields the billing endpoints share: money as exact text, ids kept in range."""

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.pricing import usd_exact
from billing.statements import cents


@extend_schema_field(
    {
        "type": "string",
        "example": "12.345678900",
        "description": "US dollars as exact decimal text, 9 places.",
    }
)
class UsdField(serializers.Field):
    """Read-only dollars of a nano-USD attribute: `UsdField(source="cost_nanos")`."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: int) -> str:
        return usd_exact(value)


@extend_schema_field(OpenApiTypes.INT)
class CentsField(serializers.Field):
    """Read-only whole cents (rounded half up) of a nano-USD attribute."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: int) -> int:
        return cents(value)


@extend_schema_field({"type": "string", "pattern": r"^\d{4}-\d{2}$", "example": "2025-03"})
class MonthField(serializers.Field):
    """A calendar month as "YYYY-MM" (read-only: a date's month)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def to_representation(self, value: Any) -> str:
        return f"{value:%Y-%m}"
