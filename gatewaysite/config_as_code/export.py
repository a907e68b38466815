"""The running configuration as a configuration file: export, then apply, changes nothing.

Credentials are written as references to environment variables, never as secrets.
"""

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.utils import timezone

from billing.pricing import NANOS_PER_USD
from billing.services import PRICE_RATE_FIELDS
from routing.models import Provider, Route
from tenants.models import Organization

from .schema import (
    DEPLOYMENT_FIELDS,
    FORMAT_VERSION,
    ORGANIZATION_FIELDS,
    PROVIDER_FIELDS,
    ROUTE_FIELDS,
    TEAM_FIELDS,
)
from .state import DeploymentKey, OrganizationState, deployment_key, organization_state_read


@dataclass
class Export:
    document: dict[str, Any]
    # Variables the file refers to, which must hold the stored keys before it is applied.
    env_vars: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def credential_env_var(org_slug: str, provider_name: str) -> str:
    """The variable an exported file reads a provider's key from: PROVIDER_<ORG>_<NAME>_API_KEY."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", f"{org_slug}_{provider_name}").strip("_").upper()
    return f"PROVIDER_{words}_API_KEY"


def config_export(*, org_slug: str | None = None) -> Export:
    """Every organization's configuration (or one's) in the configuration file format."""
    orgs = Organization.objects.order_by("slug")
    if org_slug is not None:
        orgs = orgs.filter(slug=org_slug)
    export = Export(document={"version": FORMAT_VERSION, "organizations": []})
    now = timezone.now()
    for org in orgs:
        state = organization_state_read(org.slug, now=now)
        export.document["organizations"].append(_organization(state, export))
    platform_providers = Provider.objects.filter(org__isnull=True).count()
    global_routes = Route.objects.filter(org__isnull=True).count()
    if platform_providers or global_routes:
        export.notes.append(
            f"{platform_providers} platform provider(s) and {global_routes} global route(s) "
            "belong to no organization: configuration files do not manage them"
        )
    return export


def _organization(state: OrganizationState, export: Export) -> dict[str, Any]:
    org = state.org
    assert org is not None
    slug = org.slug
    key_budgets = org.budgets.filter(scope="key").count()
    if key_budgets:
        export.notes.append(
            f"{slug}: {key_budgets} key budget(s) are not exported: they belong to virtual "
            "keys, which configuration files do not manage"
        )
    return {
        "slug": slug,
        **{name: getattr(org, name) for name in ORGANIZATION_FIELDS},
        "teams": [
            {"slug": team.slug, **{name: getattr(team, name) for name in TEAM_FIELDS}}
            for team in state.teams.values()
        ],
        "budgets": _budgets(state),
        "providers": _providers(state, export),
        "routes": _routes(state, export),
        "prices": [
            {
                "provider_kind": kind,
                "model": model,
                **{name: getattr(price, name) for name in PRICE_RATE_FIELDS},
            }
            for (kind, model), price in sorted(state.prices.items())
        ],
    }


def _budgets(state: OrganizationState) -> list[dict[str, Any]]:
    entries = []
    for budget in state.budgets:
        entry: dict[str, Any] = {"scope": budget.scope}
        if budget.team is not None:
            entry["team"] = budget.team.slug
        entry.update(
            period=budget.period,
            enforcement=budget.enforcement,
            limit_usd=(Decimal(budget.limit_nanos) / NANOS_PER_USD).normalize(),
            soft_thresholds=list(budget.soft_thresholds),
        )
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.get("team") or "", e["period"], e["enforcement"]))


def _providers(state: OrganizationState, export: Export) -> list[dict[str, Any]]:
    org = state.org
    assert org is not None
    entries = []
    taken: set[str] = set()
    for name, rows in sorted(state.providers.items()):
        if len(rows) > 1:
            export.notes.append(
                f"{org.slug}: {len(rows)} providers are named {name!r}; the file names "
                "providers by name, so it cannot be applied until all but one are renamed"
            )
        for provider in rows:
            entry: dict[str, Any] = {
                "name": provider.name,
                **{field: getattr(provider, field) for field in PROVIDER_FIELDS},
            }
            if provider.has_api_key:
                env_var = credential_env_var(org.slug, provider.name)
                while env_var in taken:  # two names that spell the same variable
                    env_var = env_var.removesuffix("_API_KEY") + "_2_API_KEY"
                taken.add(env_var)
                export.env_vars.append(env_var)
                entry["api_key"] = "${" + env_var + "}"
            entry["deployments"] = [
                {"name": d.name, **{field: getattr(d, field) for field in DEPLOYMENT_FIELDS}}
                for key, d in sorted(state.deployments.items())
                if d.provider_id == provider.pk
            ]
            entries.append(entry)
    return entries


def _routes(state: OrganizationState, export: Export) -> list[dict[str, Any]]:
    names: dict[str, int] = {}
    for _, name in state.deployments:
        names[name] = names.get(name, 0) + 1

    def ref(key: DeploymentKey) -> Any:
        provider, name = key
        return name if names.get(name, 0) == 1 else {"provider": provider, "deployment": name}

    entries = []
    for route in state.routes.values():
        keys = sorted(state.route_deployment_keys(route))
        foreign = [key for key in keys if key not in state.deployments]
        if foreign:
            export.notes.append(
                f"{state.org.slug if state.org else ''}: route {route.model_name!r} uses "
                "deployments of providers outside the organization; the file cannot name them"
            )
        entry: dict[str, Any] = {
            "model_name": route.model_name,
            "strategy": route.strategy,
            "deployments": [ref(key) for key in keys],
            "fallbacks": list(route.fallback_models),
        }
        for name in ROUTE_FIELDS:
            if name in ("variant_percent", "shadow_percent"):
                reference = name.replace("_percent", "_deployment")
                deployment = getattr(route, reference)
                entry[reference] = None if deployment is None else ref(deployment_key(deployment))
            entry[name] = getattr(route, name)
        entries.append(entry)
    return entries
