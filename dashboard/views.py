"""Server-rendered dashboard pages: plain views that call selectors and render."""

from datetime import timedelta
from zoneinfo import ZoneInfo

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from billing.selectors import recent_requests, spend_by_model, usage_totals
from tenants.selectors import organizations_for_user


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    """Today's and this month's usage for one of the viewer's organizations."""
    organizations = organizations_for_user(user=request.user)
    if not organizations:
        return render(request, "dashboard/no_organization.html", status=200)
    wanted = request.GET.get("org")
    org = next((o for o in organizations if o.slug == wanted), None) if wanted else organizations[0]
    if org is None:
        raise Http404("No such organization.")  # also for orgs the viewer is not in

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
