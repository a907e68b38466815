"""Two organizations with one object of every kind, for the tenant isolation suite
(tests/gatewaysite/test_isolation.py), and the list of every URL the project serves.

Every name, e-mail, model name, tag and end user of an org carries its label
("alphaiso", "bravoiso"), so one substring search tells whether a response shows
anything of the other org; key and token prefixes and event ids are random and
listed in `OrgWorld.secrets`.
"""

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from django.utils.crypto import get_random_string
from rest_framework.test import APIClient

from billing.contracts import LoggedBodies, TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import AlertChannel, ModelPrice, Statement
from billing.statements import statement_close
from routing.models import Deployment, Provider, Route
from tenants.api_tokens import api_token_create
from tenants.members import invitation_create
from tenants.models import (
    APIToken,
    Budget,
    Invitation,
    Membership,
    Organization,
    Team,
    VirtualKey,
)
from tenants.services import Actor, budget_create, team_create, virtual_key_issue

ACTOR = Actor.system("tests")
# The dashboard roles (tenants.models.Membership.Role) and the API token roles.
MEMBERSHIP_ROLES = tuple(Membership.Role.values)
TOKEN_ROLES = tuple(APIToken.Role.values)


# ------------------------------------------------------------------ the URLs served


@dataclass(frozen=True)
class ServedPattern:
    """One Django URL pattern: its full route (regex anchors dropped) and namespace."""

    route: str
    name: str | None
    namespace: str


def _segment(pattern: Any) -> str:
    return str(pattern).removeprefix("^").removesuffix("$")


def served_patterns() -> list[ServedPattern]:
    """Every pattern Django's root resolver serves, found by walking it recursively."""

    def walk(entries: list[Any], prefix: str, namespace: str) -> Iterator[ServedPattern]:
        for entry in entries:
            if isinstance(entry, URLResolver):
                inner = ":".join(part for part in (namespace, entry.namespace or "") if part)
                yield from walk(entry.url_patterns, prefix + _segment(entry.pattern), inner)
            elif isinstance(entry, URLPattern):
                yield ServedPattern(prefix + _segment(entry.pattern), entry.name, namespace)

    return list(walk(get_resolver().url_patterns, "", ""))


def asgi_paths() -> set[str]:
    """What gatewaysite/asgi.py serves before Django: the lean /v1 proxy's endpoints (with
    /v1/models/{model}), the probes, /metrics and the live feed's websocket."""
    from gatewaysite.asgi import LIVE_FEED_PATH
    from gatewaysite.health import HEALTH_PATHS
    from gatewaysite.metrics import METRICS_PATH
    from routing.proxy.app import _MODEL_PATH, ENDPOINTS

    return {*ENDPOINTS, _MODEL_PATH + "{model}", *HEALTH_PATHS, METRICS_PATH, LIVE_FEED_PATH}


# ------------------------------------------------------------------ two organizations


@dataclass
class OrgWorld:
    """One organization with an object of every kind the URLs address."""

    label: str
    org: Organization
    team: Team
    users: dict[str, Any]  # membership role -> user
    memberships: dict[str, Membership]
    key: VirtualKey
    key_plaintext: str
    budget: Budget
    key_budget: Budget
    provider: Provider
    deployment: Deployment
    route: Route
    channel: AlertChannel
    invitation: Invitation
    invitation_token: str
    api_token: APIToken
    tokens: dict[str, str]  # API token role -> plaintext
    event_id: uuid.UUID
    old_event_id: uuid.UUID
    statement: Statement
    provider_secret: str
    secrets: list[str] = field(default_factory=list)

    @property
    def markers(self) -> list[str]:
        """Strings that appear only in this org's responses: its label, prefixes, ids."""
        return [self.label, *self.secrets]


def previous_month(today: date) -> date:
    return (today.replace(day=1) - timedelta(days=1)).replace(day=1)


def _usage(world: "OrgWorld", when: datetime, *, bodies: bool) -> uuid.UUID:
    label = world.label
    record = UsageRecord(
        event_id=uuid.uuid4(), org_id=world.org.pk, team_id=world.team.pk,
        key_id=world.key.pk, endpoint="chat.completions", model=f"{label}-model",
        outcome="success", status_code=200, started_at=when,
        finished_at=when + timedelta(milliseconds=800), route_id=world.route.pk,
        deployment_id=world.deployment.pk, deployment_name=world.deployment.name,
        provider_kind="openai", upstream_model=f"{label}-upstream",
        usage=TokenUsage(input_tokens=21, output_tokens=13), cost_nanos=4_321_000,
        latency_ms=800, ttft_ms=90, tags=(f"{label}-tag",), end_user=f"{label}-user",
        bodies=LoggedBodies(request=f'{{"prompt": "{label} prompt"}}',
                            response=f'{{"answer": "{label} answer"}}') if bodies else None,
    )  # fmt: skip
    usage_events_write([record])
    return record.event_id


def org_world_build(label: str) -> OrgWorld:
    """An org named after `label` with a user per role, a team, keys, budgets, a provider,
    deployment and route, a webhook channel, an invitation, API tokens, usage this month
    and last month, and last month's statement closed."""
    org = Organization.objects.create(
        slug=f"{label}-org", name=f"{label.title()} Org", log_request_bodies=True
    )
    team = team_create(org=org, slug=f"{label}-team", name=f"{label} team", actor=ACTOR)
    users, memberships = {}, {}
    for role in MEMBERSHIP_ROLES:
        # No password (hashing one costs ~0.5 s): the tests sign in with force_login.
        user = get_user_model().objects.create(
            username=f"{label}-{role}", email=f"{label}-{role}@example.com"
        )
        users[role] = user
        memberships[role] = Membership.objects.create(
            user=user, org=org, role=role, team=team if role == Membership.Role.MEMBER else None
        )
    owner = Actor(user=users[Membership.Role.OWNER])
    issued = virtual_key_issue(org=org, team=team, name=f"{label} key", actor=ACTOR)
    budget = budget_create(org=org, scope="team", team=team, limit_nanos=10**10, actor=ACTOR)
    key_budget = budget_create(
        org=org, scope="key", key=issued.key, limit_nanos=2 * 10**9, actor=ACTOR
    )
    provider_secret = f"sk-{label}-{get_random_string(24)}"
    provider = Provider(org=org, name=f"{label} provider", kind=Provider.Kind.OPENAI)
    provider.set_api_key(provider_secret)
    provider.save()
    deployment = Deployment.objects.create(
        provider=provider, name=f"{label}-deployment", upstream_model=f"{label}-upstream"
    )
    route = Route.objects.create(org=org, model_name=f"{label}-model")
    route.deployments.add(deployment)
    ModelPrice.objects.create(
        org=org, provider_kind="openai", model=f"{label}-upstream",
        input_usd_per_mtok=Decimal("1.25"), output_usd_per_mtok=Decimal("2.5"),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    channel = AlertChannel(
        org=org, name=f"{label} alerts", kind=AlertChannel.Kind.WEBHOOK,
        url=f"https://{label}.example.com/hook",
    )  # fmt: skip
    channel.set_secret(f"whsec-{label}-{get_random_string(16)}")
    channel.save()
    invited = invitation_create(
        org=org, role="member", team=team, email=f"{label}-invitee@example.com", actor=owner
    )
    tokens = {
        role: api_token_create(org=org, name=f"{label} {role} token", role=role, actor=owner)
        for role in TOKEN_ROLES
    }
    world = OrgWorld(
        label=label, org=org, team=team, users=users, memberships=memberships,
        key=issued.key, key_plaintext=issued.plaintext, budget=budget, key_budget=key_budget,
        provider=provider, deployment=deployment, route=route, channel=channel,
        invitation=invited.invitation, invitation_token=invited.token,
        api_token=tokens["admin"].token,
        tokens={role: issued_token.plaintext for role, issued_token in tokens.items()},
        event_id=uuid.uuid4(), old_event_id=uuid.uuid4(), statement=None,  # type: ignore[arg-type]
        provider_secret=provider_secret,
    )  # fmt: skip
    now = timezone.now()
    last_month = previous_month(now.date())
    world.old_event_id = _usage(
        world, datetime(last_month.year, last_month.month, 10, 12, tzinfo=UTC), bodies=False
    )
    world.event_id = _usage(world, now - timedelta(minutes=5), bodies=True)
    world.statement = statement_close(org=org, month=last_month, grace=timedelta(0))
    world.secrets = [
        issued.key.prefix, issued.plaintext, provider_secret, invited.token,
        invited.invitation.token_hash, str(world.event_id), str(world.old_event_id),
        *(issued_token.token.prefix for issued_token in tokens.values()),
        *world.tokens.values(),
    ]  # fmt: skip
    return world


def leaks(body: bytes, world: OrgWorld) -> list[str]:
    """The markers of `world`'s org that appear in a response body."""
    text = body.decode("utf-8", "replace").lower()
    return [marker for marker in world.markers if marker.lower() in text]


# ------------------------------------------------------------------ what an org holds


# Rows only the periodic jobs write (rollups every minute, alert checks), which may run
# in a live server of the same database between "before" and "after": not a request's doing.
_JOB_WRITTEN = frozenset(
    {"billing.UsageRollup", "billing.UsageTagRollup", "billing.UsageTeamRollup", "billing.Alert"}
)


def _org_models() -> list[Any]:
    ours = ("tenants", "billing", "routing")
    return [
        model for model in apps.get_models()
        if model._meta.app_label in ours and any(f.name == "org" for f in model._meta.fields)
        and model._meta.label not in _JOB_WRITTEN
    ]  # fmt: skip


def org_state(world: OrgWorld) -> dict[str, Any]:
    """Every row the org owns (and its users'), to compare before and after a case."""
    org = world.org
    state: dict[str, Any] = {
        model._meta.label: list(model.objects.filter(org=org).order_by("pk").values())
        for model in _org_models()
    }
    state["routing.Deployment"] = list(
        Deployment.objects.filter(provider__org=org).order_by("pk").values()
    )
    state["routing.Route.deployments"] = list(
        Route.deployments.through.objects.filter(route__org=org).order_by("pk").values()
    )
    state["auth.User"] = list(
        get_user_model().objects.filter(memberships__org=org).order_by("pk").values()
    )
    return state


# ------------------------------------------------------------------ callers


def _address() -> str:
    """A client address of its own: the sign-in and API rate limits count per address,
    and must not be shared with other tests (or other runs, in Redis) within a minute."""
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def browser(user: Any | None) -> Client:
    """A browser signed in as `user` (None: a visitor) that passes CSRF checks honestly:
    its csrftoken cookie matches the X-CSRFToken header it sends, as the dashboard's htmx
    does."""
    secret = get_random_string(32)
    client = Client(
        enforce_csrf_checks=True, headers={"X-CSRFToken": secret}, REMOTE_ADDR=_address()
    )
    client.cookies[settings.CSRF_COOKIE_NAME] = secret
    if user is not None:
        client.force_login(user)
    return client


def api_caller(plaintext: str) -> APIClient:
    """A management API client presenting an API token."""
    client = APIClient(REMOTE_ADDR=_address())
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


__all__ = [
    "MEMBERSHIP_ROLES",
    "TOKEN_ROLES",
    "OrgWorld",
    "ServedPattern",
    "api_caller",
    "asgi_paths",
    "browser",
    "leaks",
    "org_state",
    "org_world_build",
    "previous_month",
    "served_patterns",
]
