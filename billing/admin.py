from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from billing.models import ModelPrice, UsageEvent


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = [
        "provider_kind", "model", "org", "input_usd_per_mtok", "output_usd_per_mtok",
        "cached_input_usd_per_mtok", "effective_from", "effective_until", "source",
    ]  # fmt: skip
    list_filter = ["provider_kind", "source", "org"]
    search_fields = ["model"]


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    """Read-only: the ledger is corrected by adjustments, never edited."""

    list_display = [
        "started_at", "org", "key", "model", "deployment_name", "status_code", "outcome",
        "input_tokens", "output_tokens", "cost_nanos", "latency_ms", "is_stream",
    ]  # fmt: skip
    list_filter = ["org", "outcome", "is_stream", "endpoint"]
    search_fields = ["id", "model"]
    date_hierarchy = "started_at"
    list_select_related = ["org", "key"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
