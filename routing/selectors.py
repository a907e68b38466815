"""Reads for routing, chiefly the proxy's configuration snapshot."""

import logging
from collections import defaultdict

from billing.contracts import PriceRates
from billing.selectors import price_rates_all
from routing.contracts import DeploymentSpec, RoutePlan
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

    The revision is read first: if configuration changes during the load, the
    next poll sees a newer revision and loads again.
    """
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
