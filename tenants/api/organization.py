"""The caller's organization: read it, change its name, time zone, body logging and limits."""

from typing import Any

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.api.base import IF_MATCH, ManagementAPIView, if_match_check
from tenants.api.fields import RATE_LIMIT
from tenants.members import organization_settings_update
from tenants.models import Organization
from tenants.services import organization_limits_update


class OrganizationSerializer(serializers.ModelSerializer[Organization]):
    class Meta:
        model = Organization
        fields = [
            "id", "slug", "name", "time_zone", "log_request_bodies", "rpm_limit", "tpm_limit",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields


class OrganizationUpdateSerializer(serializers.Serializer[Any]):
    """PATCH: only the fields sent change."""

    name = serializers.CharField(max_length=200, required=False)
    time_zone = serializers.CharField(
        max_length=64, required=False, help_text="An IANA zone, e.g. Europe/Berlin."
    )
    log_request_bodies = serializers.BooleanField(required=False)
    rpm_limit = serializers.IntegerField(**RATE_LIMIT)
    tpm_limit = serializers.IntegerField(**RATE_LIMIT)


class OrganizationView(ManagementAPIView):
    """Your organization. Its time zone sets the days of budget periods, reports and
    statements; with body logging on, the request log keeps prompts and answers."""

    serializer_class = OrganizationSerializer
    filter_backends: list[Any] = []
    pagination_class = None

    @extend_schema(summary="Read your organization")
    def get(self, request: Request) -> Response:
        org = self.caller.org
        return self.with_etag(Response(OrganizationSerializer(org).data), org)

    @extend_schema(
        summary="Change your organization's settings",
        parameters=[IF_MATCH],
        request=OrganizationUpdateSerializer,
        responses=OrganizationSerializer,
    )
    def patch(self, request: Request) -> Response:
        given = OrganizationUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        values = given.validated_data
        with transaction.atomic():
            org = Organization.objects.select_for_update().get(pk=self.caller.org.pk)
            if_match_check(request, org)
            org = organization_settings_update(
                org=org, actor=self.caller.actor,
                name=values.get("name", org.name),
                time_zone=values.get("time_zone", org.time_zone),
                log_request_bodies=values.get("log_request_bodies", org.log_request_bodies),
            )  # fmt: skip
            if {"rpm_limit", "tpm_limit"} & values.keys():
                org = organization_limits_update(
                    org=org, actor=self.caller.actor,
                    rpm_limit=values.get("rpm_limit", org.rpm_limit),
                    tpm_limit=values.get("tpm_limit", org.tpm_limit),
                )  # fmt: skip
        return self.with_etag(Response(OrganizationSerializer(org).data), org)
