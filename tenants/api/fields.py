"""Field and filter pieces every management API app shares."""

from typing import Any

import django_filters
from django import forms
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field

MAX_ID = 2**63 - 1  # a BigAutoField's range: larger ids are 400s, not database errors
MAX_INT = 2**31 - 1  # a PositiveIntegerField's range
# Serializer kwargs of an optional per-minute limit (null: none).
RATE_LIMIT: dict[str, Any] = {
    "required": False, "allow_null": True, "min_value": 1, "max_value": MAX_INT,
}  # fmt: skip


class _IdField(forms.IntegerField):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, min_value=1, max_value=MAX_ID, **kwargs)


@extend_schema_field(OpenApiTypes.INT)
class IdFilter(django_filters.NumberFilter):
    """An exact id. Not a ModelChoiceFilter: its choices would tell another org's ids
    (no match) from missing ones (400)."""

    field_class = _IdField
