"""What the database holds for an organization, by the natural keys configuration files use."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Q

from billing.models import ModelPrice
from routing.models import Deployment, Provider, Route
from tenants.models import Budget, Organization, Team, VirtualKey

# (provider name, deployment name): a deployment's natural key within its organization.
DeploymentKey = tuple[str, str]


@dataclass
class OrganizationState:
    org: Organization | None
    teams: dict[str, Team] = field(default_factory=dict)
    # Slugs of teams with virtual keys (revoked ones too): they cannot be deleted.
    teams_with_keys: set[str] = field(default_factory=set)
    # The organization's own budgets and its teams'; key budgets are not the file's.
    budgets: list[Budget] = field(default_factory=list)
    # By name; more than one provider may carry a name (nothing in the database forbids it).
    providers: dict[str, list[Provider]] = field(default_factory=dict)
    deployments: dict[DeploymentKey, Deployment] = field(default_factory=dict)
    routes: dict[str, Route] = field(default_factory=dict)
    # The organization's price overrides in force, by (provider kind, model).
    prices: dict[tuple[str, str], ModelPrice] = field(default_factory=dict)

    def route_deployment_keys(self, route: Route) -> set[DeploymentKey]:
        return {deployment_key(deployment) for deployment in route.deployments.all()}


def deployment_key(deployment: Deployment) -> DeploymentKey:
    return (deployment.provider.name, deployment.name)


def organization_state_read(slug: str, *, now: datetime) -> OrganizationState:
    """The organization `slug` and its configuration (an empty state if it does not exist)."""
    org = Organization.objects.filter(slug=slug).first()
    if org is None:
        return OrganizationState(org=None)
    state = OrganizationState(org=org)
    state.teams = {team.slug: team for team in Team.objects.filter(org=org).order_by("slug")}
    state.teams_with_keys = set(
        VirtualKey.objects.filter(org=org, team__isnull=False).values_list("team__slug", flat=True)
    )
    state.budgets = list(
        Budget.objects.filter(org=org, scope__in=[Budget.Scope.ORG, Budget.Scope.TEAM])
        .select_related("team")
        .order_by("pk")
    )
    providers: dict[str, list[Provider]] = defaultdict(list)
    for provider in Provider.objects.filter(org=org).order_by("name", "pk"):
        providers[provider.name].append(provider)
    state.providers = dict(providers)
    for deployment in Deployment.objects.filter(provider__org=org).select_related("provider"):
        state.deployments[deployment_key(deployment)] = deployment
    routes = (
        Route.objects.filter(org=org)
        .select_related("variant_deployment__provider", "shadow_deployment__provider")
        .prefetch_related("deployments__provider")
        .order_by("model_name")
    )
    state.routes = {route.model_name: route for route in routes}
    overrides = ModelPrice.objects.filter(
        Q(effective_until__isnull=True) | Q(effective_until__gt=now),
        org=org,
        effective_from__lte=now,
    ).order_by("effective_from", "pk")
    for price in overrides:
        state.prices[(price.provider_kind, price.model)] = price  # the latest to start wins
    return state


def global_route_names() -> set[str]:
    """Model names of the platform's global routes, which any organization may fall back to."""
    return set(
        Route.objects.filter(org__isnull=True, enabled=True).values_list("model_name", flat=True)
    )
