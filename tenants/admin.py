"""Django admin for operators. Secrets are never shown back: a new key's
plaintext appears once in the confirmation message, only its prefix after."""

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.api_tokens import api_token_revoke
from tenants.models import (
    APIToken,
    AuditLog,
    Budget,
    Membership,
    Organization,
    Team,
    VirtualKey,
)
from tenants.services import Actor, virtual_key_issue, virtual_key_revoke


def _actor(request: HttpRequest) -> Actor:
    return Actor(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))  # type: ignore[arg-type]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that are appended or computed, never edited by hand: listed and inspected."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "time_zone", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "org", "created_at"]
    list_filter = ["org"]
    search_fields = ["name", "slug"]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "org", "role", "team"]
    list_filter = ["org", "role"]
    autocomplete_fields = ["user"]


@admin.register(VirtualKey)
class VirtualKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "org", "team", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["org", "revoked_at"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "last_used_at", "revoked_at", "created_at", "updated_at"]
    fields = [
        "org", "team", "owner", "name", "allowed_models", "expires_at", "rpm_limit", "tpm_limit",
        "metadata", "prefix", "last_used_at", "revoked_at", "created_at", "updated_at",
    ]  # fmt: skip
    actions = ["revoke_keys"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # usage history points at keys: revoke instead

    def save_model(self, request: HttpRequest, obj: VirtualKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        issued = virtual_key_issue(
            org=obj.org,
            team=obj.team,
            owner=obj.owner,
            name=obj.name,
            allowed_models=obj.allowed_models,
            expires_at=obj.expires_at,
            metadata=obj.metadata,
            rpm_limit=obj.rpm_limit,
            tpm_limit=obj.tpm_limit,
            actor=_actor(request),
        )
        obj.pk, obj.prefix = issued.key.pk, issued.key.prefix
        messages.warning(
            request,
            f"New key (shown only now, copy it): {issued.plaintext}",
        )

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[VirtualKey]) -> None:
        for key in queryset:
            virtual_key_revoke(key=key, actor=_actor(request))
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    list_display = ["__str__", "scope", "team", "key", "period", "limit_nanos", "enforcement"]
    list_filter = ["org", "scope", "period", "enforcement"]


@admin.register(APIToken)
class APITokenAdmin(ReadOnlyAdmin):
    """Management API tokens: created in the dashboard (or `create_api_token`), where the
    secret can be shown once; here they are listed and can be revoked."""

    list_display = [
        "name", "org", "role", "prefix", "created_by", "created_at", "last_used_at",
        "expires_at", "revoked_at",
    ]  # fmt: skip
    list_filter = ["org", "role"]
    search_fields = ["name", "prefix"]
    exclude = ["secret_hash"]
    actions = ["revoke_tokens"]

    @admin.action(description="Revoke selected API tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[APIToken]) -> None:
        for token in queryset:
            api_token_revoke(token=token, actor=_actor(request))
        self.message_user(request, f"Revoked {queryset.count()} API token(s).")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None  # the list and its revoke action; no edit form


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdmin):
    """Read-only: the audit log is append-only."""

    list_display = [
        "created_at",
        "org",
        "actor",
        "actor_label",
        "action",
        "target_type",
        "target_id",
    ]
    list_filter = ["org", "action"]
    search_fields = ["action", "target_id", "actor_label"]
