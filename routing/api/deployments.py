"""Deployments (one upstream model at one of the org's providers): list, add, read, change.

A deployment belongs to an org through its provider; platform providers' deployments
are not the org's to see or change here. There is no delete: disable with `enabled: false`.
"""

from typing import Any

import django_filters
from django.db import transaction
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from routing.models import Deployment, Provider
from routing.services import deployment_create, deployment_update
from tenants.api.base import IF_MATCH, ManagementAPIView
from tenants.api.fields import MAX_INT, IdFilter

# Optional with the model's default; timeouts must be positive (a check constraint).
COUNT = {"required": False, "min_value": 0, "max_value": MAX_INT}
TIMEOUT_MS = {"required": False, "min_value": 1, "max_value": MAX_INT}
LIMIT = {"required": False, "allow_null": True, "min_value": 1, "max_value": MAX_INT}


class DeploymentSerializer(serializers.ModelSerializer[Deployment]):
    class Meta:
        model = Deployment
        fields = [
            "id", "provider", "name", "upstream_model", "weight", "priority",
            "connect_timeout_ms", "ttft_timeout_ms", "read_timeout_ms", "total_timeout_ms",
            "context_window_tokens", "rpm_limit", "tpm_limit", "enabled",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields


class DeploymentChangeFields(serializers.Serializer[Any]):
    """The editable fields, all optional: PATCH changes only what it is sent."""

    name = serializers.CharField(max_length=200, required=False)
    upstream_model = serializers.CharField(max_length=200, required=False)
    weight = serializers.IntegerField(**COUNT, help_text="Share of traffic (weighted routes).")
    priority = serializers.IntegerField(**COUNT, help_text="Lower is tried first.")
    connect_timeout_ms = serializers.IntegerField(**TIMEOUT_MS)
    ttft_timeout_ms = serializers.IntegerField(
        **TIMEOUT_MS, help_text="Longest wait for the first byte of the answer."
    )
    read_timeout_ms = serializers.IntegerField(
        **TIMEOUT_MS, help_text="Longest silence between two chunks."
    )
    total_timeout_ms = serializers.IntegerField(**TIMEOUT_MS)
    context_window_tokens = serializers.IntegerField(
        **LIMIT, help_text="Longer requests go elsewhere. Null: unknown."
    )
    rpm_limit = serializers.IntegerField(**LIMIT, help_text="The provider's limit. Null: none.")
    tpm_limit = serializers.IntegerField(**LIMIT, help_text="The provider's limit. Null: none.")
    enabled = serializers.BooleanField(required=False)


class DeploymentUpdateSerializer(DeploymentChangeFields):
    """PATCH: only the fields sent change (the provider never does)."""


class DeploymentCreateSerializer(DeploymentChangeFields):
    provider = serializers.PrimaryKeyRelatedField(
        queryset=Provider.objects.none(), help_text="One of this organization's providers."
    )
    name = serializers.CharField(max_length=200, help_text="Unique within its provider.")
    upstream_model = serializers.CharField(
        max_length=200, help_text="The model name the provider expects."
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        org = self.context.get("org")
        # Another org's provider id reads exactly like a missing one.
        self.fields["provider"].queryset = Provider.objects.filter(org=org)  # type: ignore[attr-defined]


class DeploymentFilter(django_filters.FilterSet):
    # By id, not as a choice of all providers: an unknown id must not tell
    # "another org's" from "missing" apart.
    provider = IdFilter(field_name="provider_id", label="Provider id")

    class Meta:
        model = Deployment
        fields = ["provider", "enabled", "upstream_model"]


class DeploymentsView(ManagementAPIView):
    # Deployments belong to the org through their provider.
    queryset = Deployment.objects.all()

    def org_queryset(self, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(provider__org=self.caller.org)


class DeploymentListView(DeploymentsView):
    """Deployments of the organization's own providers."""

    serializer_class = DeploymentSerializer
    filterset_class = DeploymentFilter
    ordering_fields = ["name", "priority", "upstream_model", "created_at"]
    ordering = ["priority", "name"]

    @extend_schema(summary="List deployments", responses=DeploymentSerializer(many=True))
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(DeploymentSerializer(page, many=True).data)

    @extend_schema(
        summary="Add a deployment to one of the organization's providers",
        request=DeploymentCreateSerializer,
        responses={201: DeploymentSerializer},
    )
    def post(self, request: Request) -> Response:
        given = DeploymentCreateSerializer(data=request.data, context={"org": self.caller.org})
        given.is_valid(raise_exception=True)
        values = dict(given.validated_data)
        provider = values.pop("provider")
        deployment = deployment_create(provider=provider, actor=self.caller.actor, values=values)
        response = Response(DeploymentSerializer(deployment).data, status=status.HTTP_201_CREATED)
        return self.with_etag(response, deployment)


class DeploymentDetailView(DeploymentsView):
    """One deployment. To stop using it, PATCH `enabled: false` (there is no delete)."""

    serializer_class = DeploymentSerializer

    @extend_schema(summary="Read a deployment")
    def get(self, request: Request, pk: int) -> Response:
        deployment = self.get_object()
        return self.with_etag(Response(DeploymentSerializer(deployment).data), deployment)

    @extend_schema(
        summary="Change a deployment's model, share of traffic, timeouts or limits",
        parameters=[IF_MATCH],
        request=DeploymentUpdateSerializer,
        responses=DeploymentSerializer,
    )
    def patch(self, request: Request, pk: int) -> Response:
        given = DeploymentUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        with transaction.atomic():
            deployment = deployment_update(
                deployment=self.locked_object(),
                actor=self.caller.actor,
                changes=given.validated_data,
            )
        return self.with_etag(Response(DeploymentSerializer(deployment).data), deployment)
