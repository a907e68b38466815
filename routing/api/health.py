"""Deployment health: circuit state and load of every deployment the org's traffic may reach.

Routing internals are for the people who configure routing: admins only.
"""

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from routing.health import CircuitState
from routing.selectors import DeploymentHealthRow, deployment_health_list
from tenants.api.base import ADMIN_ONLY, ManagementAPIView


class DeploymentHealthSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    name = serializers.CharField()
    provider = serializers.CharField(help_text="The provider's name.")
    provider_kind = serializers.CharField()
    upstream_model = serializers.CharField()
    routes = serializers.ListField(
        child=serializers.CharField(), help_text="Model names of the routes that use it."
    )
    enabled = serializers.BooleanField(help_text="The deployment and its provider are enabled.")
    circuit = serializers.ChoiceField(choices=[state.value for state in CircuitState])
    retry_in_s = serializers.FloatField(
        allow_null=True,
        help_text="While open: seconds until a probe is let through (0: the next request "
        "probes). Null when not open.",
    )
    consecutive_failures = serializers.IntegerField()
    window_requests = serializers.IntegerField()
    window_failures = serializers.IntegerField()
    latency_ms = serializers.FloatField(allow_null=True)
    ttft_ms = serializers.FloatField(allow_null=True)
    in_flight = serializers.IntegerField()
    requests_last_minute = serializers.IntegerField()
    tokens_last_minute = serializers.IntegerField()
    rpm_limit = serializers.IntegerField(allow_null=True)
    tpm_limit = serializers.IntegerField(allow_null=True)
    live = serializers.BooleanField(help_text="False: no live replica has called it lately.")


class DeploymentHealthListSerializer(serializers.Serializer[Any]):
    object = serializers.ChoiceField(choices=["list"])
    organization = serializers.CharField(help_text="The org's slug.")
    live_state_available = serializers.BooleanField(
        help_text="False when the shared health board could not be read: rows lack live state."
    )
    data = DeploymentHealthSerializer(many=True)


def _health_json(row: DeploymentHealthRow) -> dict[str, object]:
    status = row.status
    return {
        "id": row.deployment_id,
        "name": row.name,
        "provider": row.provider_name,
        "provider_kind": row.provider_kind,
        "upstream_model": row.upstream_model,
        "routes": list(row.routes),
        "enabled": row.enabled,
        "circuit": status.state.value if status else CircuitState.CLOSED.value,
        "retry_in_s": (
            round(status.retry_in_s, 1) if status and status.retry_in_s is not None else None
        ),
        "consecutive_failures": status.consecutive_failures if status else 0,
        "window_requests": status.window_requests if status else 0,
        "window_failures": status.window_failures if status else 0,
        "latency_ms": round(status.latency_ms, 1) if status and status.latency_ms else None,
        "ttft_ms": round(status.ttft_ms, 1) if status and status.ttft_ms else None,
        "in_flight": status.in_flight if status else 0,
        "requests_last_minute": status.minute_requests if status else 0,
        "tokens_last_minute": status.minute_tokens if status else 0,
        "rpm_limit": row.rpm_limit,
        "tpm_limit": row.tpm_limit,
        "live": status is not None,
    }


class DeploymentHealthView(ManagementAPIView):
    """GET /api/v1/deployments/health/: circuit state and load of every deployment."""

    read_roles = ADMIN_ONLY
    serializer_class = DeploymentHealthListSerializer
    # One unpaginated snapshot of the whole fleet, not a list to page or filter.
    pagination_class = None
    filter_backends: list[Any] = []

    @extend_schema(
        summary="Deployment health: circuit state and load of every deployment",
        responses=DeploymentHealthListSerializer,
    )
    def get(self, request: Request) -> Response:
        rows, available = deployment_health_list(org_id=self.caller.org.pk)
        snapshot = {
            "object": "list",
            "organization": self.caller.org.slug,
            "live_state_available": available,
            "data": [_health_json(row) for row in rows],
        }
        return Response(DeploymentHealthListSerializer(snapshot).data)
