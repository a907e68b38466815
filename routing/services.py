"""Routing's write-side workflows, called by the admin, the dashboard (and later the API)."""

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Model

from billing.services import catalog_price_ensure
from routing.models import Deployment, Provider, Route
from routing.providers.egress import egress_policy, host_permitted
from routing.providers.presets import default_base_url
from tenants.models import Organization
from tenants.services import Actor, audit_record

logger = logging.getLogger(__name__)


def deployment_list_price_ensure(deployment: Deployment) -> None:
    """Give the deployment's upstream model the catalog's list price, if it has none yet.

    The import lists only the catalog's ids and aliases; a dated or variant name
    (`claude-haiku-4-5-20251001`) would otherwise be served unpriced. Never raises: a
    missing price is flagged on each usage event, it must not stop a configuration change.
    """
    provider = deployment.provider
    try:
        catalog_price_ensure(provider_kind=provider.kind, model=deployment.upstream_model)
    except Exception:
        logger.exception(
            "catalog price for %s/%s (deployment %s) failed",
            provider.kind,
            deployment.upstream_model,
            deployment.pk,
        )


# --- Providers, deployments and routes: the dashboard's (and later the API's) writes ---
#
# Every write validates the whole row (full_clean), stays inside one organization
# and leaves an audit entry with the values before and after. A provider's API key
# never reaches the audit log, not even encrypted: only that it changed. Saving a
# row bumps the proxy's configuration revision through the watchers connected in
# RoutingConfig.ready (post_save and m2m_changed), so every web process reloads.

PROVIDER_FIELDS = ("name", "kind", "base_url", "api_version", "enabled")
DEPLOYMENT_FIELDS = (
    "name",
    "upstream_model",
    "weight",
    "priority",
    "connect_timeout_ms",
    "ttft_timeout_ms",
    "read_timeout_ms",
    "total_timeout_ms",
    "context_window_tokens",
    "rpm_limit",
    "tpm_limit",
    "enabled",
)
ROUTE_FIELDS = (
    "model_name",
    "strategy",
    "fallback_models",
    "max_attempts",
    "deadline_ms",
    "max_output_tokens",
    "variant_deployment",
    "variant_percent",
    "variant_sticky_by",
    "shadow_deployment",
    "shadow_percent",
    "cache_ttl_seconds",
    "cache_hit_billing",
    "unsupported_params",
    "enabled",
)

_PRIVATE_HOST_REFUSAL = (
    "This address is on a private or local network, which organizations may not call "
    "through Tollgate. Give the provider's public URL."
)


def _assign(instance: Model, values: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = set(values) - set(allowed)
    if unknown:
        raise TypeError(f"not editable here: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        setattr(instance, name, value)


def _snapshot(instance: Model, fields: tuple[str, ...]) -> dict[str, Any]:
    """The fields' values as the audit log shows them (related rows by name)."""
    shown: dict[str, Any] = {}
    for name in fields:
        value = getattr(instance, name)
        shown[name] = str(value) if isinstance(value, Model) else value
    return shown


def _changed(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict, dict]:
    names = [name for name in after if before.get(name) != after[name]]
    return {name: before.get(name) for name in names}, {name: after[name] for name in names}


def provider_base_url_check(*, kind: str, base_url: str) -> None:
    """Refuse a base URL (or the kind's default) that reaches our own network (SSRF).

    An org admin chooses where the proxy sends requests, with our network's
    reach: loopback, private, link-local or reserved addresses are refused, by
    literal address or by what the host name resolves to now, unless the operator
    allows them (TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS, on in the embedded
    default; TOLLGATE_PROVIDER_ALLOWED_NETWORKS). A name that does not resolve yet
    is accepted: every upstream connection is judged again on the address it goes
    to (routing/providers/egress.py). Raises ValidationError on the base_url field.
    """
    host = urlsplit(base_url or default_base_url(kind)).hostname
    # No host: the model's own validator reports it.
    if host and not host_permitted(host, egress_policy()):
        raise ValidationError({"base_url": _PRIVATE_HOST_REFUSAL})


def _provider_shown(provider: Provider) -> dict[str, Any]:
    return _snapshot(provider, PROVIDER_FIELDS)


@transaction.atomic
def provider_create(
    *, org: Organization, actor: Actor, values: Mapping[str, Any], api_key: str = ""
) -> Provider:
    """Add a provider to `org`; its API key (if given) is stored encrypted, never logged."""
    provider = Provider(org=org)
    _assign(provider, values, PROVIDER_FIELDS)
    provider.set_api_key(api_key)
    provider.full_clean()
    provider_base_url_check(kind=provider.kind, base_url=provider.base_url)
    provider.save()
    after = {**_provider_shown(provider), "api_key": "set" if api_key else "none"}
    audit_record(actor=actor, org=org, action="provider.create", target=provider, after=after)
    return provider


@transaction.atomic
def provider_update(
    *,
    provider: Provider,
    actor: Actor,
    changes: Mapping[str, Any],
    api_key: str = "",
    remove_api_key: bool = False,
) -> Provider:
    """Change a provider; an empty `api_key` keeps the stored key, `remove_api_key` drops it."""
    provider = (
        Provider.objects.select_for_update(of=("self",)).select_related("org").get(pk=provider.pk)
    )
    before = _provider_shown(provider)
    _assign(provider, changes, PROVIDER_FIELDS)
    key_change = ""
    if api_key:
        provider.set_api_key(api_key)
        key_change = "changed"
    elif remove_api_key and provider.has_api_key:
        provider.set_api_key("")
        key_change = "removed"
    provider.full_clean()
    after = _provider_shown(provider)
    if (after["kind"], after["base_url"]) != (before["kind"], before["base_url"]):
        # Only a new address is judged: disabling a provider an operator set up
        # on an internal host must keep working.
        provider_base_url_check(kind=provider.kind, base_url=provider.base_url)
    shown_before, shown_after = _changed(before, after)
    if key_change:
        shown_after["api_key"] = key_change
    if not shown_after:
        return provider
    provider.save()
    audit_record(
        actor=actor,
        org=provider.org,
        action="provider.update",
        target=provider,
        before=shown_before,
        after=shown_after,
    )
    return provider


def _deployment_saved(deployment: Deployment) -> None:
    # After commit: a rolled-back save leaves no price behind.
    transaction.on_commit(lambda: deployment_list_price_ensure(deployment))


@transaction.atomic
def deployment_create(*, provider: Provider, actor: Actor, values: Mapping[str, Any]) -> Deployment:
    """Add a deployment (one upstream model) to `provider`, priced from the catalog if listed."""
    deployment = Deployment(provider=provider)
    _assign(deployment, values, DEPLOYMENT_FIELDS)
    deployment.full_clean()
    deployment.save()
    _deployment_saved(deployment)
    audit_record(
        actor=actor,
        org=provider.org,
        action="deployment.create",
        target=deployment,
        after={"provider": provider.name, **_snapshot(deployment, DEPLOYMENT_FIELDS)},
    )
    return deployment


@transaction.atomic
def deployment_update(
    *, deployment: Deployment, actor: Actor, changes: Mapping[str, Any]
) -> Deployment:
    """Change a deployment's model, share of traffic, timeouts or limits."""
    deployment = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("provider__org")
        .get(pk=deployment.pk)
    )
    before = _snapshot(deployment, DEPLOYMENT_FIELDS)
    _assign(deployment, changes, DEPLOYMENT_FIELDS)
    deployment.full_clean()
    shown_before, shown_after = _changed(before, _snapshot(deployment, DEPLOYMENT_FIELDS))
    if not shown_after:
        return deployment
    deployment.save()
    _deployment_saved(deployment)
    audit_record(
        actor=actor,
        org=deployment.provider.org,
        action="deployment.update",
        target=deployment,
        before=shown_before,
        after=shown_after,
    )
    return deployment


def _route_deployments_check(route: Route, deployments: Iterable[Deployment]) -> None:
    """Every deployment a route names must be of its own organization's providers.

    One org's credentials never serve another org's traffic; the form limits the
    choices, this refuses a forged id that got past it.
    """
    named = [*deployments, route.variant_deployment, route.shadow_deployment]
    for deployment in filter(None, named):
        if deployment.provider.org_id is None or deployment.provider.org_id != route.org_id:
            raise ValidationError(
                {"deployments": f"Deployment {deployment.name} is not one of this organization's."}
            )


def _route_name_check(route: Route) -> None:
    # The unique constraint would say the same in words no admin should have to read.
    taken = Route.objects.filter(org_id=route.org_id, model_name=route.model_name)
    if taken.exclude(pk=route.pk).exists():
        raise ValidationError(
            {"model_name": f"This organization already has a route named {route.model_name}."}
        )


def _route_shown(route: Route, deployments: Iterable[Deployment]) -> dict[str, Any]:
    return {
        **_snapshot(route, ROUTE_FIELDS),
        "deployments": sorted(deployment.name for deployment in deployments),
    }


@transaction.atomic
def route_create(
    *,
    org: Organization,
    actor: Actor,
    values: Mapping[str, Any],
    deployments: Sequence[Deployment],
) -> Route:
    """Publish a model name for `org`, served by some of its own deployments."""
    route = Route(org=org)
    _assign(route, values, ROUTE_FIELDS)
    _route_name_check(route)
    _route_deployments_check(route, deployments)
    route.full_clean()
    route.save()
    route.deployments.set(deployments)
    audit_record(
        actor=actor,
        org=org,
        action="route.create",
        target=route,
        after=_route_shown(route, deployments),
    )
    return route


@transaction.atomic
def route_update(
    *,
    route: Route,
    actor: Actor,
    changes: Mapping[str, Any],
    deployments: Sequence[Deployment] | None = None,
) -> Route:
    """Change a route; `deployments` (when given) replaces the set it uses."""
    route = Route.objects.select_for_update(of=("self",)).select_related("org").get(pk=route.pk)
    current = list(route.deployments.select_related("provider"))
    before = _route_shown(route, current)
    _assign(route, changes, ROUTE_FIELDS)
    chosen = current if deployments is None else list(deployments)
    _route_name_check(route)
    _route_deployments_check(route, chosen)
    route.full_clean()
    shown_before, shown_after = _changed(before, _route_shown(route, chosen))
    if not shown_after:
        return route
    route.save()
    if {d.pk for d in chosen} != {d.pk for d in current}:
        route.deployments.set(chosen)
    audit_record(
        actor=actor,
        org=route.org,
        action="route.update",
        target=route,
        before=shown_before,
        after=shown_after,
    )
    return route
