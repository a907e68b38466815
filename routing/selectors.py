"""Reads for routing, chiefly the proxy's configuration snapshot."""

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from redis.exceptions import RedisError

from billing.contracts import PriceRates
from billing.selectors import price_rates_all
from routing.contracts import DeploymentSpec, RoutePlan
from routing.health_board import FleetStatus, fleet_statuses
from routing.models import Deployment, Route
from routing.providers.presets import default_base_url
from routing.snapshot import ConfigSnapshot
from tenants.config import config_revision_get
from tenants.crypto import SecretUnreadable
from tenants.selectors import virtual_key_contexts

logger = logging.getLogger(__name__)


def _deployment_spec(deployment: Deployment) -> DeploymentSpec:
    provider = deployment.provider
    return DeploymentSpec(
        deployment_id=deployment.pk,
        name=deployment.name,
        provider_id=provider.pk,
        provider_kind=provider.kind,
        base_url=(provider.base_url or default_base_url(provider.kind)).rstrip("/"),
        api_key=provider.api_key(),
        api_version=provider.api_version,
        upstream_model=deployment.upstream_model,
        weight=deployment.weight,
        priority=deployment.priority,
        connect_timeout_s=deployment.connect_timeout_ms / 1000,
        ttft_timeout_s=deployment.ttft_timeout_ms / 1000,
        read_timeout_s=deployment.read_timeout_ms / 1000,
        total_timeout_s=deployment.total_timeout_ms / 1000,
        context_window_tokens=deployment.context_window_tokens,
        rpm_limit=deployment.rpm_limit,
        tpm_limit=deployment.tpm_limit,
    )


def route_plans() -> dict[tuple[int | None, str], RoutePlan]:
    """Every enabled route with its usable deployments, keyed by (org id, model).

    A deployment is usable by a route when it is enabled, its provider is
    enabled, and the provider is global or belongs to the route's org: one
    org's credentials never serve another org's traffic.
    """
    deployments = {
        deployment.pk: deployment
        for deployment in Deployment.objects.filter(
            enabled=True, provider__enabled=True
        ).select_related("provider")
    }
    specs: dict[int, DeploymentSpec] = {}
    for deployment in deployments.values():
        try:
            specs[deployment.pk] = _deployment_spec(deployment)
        except SecretUnreadable:
            logger.error(
                "Deployment %s skipped: its provider's API key cannot be decrypted "
                "with the configured TOLLGATE_ENCRYPTION_KEYS",
                deployment.name,
            )
    links: dict[int, list[int]] = defaultdict(list)
    for route_id, deployment_id in Route.deployments.through.objects.values_list(
        "route_id", "deployment_id"
    ):
        links[route_id].append(deployment_id)

    def usable_by(route: Route, deployment_id: int | None) -> DeploymentSpec | None:
        if deployment_id is None or deployment_id not in specs:
            return None
        if deployments[deployment_id].provider.org_id not in (None, route.org_id):
            return None
        return specs[deployment_id]

    plans: dict[tuple[int | None, str], RoutePlan] = {}
    for route in Route.objects.filter(enabled=True):
        usable = [
            spec
            for deployment_id in links[route.pk]
            if (spec := usable_by(route, deployment_id)) is not None
        ]
        usable.sort(key=lambda spec: (spec.priority, spec.name))
        plans[(route.org_id, route.model_name)] = RoutePlan(
            route_id=route.pk,
            org_id=route.org_id,
            model_name=route.model_name,
            strategy=route.strategy,
            deployments=tuple(usable),
            unsupported_params=route.unsupported_params,
            fallback_models=tuple(route.fallback_models or ()),
            max_attempts=route.max_attempts,
            max_output_tokens=route.max_output_tokens,
            deadline_s=route.deadline_ms / 1000,
            cache_ttl_s=route.cache_ttl_seconds,
            cache_hits_billed=route.cache_hit_billing == Route.CacheBilling.FULL,
            created=int(route.created_at.timestamp()),
            variant=usable_by(route, route.variant_deployment_id),
            variant_percent=route.variant_percent,
            variant_sticky_by=route.variant_sticky_by,
            shadow=usable_by(route, route.shadow_deployment_id),
            shadow_percent=route.shadow_percent,
        )
    return plans


def config_snapshot_load() -> ConfigSnapshot:
    """A consistent snapshot of keys, routes and prices (a handful of queries).

    On PostgreSQL every query reads the database as of one moment (REPEATABLE READ):
    a change committed between two of them (say a route and its deployments, read in
    separate queries) would otherwise give a route without the deployments it was
    created with, until the next change. Elsewhere (SQLite, whose transactions here
    take the write lock) the revision is read first, so such a change is loaded
    again at the next poll.
    """
    consistent = connection.vendor == "postgresql" and not connection.in_atomic_block
    with transaction.atomic() if consistent else contextlib.nullcontext():
        if consistent:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        revision = config_revision_get()
        prices: dict[tuple[str, str], list[PriceRates]] = defaultdict(list)
        for rates in price_rates_all():
            prices[(rates.provider_kind, rates.model)].append(rates)
        return ConfigSnapshot(
            revision=revision,
            keys_by_prefix={key.prefix: key for key in virtual_key_contexts()},
            routes=route_plans(),
            prices={pair: tuple(rows) for pair, rows in prices.items()},
        )


@dataclass(frozen=True, slots=True)
class DeploymentHealthRow:
    """A deployment an organization's traffic may reach, with its live health."""

    deployment_id: int
    name: str
    provider_name: str
    provider_kind: str
    upstream_model: str
    routes: tuple[str, ...]  # the org's own and the global routes that use it
    enabled: bool
    rpm_limit: int | None
    tpm_limit: int | None
    status: FleetStatus | None  # None: no live replica has called it lately


def deployment_health_list(*, org_id: int) -> tuple[list[DeploymentHealthRow], bool]:
    """The deployments of the org's providers and of the routes it can call, with health.

    The flag is False when the shared board could not be read (Redis down): the rows
    are then listed without live state rather than not at all.
    """
    visible_routes = Route.objects.filter(Q(org_id=org_id) | Q(org__isnull=True))
    deployments = (
        Deployment.objects.filter(Q(provider__org_id=org_id) | Q(routes__in=visible_routes))
        .filter(Q(provider__org_id=org_id) | Q(provider__org__isnull=True))
        .select_related("provider")
        .distinct()
        .order_by("provider__name", "priority", "name")
    )
    route_names: dict[int, list[str]] = defaultdict(list)
    for deployment_id, model_name in Route.deployments.through.objects.filter(
        route__in=visible_routes
    ).values_list("deployment_id", "route__model_name"):
        route_names[deployment_id].append(model_name)
    try:
        statuses, available = fleet_statuses(settings.REDIS_URL or None), True
    except RedisError:
        logger.warning("Deployment health board unreadable: Redis is unavailable")
        statuses, available = {}, False
    rows = [
        DeploymentHealthRow(
            deployment_id=deployment.pk,
            name=deployment.name,
            provider_name=deployment.provider.name,
            provider_kind=deployment.provider.kind,
            upstream_model=deployment.upstream_model,
            routes=tuple(sorted(route_names[deployment.pk])),
            enabled=deployment.enabled and deployment.provider.enabled,
            rpm_limit=deployment.rpm_limit,
            tpm_limit=deployment.tpm_limit,
            status=statuses.get(deployment.pk),
        )
        for deployment in deployments
    ]
    return rows, available
