"""Server-rendered dashboard pages: plain views that call selectors and render."""

from datetime import timedelta
from zoneinfo import ZoneInfo

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from billing.selectors import recent_requests, spend_by_model, usage_totals
from routing.api import ROUTING_ROLES
from routing.selectors import deployment_health_list
from tenants.models import Organization
from tenants.selectors import membership_role, organizations_for_user


def _viewer_org(request: HttpRequest) -> tuple[list[Organization], Organization | None]:
    """The viewer's organizations and the one asked for by `?org=` (else the first)."""
    organizations = organizations_for_user(user=request.user)
    if not organizations:
        return organizations, None
    wanted = request.GET.get("org")
    org = next((o for o in organizations if o.slug == wanted), None) if wanted else organizations[0]
    if org is None:
        raise Http404("No such organization.")  # also for orgs the viewer is not in
    return organizations, org


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    """Today's and this month's usage for one of the viewer's organizations."""
    organizations, org = _viewer_org(request)
    if org is None:
        return render(request, "dashboard/no_organization.html", status=200)

    now = timezone.now()
    local_now = now.astimezone(ZoneInfo(org.time_zone))
    day_start = local_now.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    week_ago = now - timedelta(days=7)
    context = {
        "organizations": organizations,
        "org": org,
        "today": usage_totals(org_id=org.pk, since=day_start, until=now),
        "month": usage_totals(org_id=org.pk, since=month_start, until=now),
        "models": spend_by_model(org_id=org.pk, since=week_ago, until=now),
        "recent": recent_requests(org_id=org.pk, limit=25),
    }
    return render(request, "dashboard/overview.html", context)


@login_required
def deployment_health(request: HttpRequest) -> HttpResponse:
    """Circuit state, errors, latency and per-minute load of the org's deployments."""
    organizations, org = _viewer_org(request)
    if org is None:
        return render(request, "dashboard/no_organization.html", status=200)
    if membership_role(user=request.user, org=org) not in ROUTING_ROLES:
        raise PermissionDenied("Deployment health is for the organization's owners and admins.")
    rows, available = deployment_health_list(org_id=org.pk)
    context = {"organizations": organizations, "org": org, "rows": rows, "available": available}
    return render(request, "dashboard/health.html", context)
