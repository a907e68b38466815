"""Django admin for operators. Secrets are never shown back: a new key's
plaintext appears once in the confirmation message, only its prefix after."""

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Model, QuerySet
from django.http import HttpRequest

from tenants.api_tokens import api_token_revoke
from tenants.ip_allowlist import ip_allowlist_normalise
from tenants.models import (
    APIToken,
    AuditLog,
    Budget,
    Membership,
    Organization,
    Team,
    VirtualKey,
)
from tenants.services import Actor, audit_record, virtual_key_issue, virtual_key_revoke


def _actor(request: HttpRequest) -> Actor:
    return Actor(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))  # type: ignore[arg-type]


_AUDIT_HIDDEN = frozenset({"secret_hash", "password"})


def _admin_values(obj: Model) -> dict[str, Any]:
    """An object's fields as the audit log shows them; never a secret column."""
    values: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        if field.name in _AUDIT_HIDDEN or field.name.endswith("_encrypted"):
            continue
        if not getattr(field, "auto_now", False):  # the entry's own time says when
            values[field.name] = field.value_from_object(obj)
    if obj.pk is not None:
        for field in obj._meta.many_to_many:
            values[field.name] = sorted(related.pk for related in getattr(obj, field.name).all())
    return json.loads(json.dumps(values, cls=DjangoJSONEncoder))


def _admin_secrets(obj: Model) -> dict[str, str]:
    """Encrypted columns, only to tell whether one changed ("api_key": "changed")."""
    return {
        field.name.removesuffix("_encrypted"): field.value_from_object(obj)
        for field in obj._meta.concrete_fields
        if field.name.endswith("_encrypted")
    }


class AuditedAdmin(admin.ModelAdmin):
    """Changes made in the Django admin write an audit entry (who, what, before and after,
    when), as the dashboard and the API do through their services. Secrets are never
    copied into it: an encrypted column shows only as "set" or "changed"."""

    def _audit_action(self, obj: Model, verb: str) -> str:
        return f"{str(obj._meta.verbose_name).replace(' ', '_')}.{verb}"

    def _audit(self, request: HttpRequest, obj: Model, verb: str, before: Any, after: Any) -> None:
        if isinstance(obj, Organization):
            org = None if verb == "delete" else obj  # an entry would keep it from going
        elif hasattr(obj, "org"):
            org = obj.org
        else:
            org = getattr(getattr(obj, "provider", None), "org", None)  # a deployment
        audit_record(
            actor=_actor(request),
            org=org,
            action=self._audit_action(obj, verb),
            target=obj,
            before=before,
            after=after,
        )

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        obj = super().get_object(request, object_id, from_field)
        if obj is not None:  # as stored, before the form changes it
            obj._audit_before = (_admin_values(obj), _admin_secrets(obj))
        return obj

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        obj._audit_pending = True  # written once its many-to-many fields are saved too

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        obj = form.instance
        if not getattr(obj, "_audit_pending", False):
            return  # saved through a service, which wrote its own entry
        obj._audit_pending = False
        after = _admin_values(obj)
        stored = getattr(obj, "_audit_before", None) if change else None
        if stored is None:
            secrets_set = [name for name, value in _admin_secrets(obj).items() if value]
            self._audit(request, obj, "create", None, after | dict.fromkeys(secrets_set, "set"))
            return
        before, secrets_before = stored
        changed = [name for name in after if before.get(name) != after[name]]
        secrets = [
            name for name, value in _admin_secrets(obj).items() if value != secrets_before[name]
        ]
        if changed or secrets:
            self._audit(
                request,
                obj,
                "update",
                {name: before.get(name) for name in changed},
                {name: after[name] for name in changed} | dict.fromkeys(secrets, "changed"),
            )

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        before = _admin_values(obj)
        self._audit(request, obj, "delete", before, None)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        for obj in queryset:
            self._audit(request, obj, "delete", _admin_values(obj), None)
        super().delete_queryset(request, queryset)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows that are appended or computed, never edited by hand: listed and inspected."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Organization)
class OrganizationAdmin(AuditedAdmin):
    list_display = ["name", "slug", "time_zone", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}


@admin.register(Team)
class TeamAdmin(AuditedAdmin):
    list_display = ["name", "slug", "org", "created_at"]
    list_filter = ["org"]
    search_fields = ["name", "slug"]


@admin.register(Membership)
class MembershipAdmin(AuditedAdmin):
    list_display = ["user", "org", "role", "team"]
    list_filter = ["org", "role"]
    autocomplete_fields = ["user"]


class VirtualKeyAdminForm(forms.ModelForm):
    """A key as the admin edits it: its IP allowlist checked and stored as the API stores
    it (canonical CIDRs), so a wrong entry is a form error."""

    class Meta:
        model = VirtualKey
        fields = ["allowed_ips"]
        help_texts = {
            "allowed_ips": "A list of client IP addresses or networks (CIDR, IPv4 or IPv6), e.g. "
            '["203.0.113.0/24", "2001:db8::/32"]; requests from elsewhere get 403. []: anywhere.'
        }

    def clean_allowed_ips(self) -> list[str]:
        value = self.cleaned_data["allowed_ips"]
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValidationError('Give a list of IP addresses or networks, e.g. ["10.0.0.0/8"].')
        try:
            return ip_allowlist_normalise(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


@admin.register(VirtualKey)
class VirtualKeyAdmin(AuditedAdmin):
    list_display = ["name", "prefix", "org", "team", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["org", "revoked_at"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["prefix", "last_used_at", "revoked_at", "created_at", "updated_at"]
    form = VirtualKeyAdminForm
    fields = [
        "org", "team", "owner", "name", "allowed_models", "allowed_ips", "expires_at",
        "rpm_limit", "tpm_limit", "metadata", "prefix", "last_used_at", "revoked_at",
        "created_at", "updated_at",
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
            allowed_ips=obj.allowed_ips,
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
class BudgetAdmin(AuditedAdmin):
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
