from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from billing.alerts import alert_channel_create, alert_channel_secret_rotate
from billing.models import (
    Alert,
    AlertChannel,
    AlertDelivery,
    ModelPrice,
    ReconciliationRun,
    RollupState,
    Statement,
    StatementLine,
    UsageEvent,
    UsageRollup,
    UsageTagRollup,
    UsageTeamRollup,
)
from tenants.admin import AuditedAdmin, ReadOnlyAdmin
from tenants.services import Actor


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedAdmin):
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


@admin.register(UsageTeamRollup)
class UsageTeamRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "bucket_start", "granularity", "org", "team_id", "requests", "successes",
        "input_tokens", "output_tokens", "cost_nanos", "computed_at",
    ]  # fmt: skip
    list_filter = ["granularity", "org"]
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


def _actor(request: HttpRequest) -> Actor:
    return Actor(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))  # type: ignore[arg-type]


def _show_secret_once(request: HttpRequest, channel: AlertChannel, secret: str) -> None:
    messages.warning(
        request,
        f"Signing secret of {channel.name!r} (shown only now, copy it to the receiver): {secret}",
    )


@admin.register(AlertChannel)
class AlertChannelAdmin(AuditedAdmin):
    """Webhook signing secrets are write-only: shown once when created or rotated."""

    list_display = [
        "name", "org", "kind", "notify_threshold", "notify_exhausted", "notify_spike", "enabled",
        "created_at",
    ]  # fmt: skip
    list_filter = ["org", "kind", "enabled"]
    search_fields = ["name"]
    fields = [
        "org", "name", "kind", "url", "recipients", "notify_threshold", "notify_exhausted",
        "notify_spike", "enabled", "has_secret", "created_at",
    ]  # fmt: skip
    readonly_fields = ["has_secret", "created_at"]
    actions = ["rotate_secrets"]

    @admin.display(boolean=True, description="signing secret set")
    def has_secret(self, channel: AlertChannel) -> bool:
        return channel.has_secret

    def save_model(self, request: HttpRequest, obj: AlertChannel, form: Any, change: bool) -> None:
        if not change:
            secret = alert_channel_create(channel=obj, actor=_actor(request))
            if secret:
                _show_secret_once(request, obj, secret)
            return
        super().save_model(request, obj, form, change)
        if obj.kind == AlertChannel.Kind.WEBHOOK and not obj.has_secret:
            # An e-mail channel turned webhook: it needs a secret to sign with.
            secret = alert_channel_secret_rotate(channel=obj, actor=_actor(request))
            _show_secret_once(request, obj, secret)

    @admin.action(description="Rotate the signing secret of selected webhooks")
    def rotate_secrets(self, request: HttpRequest, queryset: QuerySet[AlertChannel]) -> None:
        for channel in queryset.filter(kind=AlertChannel.Kind.WEBHOOK):
            secret = alert_channel_secret_rotate(channel=channel, actor=_actor(request))
            _show_secret_once(request, channel, secret)


class AlertDeliveryInline(admin.TabularInline):
    model = AlertDelivery
    can_delete = False
    extra = 0
    fields = [
        "channel", "status", "attempts", "response_status", "last_error", "next_attempt_at",
        "delivered_at",
    ]  # fmt: skip
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """Every alert, as recorded: once per threshold per period (or per org per hour)."""

    list_display = ["created_at", "org", "kind", "budget", "period_id", "threshold", "message"]
    list_filter = ["kind", "org"]
    search_fields = ["message", "period_id"]
    date_hierarchy = "created_at"
    list_select_related = ["org", "budget", "budget__org"]
    inlines = [AlertDeliveryInline]


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at", "alert", "channel", "status", "attempts", "response_status",
        "last_error", "next_attempt_at", "delivered_at",
    ]  # fmt: skip
    list_filter = ["status", "channel__kind"]
    list_select_related = ["alert", "channel"]
