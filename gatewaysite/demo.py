"""Demo data for the embedded default: an organization with teams, keys, routes
to the built-in mock provider, prices, budgets and a week of usage history.

Idempotent: running it again changes nothing that is already there.
"""

import json
import os
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.models import ModelPrice, UsageEvent
from billing.pricing import cost_nanos, price_pick
from billing.selectors import price_rates_all
from routing.models import Deployment, Provider, Route
from tenants.keys import key_matches
from tenants.models import Budget, Membership, Organization, Team, VirtualKey
from tenants.services import (
    Actor,
    budget_create,
    membership_set,
    organization_create,
    team_create,
    virtual_key_issue,
)

DEMO_ORG_SLUG = "acme"
DEMO_ADMIN_USERNAME = "admin"
DEMO_HISTORY_DAYS = 7
_EVENT_NAMESPACE = uuid.UUID("6f1f3c1e-5a55-4c4e-9a8e-7d6c0d1e2f30")
_ACTOR = Actor.system("demo-seed")

# (route / upstream model, deployment name, input, cached input, output USD per 1M tokens)
_MODELS = [
    ("gpt-4o-mini", "mock-gpt-4o-mini", "0.15", "0.075", "0.60"),
    ("gpt-4o", "mock-gpt-4o", "2.50", "1.25", "10.00"),
    ("text-embedding-3-small", "mock-text-embedding-3-small", "0.02", None, "0"),
]
# (name, team slug, allowed models)
_KEYS = [
    ("platform-app", "platform", []),
    ("research-notebook", "research", ["gpt-4o-mini", "text-embedding-3-small"]),
]


@dataclass(frozen=True, slots=True)
class DemoSeed:
    admin_username: str
    admin_password: str
    keys: dict[str, str]  # key name -> plaintext


def _demo_keys_file() -> Path:
    return Path(settings.VAR_DIR) / "demo-keys.json"


def _saved_keys() -> dict[str, str]:
    try:
        return json.loads(_demo_keys_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_keys(keys: dict[str, str]) -> None:
    path = _demo_keys_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Local convenience for the demo only: readable by this user alone.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(keys, handle, indent=2)


def _ensure_admin(password: str) -> object:
    user_model = get_user_model()
    user = user_model.objects.filter(username=DEMO_ADMIN_USERNAME).first()
    if user is None:
        user = user_model.objects.create_superuser(
            username=DEMO_ADMIN_USERNAME, email="admin@example.com", password=password
        )
    return user


def _ensure_person(
    org: Organization, username: str, password: str, role: str, team: Team | None = None
) -> None:
    """A non-staff dashboard user holding `role` in the demo org, to try the roles with."""
    user_model = get_user_model()
    user = user_model.objects.filter(username=username).first()
    if user is None:
        user = user_model.objects.create_user(
            username=username, email=f"{username}@example.com", password=password
        )
    if not Membership.objects.filter(org=org, user=user).exists():
        membership_set(org=org, user=user, role=role, team=team, actor=_ACTOR)  # type: ignore[arg-type]


def _ensure_routes(mock_base_url: str) -> None:
    provider = Provider.objects.filter(org=None, name="Built-in mock provider").first()
    if provider is None:
        provider = Provider(org=None, name="Built-in mock provider", kind=Provider.Kind.MOCK)
        provider.set_api_key("mock-provider-secret")
    provider.base_url = mock_base_url
    provider.full_clean()
    provider.save()
    effective_from = datetime(2024, 1, 1, tzinfo=UTC)
    for model, deployment_name, input_rate, cached_rate, output_rate in _MODELS:
        deployment, _ = Deployment.objects.get_or_create(
            provider=provider, name=deployment_name, defaults={"upstream_model": model}
        )
        route, created = Route.objects.get_or_create(org=None, model_name=model)
        if created:
            route.deployments.add(deployment)
        ModelPrice.objects.get_or_create(
            org=None,
            provider_kind=Provider.Kind.MOCK,
            model=model,
            effective_from=effective_from,
            defaults={
                "input_usd_per_mtok": Decimal(input_rate),
                "cached_input_usd_per_mtok": Decimal(cached_rate) if cached_rate else None,
                "output_usd_per_mtok": Decimal(output_rate),
                "source": ModelPrice.Source.CATALOG,
            },
        )


def _ensure_keys(org: Organization, teams: dict[str, Team]) -> dict[str, str]:
    saved = _saved_keys()
    keys: dict[str, str] = {}
    for name, team_slug, allowed in _KEYS:
        plaintext = saved.get(name, "")
        existing = VirtualKey.objects.filter(org=org, name=name, revoked_at=None).first()
        if existing is None or not key_matches(plaintext, existing.secret_hash):
            issued = virtual_key_issue(
                org=org, team=teams[team_slug], name=name, allowed_models=allowed, actor=_ACTOR
            )
            plaintext = issued.plaintext
        keys[name] = plaintext
    _save_keys(keys)
    return keys


def _synthesize_history(org: Organization, *, now: datetime) -> None:
    """A week of plausible traffic, with ids fixed per day so re-runs add nothing."""
    rates_by_model = {}
    for rates in price_rates_all():
        # Catalog list prices for real providers share these model names.
        if rates.provider_kind == Provider.Kind.MOCK:
            rates_by_model.setdefault(rates.model, []).append(rates)
    deployments = {d.upstream_model: d for d in Deployment.objects.filter(provider__org=None)}
    routes = {r.model_name: r.pk for r in Route.objects.filter(org=None)}
    keys = list(VirtualKey.objects.filter(org=org).order_by("pk"))
    records = []
    for days_ago in range(DEMO_HISTORY_DAYS, 0, -1):
        day = (now - timedelta(days=days_ago)).date()
        rng = random.Random(f"{org.slug}-{day.isoformat()}")
        for index in range(rng.randint(60, 120)):
            key = keys[index % len(keys)]
            model = rng.choice(key.allowed_models or [m[0] for m in _MODELS])
            started_at = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(
                seconds=rng.randint(0, 86_399)
            )
            failed = rng.random() < 0.03
            is_embedding = model.startswith("text-embedding")
            usage = TokenUsage(
                input_tokens=rng.randint(20, 2_000),
                output_tokens=0 if is_embedding or failed else rng.randint(10, 800),
            )
            if failed:
                usage = TokenUsage()
            deployment = deployments[model]
            rates = price_pick(rates_by_model.get(model, []), org_id=org.pk, moment=started_at)
            latency_ms = rng.randint(150, 2_500)
            records.append(
                UsageRecord(
                    event_id=uuid.uuid5(_EVENT_NAMESPACE, f"{org.slug}/{day}/{index}"),
                    org_id=org.pk,
                    team_id=key.team_id,
                    key_id=key.pk,
                    endpoint="embeddings" if is_embedding else "chat.completions",
                    model=model,
                    outcome=UsageEvent.Outcome.UPSTREAM_ERROR
                    if failed
                    else UsageEvent.Outcome.SUCCESS,
                    status_code=502 if failed else 200,
                    error_class="upstream_error" if failed else "",
                    started_at=started_at,
                    finished_at=started_at + timedelta(milliseconds=latency_ms),
                    route_id=routes.get(model),
                    deployment_id=deployment.pk,
                    deployment_name=deployment.name,
                    provider_kind=Provider.Kind.MOCK,
                    upstream_model=model,
                    usage=usage,
                    cost_nanos=cost_nanos(usage=usage, rates=rates) if rates else 0,
                    price_id=rates.price_id if rates else None,
                    is_stream=not is_embedding and rng.random() < 0.4,
                    latency_ms=latency_ms,
                    ttft_ms=None if is_embedding else rng.randint(80, 600),
                )
            )
    usage_events_write(records)


@transaction.atomic
def demo_seed(*, mock_base_url: str, admin_password: str, now: datetime | None = None) -> DemoSeed:
    """Create (or complete) the demo organization and return its credentials."""
    now = now or datetime.now(UTC)
    admin = _ensure_admin(admin_password)
    _ensure_routes(mock_base_url)
    org = Organization.objects.filter(slug=DEMO_ORG_SLUG).first() or organization_create(
        slug=DEMO_ORG_SLUG, name="Acme Corp", time_zone="Europe/Berlin", actor=_ACTOR
    )
    if not Membership.objects.filter(org=org, user=admin).exists():
        membership_set(org=org, user=admin, role=Membership.Role.OWNER, actor=_ACTOR)  # type: ignore[arg-type]
    teams = {}
    for slug, name in (("platform", "Platform"), ("research", "Research")):
        teams[slug] = Team.objects.filter(org=org, slug=slug).first() or team_create(
            org=org, slug=slug, name=name, actor=_ACTOR
        )
    if not Budget.objects.filter(org=org).exists():
        budget_create(org=org, scope=Budget.Scope.ORG, limit_nanos=250 * 10**9, actor=_ACTOR)
        budget_create(
            org=org,
            scope=Budget.Scope.TEAM,
            team=teams["research"],
            period=Budget.Period.DAILY,
            limit_nanos=5 * 10**9,
            enforcement=Budget.Enforcement.SOFT,
            actor=_ACTOR,
        )
    _ensure_person(org, "finance", admin_password, Membership.Role.FINANCE)
    _ensure_person(org, "member", admin_password, Membership.Role.MEMBER, teams["research"])
    keys = _ensure_keys(org, teams)
    _synthesize_history(org, now=now)
    return DemoSeed(admin_username=DEMO_ADMIN_USERNAME, admin_password=admin_password, keys=keys)
