"""Management API endpoints of routing (session-authenticated until API tokens exist)."""

from django.http import Http404
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from routing.selectors import DeploymentHealthRow, deployment_health_list
from tenants.api_base import ManagementAPIView
from tenants.models import Membership, Organization
from tenants.selectors import membership_role

# Who may see routing internals: the people who configure it.
ROUTING_ROLES = {Membership.Role.OWNER, Membership.Role.ADMIN}


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
        "circuit": status.state.value if status else "closed",
        "retry_in_s": round(status.retry_in_s, 1) if status and status.retry_in_s else None,
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
    """GET /api/v1/deployments/health/?org=<slug>: circuit state and load of every deployment."""

    def get(self, request: Request) -> Response:
        org = Organization.objects.filter(slug=request.query_params.get("org", "")).first()
        role = membership_role(user=request.user, org=org) if org else None
        if org is None or role is None:
            raise Http404("No such organization.")  # the same for orgs the caller is not in
        if role not in ROUTING_ROLES:
            raise PermissionDenied("Deployment health is for the organization's owners and admins.")
        rows, available = deployment_health_list(org_id=org.pk)
        return Response(
            {
                "object": "list",
                "organization": org.slug,
                "live_state_available": available,
                "data": [_health_json(row) for row in rows],
            }
        )
