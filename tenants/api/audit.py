"""The audit log, read-only for every role: who changed what, when, from where."""

from datetime import UTC, datetime
from typing import Any

import django_filters
from django import forms
from django.db.models import Q, QuerySet
from django_filters.fields import IsoDateTimeField
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.base import ManagementAPIView
from tenants.models import AuditLog

SECRET_HINTS = ("secret", "password", "token", "api_key", "plaintext", "credential", "hash")


def _masked(values: Any) -> Any:
    """Values under secret-sounding names hidden: the services never record a secret,
    this is a second line of defence."""
    if not isinstance(values, dict):
        return values
    return {
        name: "(hidden)" if any(hint in name.lower() for hint in SECRET_HINTS) else value
        for name, value in values.items()
    }


class AuditEntrySerializer(serializers.ModelSerializer[AuditLog]):
    actor = serializers.SerializerMethodField()
    before = serializers.JSONField(read_only=True, allow_null=True)
    after = serializers.JSONField(read_only=True, allow_null=True)

    class Meta:
        model = AuditLog
        fields = [
            "id", "created_at", "action", "target_type", "target_id", "actor", "ip_address",
            "before", "after",
        ]  # fmt: skip
        read_only_fields = fields

    def get_actor(self, entry: AuditLog) -> str:
        """The user's name, or the tool's label ("api token tgm_…", "cli")."""
        if entry.actor is not None:
            return entry.actor.get_username()
        return entry.actor_label

    def to_representation(self, entry: AuditLog) -> dict[str, Any]:
        data = super().to_representation(entry)
        data["before"], data["after"] = _masked(data["before"]), _masked(data["after"])
        return data


class BoundedDateTimeField(IsoDateTimeField):
    """An ISO 8601 time, in UTC: PostgreSQL refuses offsets beyond ±16 hours, which
    Python accepts, and the years 1 and 9999 may not convert at all."""

    def to_python(self, value: Any) -> datetime | None:
        parsed = super().to_python(value)
        if parsed is None:
            return None
        if not datetime.min.year < parsed.year < datetime.max.year:
            raise forms.ValidationError("Give a time between the years 2 and 9998.")
        return parsed.astimezone(UTC)


class InstantFilter(django_filters.IsoDateTimeFilter):
    field_class = BoundedDateTimeField


class AuditFilter(django_filters.FilterSet):
    action = django_filters.CharFilter(
        method="filter_action",
        help_text='An action ("virtual_key.revoke"), or its kind: "virtual_key" or '
        '"virtual_key." match every virtual_key action.',
    )
    target_type = django_filters.CharFilter(help_text='A model label, e.g. "tenants.virtualkey".')
    actor = django_filters.CharFilter(
        method="filter_actor", help_text="Part of the user's name or the tool's label."
    )
    since = InstantFilter(
        field_name="created_at", lookup_expr="gte", help_text="At or after this time."
    )
    until = InstantFilter(field_name="created_at", lookup_expr="lt", help_text="Before this time.")

    class Meta:
        model = AuditLog
        fields = ["action", "target_type", "actor", "since", "until"]

    def filter_action(
        self, queryset: QuerySet[AuditLog], name: str, value: str
    ) -> QuerySet[AuditLog]:
        kind = value.removesuffix(".")
        if kind != value:
            return queryset.filter(action__startswith=value)
        return queryset.filter(Q(action=value) | Q(action__startswith=f"{kind}."))

    def filter_actor(
        self, queryset: QuerySet[AuditLog], name: str, value: str
    ) -> QuerySet[AuditLog]:
        return queryset.filter(
            Q(actor__username__icontains=value) | Q(actor_label__icontains=value)
        )


class AuditListView(ManagementAPIView):
    """Every administrative change in your organization, newest first; read-only."""

    queryset = AuditLog.objects.select_related("actor")
    serializer_class = AuditEntrySerializer
    filterset_class = AuditFilter
    ordering_fields = ["created_at"]
    ordering = ["-created_at", "-id"]

    @extend_schema(
        summary="List audit entries, newest first", responses=AuditEntrySerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(AuditEntrySerializer(page, many=True).data)


class AuditDetailView(ManagementAPIView):
    """One administrative change; read-only."""

    queryset = AuditLog.objects.select_related("actor")
    serializer_class = AuditEntrySerializer

    @extend_schema(summary="Read an audit entry")
    def get(self, request: Request, pk: int) -> Response:
        entry = self.get_object()
        return self.with_etag(Response(AuditEntrySerializer(entry).data), entry)
