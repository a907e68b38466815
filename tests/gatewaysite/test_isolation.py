"""Tenant isolation over every URL the project serves (issue 10).

Two organizations, "alphaiso" (A) and "bravoiso" (B), each hold an object of every kind.
As each role of A (owner, admin, finance, member) and with each of A's API tokens and its
virtual key, the suite asks every URL for B's objects and expects what the README
documents: 404, exactly like an object that does not exist (403 where the role may not
use the page at all, for any id), never a success, never any of B's names, prefixes or
ids in the body, and B's rows unchanged afterwards.

`REGISTRY` gives each URL pattern its case, or says why it addresses no org's object.
`test_every_served_url_has_an_isolation_case` walks Django's resolver and the ASGI
paths served before Django, so a new URL without a case fails that test, naming it.
"""

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from billing.rollups import rollups_refresh
from dashboard.access import ADMIN_ROLES, ALL_ROLES, FINANCE_ROLES
from tenants.api_tokens import api_token_create
from tenants.models import AuditLog, Membership
from tests.conftest import TEST_ACTOR, IssueKey, MakeRoute
from tests.dashboard.test_live import (
    Socket,
    closed_with,
    open_feed,
    ready_feed,
    record,
    requests_pushed,
    session_cookie,
    write_from_worker_thread,
)
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.gateway import GatewayServer, wait_for_config, wait_for_usage_writes_to_settle
from tests.support.isolation import (
    MEMBERSHIP_ROLES,
    TOKEN_ROLES,
    OrgWorld,
    api_caller,
    asgi_paths,
    browser,
    leaks,
    org_state,
    org_world_build,
    previous_month,
    served_patterns,
)

Role = Membership.Role
MEMBER_ISSUERS = ADMIN_ROLES | {Role.MEMBER}  # who may open "new key"
MISSING_ID = 987_654_321
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
SESSION_METHODS = ("GET", "POST", "DELETE")  # the API through the dashboard's session

Params = Callable[[OrgWorld, OrgWorld], dict[str, Any]]  # (A, B) -> query string


# ------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Exempt:
    """A URL that addresses no org's object; `public` pages are fetched anonymously and
    as each of A's roles, and must show nothing of B."""

    reason: str
    public: str | None = None


@dataclass(frozen=True)
class Covered:
    """Served outside Django (ASGI); the test named here covers it."""

    test: str


@dataclass(frozen=True)
class Variant:
    """A query string for a page of A; `status` None accepts 200 or 400."""

    params: Params
    status: int | None = 200


def _plain(a: OrgWorld, b: OrgWorld) -> dict[str, Any]:
    return {}


PLAIN = (Variant(_plain),)


@dataclass(frozen=True)
class Page:
    """A dashboard page without an object in its URL: its org is `?org=<slug>`.

    `roles` get 200 on A's page (others 403); with `?org=<B's slug>` every role gets 404.
    `shows` is a string of A the page must show to `roles` (so the page really renders
    the org's data); `variants` add query strings that name B's objects.
    """

    roles: frozenset[str]
    methods: tuple[str, ...] = ("GET", "POST")
    variants: tuple[Variant, ...] = PLAIN
    shows: str | None = None
    arg: Callable[[OrgWorld], str] | None = None  # a URL argument that is not an object


@dataclass(frozen=True)
class Object:
    """A dashboard URL addressing one object: `obj(B)` gives B's, and its id goes in the URL.

    `roles` reach the view (others get 403 for any id); `methods` are those it answers
    (others 405). `control` sends the first method to A's own object as A's owner, which
    must be answered (no 403/404/405, no 5xx): the URL works, so B's 404 is the org scope.
    """

    obj: Callable[[OrgWorld], Any]
    roles: frozenset[str] = ALL_ROLES
    methods: tuple[str, ...] = ("GET", "POST")
    control: bool = True
    missing: str = str(MISSING_ID)


@dataclass(frozen=True)
class ApiObject:
    """A management API URL addressing one object of `obj(B)`."""

    obj: Callable[[OrgWorld], Any]


@dataclass(frozen=True)
class ApiList:
    """A management API URL without an object: its org is the caller's."""

    variants: tuple[Variant, ...] = PLAIN
    shows: str | None = None


class AdminSite:
    """The Django admin: staff only. No org role makes a user staff, so every admin URL
    sends A's users to the admin's sign-in (or answers 404), whatever B object it names."""


Case = Exempt | Covered | Page | Object | ApiObject | ApiList


def pk_of(attr: str) -> Callable[[OrgWorld], Any]:
    return lambda world: getattr(world, attr)


def in_url(value: Any) -> str:
    """How an object appears in a URL: its primary key (or the value itself)."""
    return str(getattr(value, "pk", value))


def membership(world: OrgWorld) -> Membership:
    """A plain member's membership (an owner's could not be removed: the last owner)."""
    return world.memberships[Role.MEMBER]


def audit_entry(world: OrgWorld) -> AuditLog:
    return AuditLog.objects.filter(org=world.org).order_by("pk").first()  # type: ignore[return-value]


def since_last_month(a: OrgWorld, b: OrgWorld) -> dict[str, Any]:
    return {"since": previous_month(timezone.localdate()).isoformat()}


def report(**params: Any) -> Variant:
    return Variant(lambda a, b: {**since_last_month(a, b), **params})


def statement_month(world: OrgWorld) -> str:
    return f"{world.statement.month:%Y-%m}"


REGISTRY: dict[str, Case] = {
    # ---- the site root and accounts
    "": Exempt("redirects to the dashboard overview, which picks the caller's org", "/"),
    "dashboard/sign-in/": Exempt("the sign-in form", "/dashboard/sign-in/"),
    "dashboard/sign-out/": Exempt("ends the caller's own session (POST only)"),
    # The link is the credential: whoever holds B's token may join B (by design). Anything
    # else, B's stored hash included, is an unknown link.
    "dashboard/invite/<str:token>/": Object(
        lambda w: w.invitation.token_hash, control=False, missing=uuid.uuid4().hex
    ),
    # ---- dashboard pages of the org given by ?org=
    "dashboard/": Page(
        ALL_ROLES, variants=(Variant(_plain), Variant(lambda a, b: {"period": "7d"}))
    ),
    "dashboard/health/": Page(ADMIN_ROLES),
    "dashboard/reports/": Page(
        FINANCE_ROLES,
        shows="alphaiso team",
        variants=(
            report(),
            report(by="key"),
            report(by="model"),
            report(by="provider"),
            report(by="deployment"),
            report(by="tag"),
            report(by="end_user"),
            report(by="key", format="csv"),
            report(by="end_user", format="csv"),
            report(format="requests"),
        ),
    ),  # fmt: skip
    "dashboard/statements/": Page(FINANCE_ROLES),
    r"dashboard/statements/(?P<month>\d{4}-\d{2})/": Page(
        FINANCE_ROLES,
        arg=statement_month,
        shows="alphaiso",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"format": "csv"}),
            Variant(lambda a, b: {"format": "requests"}),
            Variant(lambda a, b: {"team": b.team.pk}, 404),
            Variant(lambda a, b: {"team": b.team.pk, "format": "csv"}, 404),
            Variant(lambda a, b: {"team": b.team.pk, "format": "requests"}, 404),
        ),
    ),  # fmt: skip
    "dashboard/keys/": Page(
        ALL_ROLES,
        shows="alphaiso key",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"team": b.team.pk}),
            Variant(lambda a, b: {"status": "active", "team": b.team.pk}),
        ),
    ),  # fmt: skip
    "dashboard/keys/new/": Page(MEMBER_ISSUERS),
    "dashboard/keys/<int:pk>/": Object(pk_of("key")),
    "dashboard/keys/<int:pk>/edit/": Object(pk_of("key"), methods=("POST",)),
    "dashboard/keys/<int:pk>/rotate/": Object(pk_of("key"), methods=("POST",)),
    "dashboard/keys/<int:pk>/revoke/": Object(pk_of("key"), methods=("POST",)),
    "dashboard/budgets/": Page(ALL_ROLES, shows="alphaiso team"),
    "dashboard/budgets/new/": Page(ADMIN_ROLES),
    "dashboard/budgets/<int:pk>/": Object(pk_of("budget")),
    "dashboard/budgets/<int:pk>/edit/": Object(pk_of("key_budget"), methods=("POST",)),
    "dashboard/budgets/<int:pk>/delete/": Object(pk_of("budget"), methods=("POST",)),
    "dashboard/providers/": Page(ADMIN_ROLES, shows="alphaiso provider"),
    "dashboard/providers/new/": Page(ADMIN_ROLES),
    "dashboard/providers/<int:pk>/edit/": Object(pk_of("provider"), ADMIN_ROLES),
    "dashboard/providers/<int:pk>/toggle/": Object(pk_of("provider"), ADMIN_ROLES, ("POST",)),
    "dashboard/providers/<int:pk>/deployments/new/": Object(pk_of("provider"), ADMIN_ROLES),
    "dashboard/deployments/<int:pk>/edit/": Object(pk_of("deployment"), ADMIN_ROLES),
    "dashboard/deployments/<int:pk>/toggle/": Object(pk_of("deployment"), ADMIN_ROLES, ("POST",)),
    "dashboard/routes/new/": Page(ADMIN_ROLES),
    "dashboard/routes/<int:pk>/edit/": Object(pk_of("route"), ADMIN_ROLES),
    "dashboard/routes/<int:pk>/toggle/": Object(pk_of("route"), ADMIN_ROLES, ("POST",)),
    "dashboard/requests/": Page(
        ALL_ROLES,
        shows="alphaiso-model",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"key": b.key.pk}, None),
            Variant(lambda a, b: {"team": b.team.pk}, None),
        ),
    ),  # fmt: skip
    "dashboard/requests/<uuid:event_id>/": Object(pk_of("event_id"), missing=str(uuid.uuid4())),
    "dashboard/audit/": Page(
        FINANCE_ROLES,
        shows="alphaiso",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"actor": b.users[Role.OWNER].pk}, None),
            Variant(lambda a, b: {"target_type": "tenants.virtualkey"}, None),
        ),
    ),  # fmt: skip
    "dashboard/settings/": Page(ADMIN_ROLES, shows="alphaiso-member"),
    "dashboard/settings/organization/": Page(ADMIN_ROLES, methods=("POST",)),
    "dashboard/settings/members/<int:pk>/": Object(membership, ADMIN_ROLES, ("POST",)),
    "dashboard/settings/members/<int:pk>/remove/": Object(membership, ADMIN_ROLES, ("POST",)),
    "dashboard/settings/invitations/": Page(ADMIN_ROLES, methods=("POST",)),
    "dashboard/settings/invitations/<int:pk>/revoke/": Object(
        pk_of("invitation"), ADMIN_ROLES, ("POST",)
    ),
    "dashboard/settings/alert-channels/new/": Page(ADMIN_ROLES),
    "dashboard/settings/alert-channels/<int:pk>/": Object(pk_of("channel"), ADMIN_ROLES),
    "dashboard/settings/alert-channels/<int:pk>/enable/": Object(
        pk_of("channel"), ADMIN_ROLES, ("POST",)
    ),
    "dashboard/settings/alert-channels/<int:pk>/rotate/": Object(
        pk_of("channel"), ADMIN_ROLES, ("POST",)
    ),
    "dashboard/settings/alert-channels/<int:pk>/delete/": Object(
        pk_of("channel"), ADMIN_ROLES, ("POST",)
    ),
    # control=False: on A's own channel it would really send a webhook.
    "dashboard/settings/alert-channels/<int:pk>/test/": Object(
        pk_of("channel"), ADMIN_ROLES, ("POST",), control=False
    ),
    "dashboard/settings/api-tokens/": Page(ADMIN_ROLES, shows="alphaiso admin token"),
    "dashboard/settings/api-tokens/<int:pk>/revoke/": Object(
        pk_of("api_token"), ADMIN_ROLES, ("POST",)
    ),
    # ---- the management API (tests/gatewaysite/test_api_scope.py checks it by schema too)
    "api/v1/organization/": ApiList(shows="alphaiso-org"),
    "api/v1/teams/": ApiList(shows="alphaiso team"),
    "api/v1/teams/<int:pk>/": ApiObject(pk_of("team")),
    "api/v1/keys/": ApiList(
        shows="alphaiso key",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"team": b.team.pk}, None),
            Variant(lambda a, b: {"search": "key"}),
        ),
    ),  # fmt: skip
    "api/v1/keys/<int:pk>/": ApiObject(pk_of("key")),
    "api/v1/keys/<int:pk>/rotate/": ApiObject(pk_of("key")),
    "api/v1/keys/<int:pk>/revoke/": ApiObject(pk_of("key")),
    "api/v1/members/": ApiList(
        shows="alphaiso-owner",
        variants=(Variant(_plain), Variant(lambda a, b: {"team": b.team.pk}, None)),
    ),
    "api/v1/members/<int:pk>/": ApiObject(membership),
    "api/v1/invitations/": ApiList(shows="alphaiso-invitee"),
    "api/v1/invitations/<int:pk>/": ApiObject(pk_of("invitation")),
    "api/v1/audit/": ApiList(
        shows="alphaiso",
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"actor": b.users[Role.OWNER].pk}, None),
        ),
    ),
    "api/v1/audit/<int:pk>/": ApiObject(audit_entry),
    "api/v1/budgets/": ApiList(
        variants=(
            Variant(_plain),
            Variant(lambda a, b: {"team": b.team.pk}, None),
            Variant(lambda a, b: {"key": b.key.pk}, None),
        ),
    ),  # fmt: skip
    "api/v1/budgets/<int:pk>/": ApiObject(pk_of("budget")),
    "api/v1/alert-channels/": ApiList(shows="alphaiso alerts"),
    "api/v1/alert-channels/<int:pk>/": ApiObject(pk_of("channel")),
    "api/v1/alert-channels/<int:pk>/rotate-secret/": ApiObject(pk_of("channel")),
    "api/v1/alert-channels/<int:pk>/test/": ApiObject(pk_of("channel")),
    "api/v1/usage/summary/": ApiList(variants=(report(),)),
    "api/v1/usage/breakdown/": ApiList(
        shows="alphaiso",
        variants=tuple(
            report(by=by) for by in ("team", "key", "model", "provider", "deployment", "tag")
        ),
    ),  # fmt: skip
    "api/v1/usage/series/": ApiList(variants=(report(),)),
    "api/v1/reports/costs/": ApiList(
        shows="alphaiso",
        variants=tuple(report(by=by) for by in ("team", "key", "model", "end_user", "tag")),
    ),
    "api/v1/statements/": ApiList(),
    "api/v1/statements/preview/": ApiList(),
    "api/v1/statements/<int:pk>/": ApiObject(pk_of("statement")),
    "api/v1/providers/": ApiList(shows="alphaiso provider"),
    "api/v1/providers/<int:pk>/": ApiObject(pk_of("provider")),
    "api/v1/deployments/": ApiList(
        shows="alphaiso-deployment",
        variants=(Variant(_plain), Variant(lambda a, b: {"provider": b.provider.pk}, None)),
    ),
    "api/v1/deployments/health/": ApiList(),
    "api/v1/deployments/<int:pk>/": ApiObject(pk_of("deployment")),
    "api/v1/routes/": ApiList(shows="alphaiso-model"),
    "api/v1/routes/<int:pk>/": ApiObject(pk_of("route")),
    "api/v1/(?P<unmatched>.*)": Exempt("any other path under /api/v1/: a JSON 404"),
    "api/schema/": Exempt("the OpenAPI schema: the same for everyone", "/api/schema/"),
    "api/docs/": Exempt("Swagger UI over the schema", "/api/docs/"),
    "api/redoc/": Exempt("ReDoc over the schema", "/api/redoc/"),
    # ---- the admin's own sign-in and sign-out (every other admin URL: AdminSite)
    "admin/login/": Exempt("the admin's sign-in form (staff only)", "/admin/login/"),
    "admin/logout/": Exempt("ends the caller's own session (POST only)"),
    # ---- served before Django by gatewaysite/asgi.py
    "/v1/chat/completions": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/v1/embeddings": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/v1/messages": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/v1/models": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/v1/models/{model}": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/v1/key/info": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/dashboard/ws/live/": Covered("test_the_live_feed_never_carries_another_orgs_requests"),
    "/healthz": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    "/readyz": Covered("test_a_key_reaches_only_its_own_orgs_models"),
    # Operators' endpoint, not a tenant's: TOLLGATE_METRICS_ALLOW_NETWORKS and
    # TOLLGATE_METRICS_TOKEN guard it; no org credential opens it (see test_metrics.py).
    "/metrics": Exempt("operators' Prometheus scrape, guarded by network and metrics token"),
}
ADMIN_SITE = AdminSite()


def case_for(pattern: Any) -> Case | AdminSite | None:
    if pattern.route in REGISTRY:
        return REGISTRY[pattern.route]
    if pattern.namespace == "admin":
        return ADMIN_SITE
    return None


def cases_of(kind: type) -> list[Any]:
    return [
        pytest.param(route, case, id=route) for route, case in REGISTRY.items()
        if isinstance(case, kind)
    ]  # fmt: skip


def test_every_served_url_has_an_isolation_case() -> None:
    patterns = served_patterns()
    served = {pattern.route for pattern in patterns} | asgi_paths()
    missing = sorted(
        pattern.route or "/" for pattern in patterns if case_for(pattern) is None
    ) + sorted(path for path in asgi_paths() if path not in REGISTRY)
    assert not missing, (
        f"URL(s) without a tenant isolation case: {missing}. Add each to REGISTRY in "
        "tests/gatewaysite/test_isolation.py: how to reach another org's object there, "
        "or Exempt(reason) if it addresses no org's object."
    )
    stale = sorted(route for route in REGISTRY if route not in served)
    assert not stale, f"REGISTRY names URL(s) no longer served: {stale}"
    for case in REGISTRY.values():
        if isinstance(case, Covered):
            assert callable(globals().get(case.test)), case.test
    assert len(patterns) > 100  # the walk reached the admin, the dashboard and the API


# ------------------------------------------------------------------ helpers


def url_of(route: str, *values: object) -> str:
    """`route` with its converters (or named groups) replaced by `values`, in order."""
    parts = iter(values)
    return "/" + re.sub(r"<[^>]+>|\(\?P<\w+>[^)]*\)", lambda _: str(next(parts)), route)


def with_query(url: str, params: dict[str, Any]) -> str:
    from urllib.parse import urlencode

    return f"{url}?{urlencode(params)}" if params else url


def send(client: Client | APIClient, method: str, url: str, body: Any = None) -> Any:
    if isinstance(client, APIClient):
        return client.generic(method, url, "{}", content_type="application/json")
    data = body or {}
    if method == "GET":
        return client.get(url)
    if method == "POST":
        return client.post(url, data)
    return client.generic(method, url, "")


@dataclass
class Findings:
    """Every wrong answer of a case, reported together."""

    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def status(self, response: Any, expected: int, what: str) -> None:
        self.check(
            response.status_code == expected, f"{what}: {response.status_code}, expected {expected}"
        )

    def no_leak(self, response: Any, world: OrgWorld, what: str) -> None:
        """None of `world`'s markers in the body, but for those the request itself carried
        (in its URL, named in `what`): the admin's sign-in page repeats the URL asked for."""
        found = [marker for marker in leaks(body_of(response), world) if marker not in what]
        self.check(not found, f"{what}: shows {found}")

    def unchanged(self, world: OrgWorld, before: dict[str, Any], what: str) -> None:
        """`world`'s rows are as they were `before`; else name the tables that changed."""
        after = org_state(world)
        changed = sorted(table for table in after if after[table] != before.get(table))
        self.check(not changed, f"{what}: changed {world.org.slug}'s rows in {changed}")

    def assert_none(self) -> None:
        shown = self.problems[:80]
        more = len(self.problems) - len(shown)
        assert not self.problems, "\n".join(shown) + (f"\n... and {more} more" if more else "")


def body_of(response: Any) -> bytes:
    """A response's body, a streamed one (CSV exports) too, read once."""
    if not getattr(response, "streaming", False):
        return bytes(response.content)
    if not hasattr(response, "iso_body"):

        async def read() -> bytes:  # as the ASGI server reads it
            return b"".join([part async for part in response.streaming_content])

        response.iso_body = async_to_sync(read)()
    return bytes(response.iso_body)


# ------------------------------------------------------------------ references in bodies


@dataclass(frozen=True)
class Reference:
    """A create or change whose body names another object by id: naming B's must be
    refused (a form error, or an API 400 naming the field) and change nothing; naming
    A's own (the control) must succeed."""

    url: Callable[[OrgWorld], str]
    body: Callable[[OrgWorld, OrgWorld], dict[str, Any]]  # (A, the org whose ids it names)
    field_name: str
    api_method: str | None = None  # None: a dashboard form POST


def _budget_form(scope: str, target: str) -> Callable[[OrgWorld, OrgWorld], dict[str, Any]]:
    return lambda a, w: {
        "scope": scope, scope: getattr(w, target).pk, "period": "monthly", "limit_usd": "5",
        "enforcement": "hard", "thresholds": "50",
    }  # fmt: skip


def _route_form(a: OrgWorld, w: OrgWorld) -> dict[str, Any]:
    from routing.forms import RouteForm
    from routing.models import Route

    form = RouteForm(org=a.org, instance=Route(org=a.org))
    data: dict[str, Any] = {}
    for name, bound in form._bound_items():  # type: ignore[attr-defined]
        value = bound.value()
        if value not in (None, "", []):
            data[name] = value
    return {**data, "model_name": "forged-form-route", "deployments": [w.deployment.pk]}


def _dash(name: str, *args: Any) -> Callable[[OrgWorld], str]:
    return lambda a: with_query(reverse(name, args=[arg(a) for arg in args]), {"org": a.org.slug})


REFERENCES = {
    "dashboard keys_new team": Reference(
        _dash("dashboard:keys_new"), lambda a, w: {"name": "forged", "team": w.team.pk}, "team"
    ),
    "dashboard budgets_new team": Reference(
        _dash("dashboard:budgets_new"), _budget_form("team", "team"), "team"
    ),
    "dashboard budgets_new key": Reference(
        _dash("dashboard:budgets_new"), _budget_form("key", "key"), "key"
    ),
    "dashboard route_new deployments": Reference(
        _dash("dashboard:providers_route_new"), _route_form, "deployments"
    ),
    "dashboard settings_invite team": Reference(
        _dash("dashboard:settings_invite"),
        lambda a, w: {"email": "forged@example.com", "role": "member", "team": w.team.pk},
        "team",
    ),
    "dashboard settings_member team": Reference(
        _dash("dashboard:settings_member", lambda a: a.memberships[Role.FINANCE].pk),
        lambda a, w: {
            f"m{a.memberships[Role.FINANCE].pk}-role": "member",
            f"m{a.memberships[Role.FINANCE].pk}-team": w.team.pk,
        },
        "team",
    ),
    "api keys team": Reference(
        lambda a: "/api/v1/keys/",
        lambda a, w: {"name": "forged", "team": w.team.pk},
        "team",
        "POST",
    ),
    "api budgets team": Reference(
        lambda a: "/api/v1/budgets/",
        lambda a, w: {"scope": "team", "team": w.team.pk, "period": "monthly", "limit_usd": "5"},
        "team",
        "POST",
    ),  # fmt: skip
    "api budgets key": Reference(
        lambda a: "/api/v1/budgets/",
        lambda a, w: {"scope": "key", "key": w.key.pk, "period": "monthly", "limit_usd": "5"},
        "key",
        "POST",
    ),  # fmt: skip
    "api deployments provider": Reference(
        lambda a: "/api/v1/deployments/",
        lambda a, w: {"provider": w.provider.pk, "name": "forged", "upstream_model": "forged"},
        "provider",
        "POST",
    ),  # fmt: skip
    "api routes deployments": Reference(
        lambda a: "/api/v1/routes/",
        lambda a, w: {"model_name": "forged-api-route", "deployments": [w.deployment.pk]},
        "deployments",
        "POST",
    ),  # fmt: skip
    "api invitations team": Reference(
        lambda a: "/api/v1/invitations/",
        lambda a, w: {"role": "member", "team": w.team.pk},
        "team",
        "POST",
    ),  # fmt: skip
    "api members team": Reference(
        lambda a: f"/api/v1/members/{a.memberships[Role.ADMIN].pk}/",
        lambda a, w: {"role": "member", "team": w.team.pk},
        "team",
        "PATCH",
    ),  # fmt: skip
}


# ------------------------------------------------------------------ dashboard, API, admin
#
# The pages read budget standings through async code that hands its database connection
# back (billing/budget_ledger.py in_thread), which a test transaction does not survive:
# so these tests commit, like real requests, and each builds A and B once and walks every
# case of its kind, reporting every wrong answer (each naming its URL) together.


@pytest.fixture
def orgs(transactional_db: None) -> tuple[OrgWorld, OrgWorld]:
    a, b = org_world_build("alphaiso"), org_world_build("bravoiso")
    rollups_refresh()  # the API reads the rollups: both orgs' usage is rolled up
    return a, b


def expected_status(role: str, method: str, roles: frozenset[str], methods: tuple[str, ...]) -> int:
    """The answer for an object of another org: the view refuses the method (405), or the
    role (403, for any id), or finds no such object in the viewer's org (404)."""
    if method not in methods:
        return 405
    return 403 if role not in roles else 404


def control_order(item: tuple[str, Any]) -> bool:
    """Controls that delete A's object run last, so the others still find theirs."""
    return any(word in item[0] for word in ("delete", "remove"))


@pytest.mark.django_db(transaction=True)
def test_another_orgs_object_is_a_404_on_every_dashboard_url(
    orgs: tuple[OrgWorld, OrgWorld],
) -> None:
    a, b = orgs
    found = Findings()
    clients = {role: browser(a.users[role]) for role in MEMBERSHIP_ROLES}
    cases = {route: case for route, case in REGISTRY.items() if isinstance(case, Object)}
    for route, case in cases.items():
        before = org_state(b)
        theirs, missing = url_of(route, in_url(case.obj(b))), url_of(route, case.missing)
        for role, client in clients.items():
            for method in ("GET", "POST"):
                expected = expected_status(role, method, case.roles, case.methods)
                for url in (with_query(theirs, {"org": a.org.slug}), theirs):
                    response = send(client, method, url)
                    what = f"{role} {method} {url}"
                    found.status(response, expected, what)
                    found.no_leak(response, b, what)
                same = send(client, method, with_query(missing, {"org": a.org.slug}))
                found.status(same, expected, f"{role} {method} {missing} (no such object)")
        found.unchanged(b, before, route)
    # Controls: A's owner on A's own object is not refused, so B's 404 is the org scope.
    owner = clients[Role.OWNER]
    for route, case in sorted(cases.items(), key=control_order):
        if case.control:
            method = case.methods[0]
            own = send(
                owner, method, with_query(url_of(route, in_url(case.obj(a))), {"org": a.org.slug})
            )
            found.check(
                own.status_code not in (403, 404, 405) and own.status_code < 500,
                f"control: owner {method} {route} on A's own object: {own.status_code}",
            )
    assert len(cases) >= 25
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_every_dashboard_page_shows_only_the_viewers_org(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    a, b = orgs
    found = Findings()
    clients = {role: browser(a.users[role]) for role in MEMBERSHIP_ROLES}
    cases = {route: case for route, case in REGISTRY.items() if isinstance(case, Page)}
    for route, case in cases.items():
        before = org_state(b)
        url = url_of(route, case.arg(a)) if case.arg else "/" + route
        for role, client in clients.items():
            for method in ("GET", "POST"):  # B's org named: no such org, for every role
                named = with_query(url, {"org": b.org.slug})
                response = send(client, method, named)
                found.status(
                    response, 404 if method in case.methods else 405, f"{role} {method} {named}"
                )
                found.no_leak(response, b, f"{role} {method} {named}")
            if "GET" not in case.methods:
                continue
            for index, variant in enumerate(case.variants):
                own = with_query(url, {"org": a.org.slug, **variant.params(a, b)})
                response = client.get(own)
                what = f"{role} GET {own}"
                if role not in case.roles:
                    found.status(response, 403, what)
                elif variant.status is None:
                    found.check(
                        response.status_code in (200, 400), f"{what}: {response.status_code}"
                    )
                else:
                    found.status(response, variant.status, what)
                found.no_leak(response, b, what)
                if case.shows and index == 0 and response.status_code == 200:
                    found.check(
                        case.shows.encode() in body_of(response),
                        f"{what}: does not show {case.shows!r}",
                    )
        found.unchanged(b, before, route)
    assert len(cases) >= 15
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_another_orgs_object_is_a_404_on_every_api_url(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    """As test_api_scope.py by the schema, here by URL pattern, and also with the
    dashboard's session (?org=) for every membership role."""
    a, b = orgs
    found = Findings()
    callers: dict[str, Any] = {f"{role} token": api_caller(a.tokens[role]) for role in TOKEN_ROLES}
    callers.update({f"{role} session": browser(a.users[role]) for role in MEMBERSHIP_ROLES})
    admin = callers["admin token"]
    cases = {route: case for route, case in REGISTRY.items() if isinstance(case, ApiObject)}
    for route, case in cases.items():
        before = org_state(b)
        theirs, missing = url_of(route, case.obj(b).pk), url_of(route, MISSING_ID)
        for who, client in callers.items():
            query = {"org": a.org.slug} if who.endswith("session") else {}
            for method in SESSION_METHODS if query else METHODS:
                response = call_api(client, method, with_query(theirs, query))
                same = call_api(client, method, with_query(missing, query))
                what = f"{who} {method} {theirs}"
                found.check(
                    response.status_code == same.status_code,
                    f"{what}: {response.status_code}, but {same.status_code} for no such object",
                )
                found.check(
                    response.status_code in (403, 404, 405), f"{what}: {response.status_code}"
                )
                found.no_leak(response, b, what)
                if query:  # naming B's org instead: no such org, for every role
                    named = call_api(client, method, with_query(theirs, {"org": b.org.slug}))
                    found.status(named, 404, f"{what}?org={b.org.slug}")
                    found.no_leak(named, b, f"{what}?org={b.org.slug}")
        # Control: the admin token reads A's own object, and gets 404 for B's.
        own = admin.get(url_of(route, case.obj(a).pk))
        found.check(
            own.status_code in (200, 405),
            f"control: admin GET {route} on A's own: {own.status_code}",
        )
        if own.status_code == 200:
            found.status(admin.get(theirs), 404, f"admin token GET {theirs}")
        found.unchanged(b, before, route)
    assert len(cases) >= 15
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_every_api_list_shows_only_the_callers_org(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    a, b = orgs
    found = Findings()
    tokens = {role: api_caller(a.tokens[role]) for role in TOKEN_ROLES}
    sessions = {role: browser(a.users[role]) for role in MEMBERSHIP_ROLES}
    cases = {route: case for route, case in REGISTRY.items() if isinstance(case, ApiList)}
    virtual_key = api_caller(a.key_plaintext)  # a virtual key is no API token
    for route, case in cases.items():
        url = "/" + route
        found.status(virtual_key.get(url), 401, f"A's virtual key GET {url}")
        for role, client in tokens.items():
            named = client.get(with_query(url, {"org": b.org.slug}))
            found.status(named, 404, f"{role} token GET {url}?org={b.org.slug}")
            found.no_leak(named, b, f"{role} token GET {url}?org={b.org.slug}")
            for index, variant in enumerate(case.variants):
                asked = with_query(url, variant.params(a, b))
                response = client.get(asked)
                what = f"{role} token GET {asked}"
                allowed = (200, 400, 403) if variant.status is None else (variant.status, 403)
                found.check(response.status_code in allowed, f"{what}: {response.status_code}")
                found.no_leak(response, b, what)
                if role == "admin" and index == 0:
                    found.status(response, 200, what)
                    if case.shows:
                        found.check(
                            case.shows.encode() in response.content,
                            f"{what}: does not show {case.shows!r}",
                        )
        for role, client in sessions.items():
            named = client.get(with_query(url, {"org": b.org.slug}))
            found.status(named, 404, f"{role} session GET {url}?org={b.org.slug}")
            found.no_leak(named, b, f"{role} session GET {url}?org={b.org.slug}")
            own = client.get(with_query(url, {"org": a.org.slug, **case.variants[0].params(a, b)}))
            found.no_leak(own, b, f"{role} session GET {url}?org={a.org.slug}")
    assert len(cases) >= 15
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_the_admin_site_is_closed_to_every_org_role(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    a, b = orgs
    before = org_state(b)
    found = Findings()
    patterns = [p for p in served_patterns() if case_for(p) is ADMIN_SITE]
    clients = {role: browser(a.users[role]) for role in MEMBERSHIP_ROLES}
    for pattern in patterns:
        url = admin_url(pattern.route, pattern.name, b)
        for role, client in clients.items():
            for method in ("GET", "POST"):
                response = send(client, method, url)
                location = response.headers.get("Location", "")
                what = f"{role} {method} {url}"
                # To the admin's sign-in (or from an object's short URL to its change page,
                # itself checked here), or no such page: never an admin page.
                found.check(
                    response.status_code in (404, 405)
                    or (response.status_code in (301, 302) and location.startswith("/admin/")),
                    f"{what}: {response.status_code} {location}",
                )
                found.no_leak(response, b, what)
    assert len(patterns) > 50
    found.unchanged(b, before, "the admin")
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_public_pages_show_nothing_of_any_org(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    a, b = orgs
    found = Findings()
    pages = [case.public for case in REGISTRY.values() if isinstance(case, Exempt) and case.public]
    for role in (None, *MEMBERSHIP_ROLES):
        client = browser(a.users[role] if role else None)
        for page in pages:
            response = client.get(page, follow=True)
            found.status(response, 200, f"{role or 'visitor'} GET {page}")
            found.no_leak(response, b, f"{role or 'visitor'} GET {page}")
    found.assert_none()


@pytest.mark.django_db(transaction=True)
def test_a_body_naming_another_orgs_object_is_refused(orgs: tuple[OrgWorld, OrgWorld]) -> None:
    """Create and change forms and API calls whose body names B's team, key, provider or
    deployment: refused (a form error, an API 400 naming the field), nothing written; the
    same body naming A's own object is accepted, so the refusal is the org scope."""
    a, b = orgs
    found = Findings()
    owner, admin = browser(a.users[Role.OWNER]), api_caller(a.tokens["admin"])
    admin.get("/api/v1/organization/")  # the token's first use is recorded (last_used_at)
    for name, reference in REFERENCES.items():
        api = reference.api_method is not None
        client = admin if api else owner
        url = reference.url(a)
        before_a, before_b = org_state(a), org_state(b)
        refused = submit(client, reference, url, reference.body(a, b))
        what = f"{name}: {reference.api_method or 'POST'} {url} naming B's {reference.field_name}"
        if api:
            found.status(refused, 400, what)
            if refused.status_code == 400:
                error = refused.json()["error"]
                named = {error.get("param"), *error.get("fields", {})}
                found.check(reference.field_name in named, f"{what}: the error names {named}")
        else:  # the form comes back with an error (or a redirect with an error message)
            found.check(refused.status_code in (200, 302, 400), f"{what}: {refused.status_code}")
        found.no_leak(refused, b, what)
        found.unchanged(a, before_a, what)
        found.unchanged(b, before_b, what)
        accepted = submit(client, reference, url, reference.body(a, a))
        found.check(org_state(a) != before_a and accepted.status_code < 400,
                    f"control {name} naming A's own: {accepted.status_code} "
                    f"{body_of(accepted)[:300]!r}")  # fmt: skip
    assert len(REFERENCES) >= 10
    found.assert_none()


def submit(client: Client | APIClient, reference: Reference, url: str, body: dict[str, Any]) -> Any:
    if reference.api_method is None:
        return client.post(url, body)
    return client.generic(
        reference.api_method, url, json.dumps(body), content_type="application/json"
    )


def call_api(client: Client | APIClient, method: str, url: str) -> Any:
    return client.generic(method, url, "{}", content_type="application/json")


def admin_url(route: str, name: str | None, b: OrgWorld) -> str:
    """An admin URL naming one of B's objects (or B's owner, for the user pages)."""
    from django.apps import apps
    from django.contrib.contenttypes.models import ContentType

    match = re.match(r"admin:(\w+?)_(\w+?)_(change|delete|history)$", name or "")
    parts = route.split("/")
    if "<path:content_type_id>" in route:
        key = b.key
        return url_of(route, ContentType.objects.get_for_model(key).pk, key.pk)
    if "(?P<app_label>" in route:
        return url_of(route, "tenants")
    if "(?P<url>" in route:
        return url_of(route, f"tenants/virtualkey/{b.key.pk}/change/")
    if "<id>" in route:  # auth/user/<id>/password/
        return url_of(route, b.users[Role.OWNER].pk)
    if "<path:object_id>" in route:
        if match:
            app_label, model_name = match.group(1), match.group(2)
        else:
            app_label, model_name = parts[1], parts[2]
        model = apps.get_model(app_label, model_name)
        instance = theirs_of(model, b)
        return url_of(route, instance.pk if instance is not None else MISSING_ID)
    return "/" + route


def theirs_of(model: Any, b: OrgWorld) -> Any:
    """One of B's rows of `model`, if B has any."""
    names = {f.name for f in model._meta.fields}
    if model._meta.label == "auth.User":
        return b.users[Role.OWNER]
    if model._meta.label == "tenants.Organization":
        return b.org
    if "org" in names:
        return model.objects.filter(org=b.org).first()
    if "provider" in names:
        return model.objects.filter(provider__org=b.org).first()
    return model.objects.first()


# ------------------------------------------------------------------ the live feed


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_live_feed_never_carries_another_orgs_requests() -> None:
    """Every role of A, on A's feed: none of B's requests arrive, asking for B's feed is
    refused (4404), and asking for B's group over an open socket changes nothing."""
    mine = await sync_to_async(OrganizationFactory)(slug="alphaiso-live")
    theirs = await sync_to_async(OrganizationFactory)(slug="bravoiso-live")
    team = await sync_to_async(TeamFactory)(org=mine)
    their_team = await sync_to_async(TeamFactory)(org=theirs)
    sockets: dict[str, Socket] = {}
    for role in MEMBERSHIP_ROLES:
        cookie = await sync_to_async(session_cookie)(
            role, mine, team if role == Role.MEMBER else None
        )
        refused = await open_feed(theirs.slug, cookie)
        assert await closed_with(refused) == 4404, role
        socket = await ready_feed(mine.slug, cookie)
        ask = {"type": "subscribe", "org": theirs.slug, "group": f"live.org.{theirs.pk}"}
        await socket.send_input({"type": "websocket.receive", "text": json.dumps(ask)})
        sockets[role] = socket

    await write_from_worker_thread([record(theirs, team=their_team, model="bravoiso-model")])
    quiet = await asyncio.gather(*(s.receive_nothing(timeout=0.3) for s in sockets.values()))
    assert all(quiet), dict(zip(sockets, quiet, strict=True))

    # The same batch with a request of A: A's sockets get A's row only.
    await write_from_worker_thread(
        [record(theirs, team=their_team, model="bravoiso-model"),
         record(mine, team=team, model="alphaiso-model")]
    )  # fmt: skip
    for role, socket in sockets.items():
        rows = await requests_pushed(socket)
        assert [row["model"] for row in rows] == ["alphaiso-model"], role
        assert "bravoiso" not in json.dumps(rows)
        await socket.disconnect()


# ------------------------------------------------------------------ the /v1 proxy

HELLO = [{"role": "user", "content": "Hello from the isolation suite"}]


@pytest.mark.django_db(transaction=True)
def test_a_key_reaches_only_its_own_orgs_models(
    gateway: GatewayServer, make_route: MakeRoute, live_key: IssueKey
) -> None:
    """A's virtual key, on every /v1 endpoint, against B's model and B's key: 404 for B's
    model (as for one that does not exist), B's model never listed, /v1/key/info about
    A's key only, and B's prefix with A's secret is no key at all."""
    from billing.models import UsageEvent
    from tenants.models import VirtualKey

    mine = OrganizationFactory(slug="alphaiso-v1")
    theirs = OrganizationFactory(slug="bravoiso-v1")
    make_route(model="alphaiso-chat", org=mine, provider_org=mine)
    their_route = make_route(model="bravoiso-chat", org=theirs, provider_org=theirs)
    ours, their_key = live_key(mine, name="alphaiso key"), live_key(theirs, name="bravoiso key")
    wait_for_config(gateway, ours, "alphaiso-chat")
    wait_for_config(gateway, their_key, "bravoiso-chat")
    client = openai.OpenAI(base_url=gateway.v1, api_key=ours, max_retries=0, timeout=15)
    # Controls: each org's own model works for its own key.
    assert client.chat.completions.create(model="alphaiso-chat", messages=HELLO).choices
    their_client = openai.OpenAI(base_url=gateway.v1, api_key=their_key, max_retries=0, timeout=15)
    assert their_client.chat.completions.create(model="bravoiso-chat", messages=HELLO).choices

    attempts: list[Callable[[], Any]] = [
        lambda: client.chat.completions.create(model="bravoiso-chat", messages=HELLO),
        lambda: list(
            client.chat.completions.create(model="bravoiso-chat", messages=HELLO, stream=True)
        ),
        lambda: client.embeddings.create(model="bravoiso-chat", input="hello"),
        lambda: client.models.retrieve("bravoiso-chat"),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as raised:
            attempt()
        assert raised.value.code == "model_not_found"
        assert "bravoiso" not in str(raised.value.body).replace("bravoiso-chat", "")
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=gateway.base_url, api_key=ours, max_retries=0).messages.create(
            model="bravoiso-chat", max_tokens=20, messages=HELLO
        )
    listed = {model.id for model in client.models.list()}
    assert "alphaiso-chat" in listed and "bravoiso-chat" not in listed

    our_prefix = VirtualKey.objects.get(org=mine).prefix
    their_prefix = VirtualKey.objects.get(org=theirs).prefix
    info = httpx.get(f"{gateway.v1}/key/info", headers={"authorization": f"Bearer {ours}"})
    assert info.status_code == 200 and our_prefix in info.text
    assert their_prefix not in info.text and "bravoiso" not in info.text

    # B's visible prefix with the rest of A's secret: no such key, on every endpoint.
    forged = their_prefix + ours[len(our_prefix) :]
    for method, path in [("POST", "/chat/completions"), ("POST", "/embeddings"),
                         ("POST", "/messages"), ("GET", "/models"),
                         ("GET", "/models/bravoiso-chat"), ("GET", "/key/info")]:  # fmt: skip
        answer = httpx.request(
            method, gateway.v1 + path, headers={"authorization": f"Bearer {forged}"},
            json={"model": "bravoiso-chat", "messages": HELLO, "input": "x", "max_tokens": 5}
            if method == "POST" else None,
        )  # fmt: skip
        assert answer.status_code == 401, (path, answer.status_code, answer.text)
        assert "bravoiso" not in answer.text

    for probe in ("/healthz", "/readyz"):
        answer = httpx.get(gateway.base_url + probe)
        assert "bravoiso" not in answer.text and "alphaiso" not in answer.text

    # A management API token is no virtual key either.
    api_token = api_token_create(org=mine, name="alphaiso", role="admin", actor=TEST_ACTOR)
    answer = httpx.get(
        f"{gateway.v1}/models", headers={"authorization": f"Bearer {api_token.plaintext}"}
    )
    assert answer.status_code == 401

    # B's route served B's own call only; A's calls are metered to A.
    wait_for_usage_writes_to_settle()
    served = UsageEvent.objects.filter(route_id=their_route.pk)
    assert list(served.values_list("org_id", "key__org_id")) == [(theirs.pk, theirs.pk)]
    assert set(UsageEvent.objects.filter(key__org=mine).values_list("org_id", flat=True)) == {
        mine.pk
    }
