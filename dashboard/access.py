"""Who is looking: the viewer's organization and role, resolved once per page.

Every dashboard page is wrapped in `org_page(...)`. It sends anonymous visitors to
sign in, finds the organization asked for (`?org=<slug>`, else the last one opened,
else the first) among the viewer's own, and refuses roles the page is not for.
An organization the viewer is not in is a 404, exactly like one that does not
exist. Views then fetch every object through `viewer.org` (and, for members,
`viewer.team_id`), so a direct URL to another org's object is a 404 too.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Concatenate, ParamSpec

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import urlencode

from tenants.models import Membership, Organization

Role = Membership.Role
ALL_ROLES = frozenset(Role.values)
ADMIN_ROLES = frozenset({Role.OWNER, Role.ADMIN})
FINANCE_ROLES = ADMIN_ROLES | {Role.FINANCE}

_SESSION_ORG = "dashboard_org"

P = ParamSpec("P")
OrgView = Callable[Concatenate[HttpRequest, "Viewer", P], HttpResponse]


@dataclass(frozen=True)
class Viewer:
    """A signed-in user looking at one of their organizations, in one role."""

    user: Any
    org: Organization
    role: str
    # A member's own team (members see that team's keys and usage); None otherwise.
    team_id: int | None
    organizations: list[Organization] = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        """Owners and admins: may change everything in the organization."""
        return self.role in ADMIN_ROLES

    @property
    def sees_finance(self) -> bool:
        """Owners, admins and finance: spend of the whole org, reports, statements."""
        return self.role in FINANCE_ROLES

    @property
    def is_member(self) -> bool:
        """Plain members: limited to their own team."""
        return self.role == Role.MEMBER

    def url(self, name: str, *args: object, **query: object) -> str:
        """The URL of a dashboard page for this org: `reverse(name, args)?org=<slug>&...`."""
        params = {"org": self.org.slug, **{k: v for k, v in query.items() if v not in (None, "")}}
        return f"{reverse(name, args=args)}?{urlencode(params)}"


def viewer_for(request: HttpRequest) -> Viewer | None:
    """The signed-in user's view of the org asked for; None if they belong to no org.

    Raises Http404 for an org slug that is not one of theirs.
    """
    memberships = list(
        Membership.objects.filter(user=request.user).select_related("org").order_by("org__name")
    )
    if not memberships:
        return None
    asked, remembered = request.GET.get("org"), request.session.get(_SESSION_ORG)
    chosen = memberships[0]
    if asked or remembered:
        found = next((m for m in memberships if m.org.slug == (asked or remembered)), None)
        if found is None and asked:
            raise Http404("No such organization.")  # the same for orgs the viewer is not in
        chosen = found or chosen
    # Remember a switch (a session write) only when there is something to remember.
    if chosen.org.slug != remembered and (remembered or chosen is not memberships[0]):
        request.session[_SESSION_ORG] = chosen.org.slug
    return Viewer(
        user=request.user,
        org=chosen.org,
        role=chosen.role,
        team_id=chosen.team_id,
        organizations=[m.org for m in memberships],
    )


def org_page(
    roles: frozenset[str] = ALL_ROLES, *, refusal: str = "This page is not open to your role."
) -> Callable[[OrgView[P]], Callable[..., HttpResponse]]:
    """Wrap a view `view(request, viewer, ...)`: sign-in, org scope and role checked first."""

    def decorate(view: OrgView[P]) -> Callable[..., HttpResponse]:
        @login_required
        @wraps(view)
        def page(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
            viewer = viewer_for(request)
            if viewer is None:
                return render(request, "dashboard/no_organization.html")
            if viewer.role not in roles:
                raise PermissionDenied(refusal)
            return view(request, viewer, *args, **kwargs)

        return page

    return decorate


@dataclass(frozen=True)
class NavItem:
    label: str
    url_name: str
    roles: frozenset[str]


# The side navigation, in order; each page shows only to the roles it serves.
NAVIGATION = (
    NavItem("Overview", "dashboard:overview", ALL_ROLES),
    NavItem("Requests", "dashboard:requests", ALL_ROLES),
    NavItem("Keys", "dashboard:keys", ALL_ROLES),
    NavItem("Budgets", "dashboard:budgets", ALL_ROLES),
    NavItem("Providers & routes", "dashboard:providers", ADMIN_ROLES),
    NavItem("Deployment health", "dashboard:health", ADMIN_ROLES),
    NavItem("Cost reports", "dashboard:reports", FINANCE_ROLES),
    NavItem("Statements", "dashboard:statements", FINANCE_ROLES),
    NavItem("Audit log", "dashboard:audit", FINANCE_ROLES),
    NavItem("Settings", "dashboard:settings", ADMIN_ROLES),
)


def render_page(
    request: HttpRequest,
    viewer: Viewer,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
) -> HttpResponse:
    """Render a dashboard page with what base.html needs: viewer, org, switcher, nav."""
    here = request.resolver_match.view_name if request.resolver_match else ""
    nav = [
        {
            "label": item.label,
            "url": viewer.url(item.url_name),
            # Sub-pages are named after their section: dashboard:keys_detail is under Keys.
            "current": here == item.url_name or here.startswith(f"{item.url_name}_"),
        }
        for item in NAVIGATION
        if viewer.role in item.roles
    ]
    return render(
        request,
        template,
        {
            "viewer": viewer,
            "org": viewer.org,
            "organizations": viewer.organizations,
            "nav": nav,
            **(context or {}),
        },
        status=status,
    )
