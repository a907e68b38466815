"""Server-rendered dashboard pages: plain views that call selectors and render."""

from django.http import HttpRequest, HttpResponse

from dashboard.access import ADMIN_ROLES, Viewer, org_page, render_page
from routing.selectors import deployment_health_list


@org_page(ADMIN_ROLES, refusal="Deployment health is for the organization's owners and admins.")
def deployment_health(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Circuit state, errors, latency and per-minute load of the org's deployments."""
    rows, available = deployment_health_list(org_id=viewer.org.pk)
    return render_page(
        request, viewer, "dashboard/health.html", {"rows": rows, "available": available}
    )
