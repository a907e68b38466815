from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from billing.models import (
    ModelPrice,
    ReconciliationRun,
    RollupState,
    Statement,
    StatementLine,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
)
from tenants.admin import ReadOnlyAdmin


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = [
        "provider_kind", "model", "org", "input_usd_per_mtok", "output_usd_per_mtok",
        "cached_input_usd_per_mtok", "effective_from", "effective_until", "source",
    ]  # fmt: skip
    list_filter = ["provider_kind", "source", "org"]
    search_fields = ["model"]


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    """Read-only: the ledger is corrected by adjustments, never edited."""

    list_display = [
        "started_at", "org", "key", "model", "deployment_name", "status_code", "outcome",
        "input_tokens", "output_tokens", "cost_nanos", "latency_ms", "is_stream", "end_user",
    ]  # fmt: skip
    list_filter = ["org", "outcome", "is_stream", "endpoint"]
    search_fields = ["id", "model", "end_user"]
    date_hierarchy = "started_at"
    list_select_related = ["org", "key"]


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "bucket_start", "granularity", "org", "model", "provider_kind", "deployment_name",
        "endpoint", "team_id", "key_id", "requests", "successes", "input_tokens",
        "output_tokens", "cost_nanos", "computed_at",
    ]  # fmt: skip
    list_filter = ["granularity", "org", "provider_kind", "endpoint"]
    search_fields = ["model", "deployment_name"]
    date_hierarchy = "bucket_start"
    list_select_related = ["org"]


@admin.register(UsageTagRollup)
class UsageTagRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "bucket_start", "granularity", "org", "tag", "model", "provider_kind", "requests",
        "successes", "input_tokens", "output_tokens", "cost_nanos", "computed_at",
    ]  # fmt: skip
    list_filter = ["granularity", "org", "provider_kind"]
    search_fields = ["tag", "model"]
    date_hierarchy = "bucket_start"
    list_select_related = ["org"]


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdmin):
    """Rollup-versus-ledger checks; anything but "clean" is an alert to look into."""

    list_display = [
        "started_at", "status", "trigger", "period_start", "period_end", "days_checked",
        "mismatch_count",
    ]  # fmt: skip
    list_filter = ["status", "trigger"]
    date_hierarchy = "started_at"

    @admin.display(description="mismatches")
    def mismatch_count(self, run: ReconciliationRun) -> int:
        return len(run.mismatches)


@admin.register(RollupState)
class RollupStateAdmin(ReadOnlyAdmin):
    list_display = ["ingested_through", "pruned_before", "updated_at"]


class StatementLineInline(admin.TabularInline):
    model = StatementLine
    can_delete = False
    extra = 0
    fields = [
        "position", "kind", "usage_month", "team_name", "provider_kind", "model", "requests",
        "input_tokens", "output_tokens", "unpriced_requests", "amount_nanos",
    ]  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Statement)
class StatementAdmin(ReadOnlyAdmin):
    """Closed months: frozen, so never edited; corrections are adjustments on a later one."""

    list_display = ["org", "month", "total_nanos", "closed_at"]
    list_filter = ["org"]
    inlines = [StatementLineInline]
