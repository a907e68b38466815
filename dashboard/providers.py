"""Providers, deployments and routes: the organization's own routing configuration.

Owners and admins only. Every object is fetched through the viewer's organization,
so another org's provider, deployment or route is a 404. Writes go through the
services in routing/services.py (validated, audited, noticed by the proxy).
"""

from collections.abc import Callable

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import path
from django.views.decorators.http import require_POST

from dashboard.access import ADMIN_ROLES, Viewer, org_page, render_page
from dashboard.forms import actor_of
from routing.forms import DeploymentForm, ProviderForm, RouteForm
from routing.models import Deployment, Provider, Route
from routing.providers.presets import default_base_url
from routing.selectors import deployment_health_list
from routing.services import (
    deployment_create,
    deployment_update,
    provider_create,
    provider_update,
    route_create,
    route_update,
)
from tenants.models import Organization

REFUSAL = "Providers and routes are for the organization's owners and admins."
admin_page = org_page(ADMIN_ROLES, refusal=REFUSAL)


def _providers_of(org: Organization) -> QuerySet[Provider]:
    return Provider.objects.filter(org=org).prefetch_related("deployments")


def _routes_of(org: Organization) -> QuerySet[Route]:
    return (
        Route.objects.filter(org=org)
        .select_related("variant_deployment", "shadow_deployment")
        .prefetch_related("deployments")
    )


def _show_service_errors(form: forms.BaseForm, error: ValidationError) -> None:
    """Put a service's validation errors on the form, beside the fields they concern."""
    if not hasattr(error, "error_dict"):
        form.add_error(None, error)
        return
    for field, errors in error.error_dict.items():
        form.add_error(field if field in form.fields else None, errors)


def _back_to_list(viewer: Viewer, message: str, request: HttpRequest) -> HttpResponseRedirect:
    messages.success(request, message)
    return HttpResponseRedirect(viewer.url("dashboard:providers"))


@admin_page
def provider_list(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """The org's providers with their deployments' live health, and the org's routes."""
    rows, live = deployment_health_list(org_id=viewer.org.pk)
    health = {row.deployment_id: row.status for row in rows}
    providers = [
        {
            "provider": provider,
            "default_url": default_base_url(provider.kind),
            "deployments": [
                {"deployment": deployment, "status": health.get(deployment.pk)}
                for deployment in provider.deployments.all()
            ],
        }
        for provider in _providers_of(viewer.org)
    ]
    context = {"providers": providers, "routes": _routes_of(viewer.org), "live": live}
    return render_page(request, viewer, "dashboard/providers.html", context)


def _provider_form_page(
    request: HttpRequest, viewer: Viewer, form: ProviderForm, provider: Provider | None
) -> HttpResponse:
    context = {"form": form, "provider": provider}
    return render_page(request, viewer, "dashboard/providers_form.html", context)


@admin_page
def provider_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Add a provider; its API key is stored encrypted and never shown again."""
    form = ProviderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            provider = provider_create(
                org=viewer.org,
                actor=actor_of(request),
                values=form.values(),
                api_key=form.cleaned_data["api_key"],
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Provider {provider.name} added.", request)
    return _provider_form_page(request, viewer, form, None)


@admin_page
def provider_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Change a provider; an empty API key field keeps the stored key."""
    provider = get_object_or_404(Provider, pk=pk, org=viewer.org)
    form = ProviderForm(request.POST or None, instance=provider)
    if request.method == "POST" and form.is_valid():
        try:
            provider = provider_update(
                provider=provider,
                actor=actor_of(request),
                changes=form.values(),
                api_key=form.cleaned_data["api_key"],
                remove_api_key=form.cleaned_data.get("remove_api_key", False),
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Provider {provider.name} saved.", request)
    # The form changed the instance in memory while validating; show what is stored.
    provider.refresh_from_db()
    return _provider_form_page(request, viewer, form, provider)


def _enabled_choice(request: HttpRequest) -> bool:
    return request.POST.get("enabled") == "1"


def _toggled(
    request: HttpRequest, viewer: Viewer, what: str, change: Callable[[], object], enabled: bool
) -> HttpResponseRedirect:
    """Run an enable/disable change and say how it went on the list page."""
    try:
        change()
    except ValidationError as error:
        # A row set up elsewhere (the Django admin) may no longer pass validation.
        messages.error(request, f"{what} was not changed: {' '.join(error.messages)}")
        return HttpResponseRedirect(viewer.url("dashboard:providers"))
    return _back_to_list(viewer, f"{what} {'enabled' if enabled else 'disabled'}.", request)


@require_POST
@admin_page
def provider_toggle(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Enable or disable a provider (all its deployments with it)."""
    provider = get_object_or_404(Provider, pk=pk, org=viewer.org)
    enabled = _enabled_choice(request)
    return _toggled(
        request,
        viewer,
        f"Provider {provider.name}",
        lambda: provider_update(
            provider=provider, actor=actor_of(request), changes={"enabled": enabled}
        ),
        enabled,
    )


def _deployment_form_page(
    request: HttpRequest,
    viewer: Viewer,
    form: DeploymentForm,
    provider: Provider,
    deployment: Deployment | None,
) -> HttpResponse:
    context = {"form": form, "provider": provider, "deployment": deployment}
    return render_page(request, viewer, "dashboard/deployments_form.html", context)


@admin_page
def deployment_new(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Add a deployment (one upstream model) to one of the org's providers."""
    provider = get_object_or_404(Provider, pk=pk, org=viewer.org)
    form = DeploymentForm(request.POST or None, instance=Deployment(provider=provider))
    if request.method == "POST" and form.is_valid():
        try:
            deployment = deployment_create(
                provider=provider, actor=actor_of(request), values=form.values()
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Deployment {deployment.name} added.", request)
    return _deployment_form_page(request, viewer, form, provider, None)


def _deployment_of(viewer: Viewer, pk: int) -> Deployment:
    return get_object_or_404(
        Deployment.objects.select_related("provider"), pk=pk, provider__org=viewer.org
    )


@admin_page
def deployment_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Change a deployment's model, share of traffic, timeouts or limits."""
    deployment = _deployment_of(viewer, pk)
    form = DeploymentForm(request.POST or None, instance=deployment)
    if request.method == "POST" and form.is_valid():
        try:
            deployment = deployment_update(
                deployment=deployment, actor=actor_of(request), changes=form.values()
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Deployment {deployment.name} saved.", request)
    deployment.refresh_from_db()
    return _deployment_form_page(request, viewer, form, deployment.provider, deployment)


@require_POST
@admin_page
def deployment_toggle(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Enable or disable one deployment."""
    deployment = _deployment_of(viewer, pk)
    enabled = _enabled_choice(request)
    return _toggled(
        request,
        viewer,
        f"Deployment {deployment.name}",
        lambda: deployment_update(
            deployment=deployment, actor=actor_of(request), changes={"enabled": enabled}
        ),
        enabled,
    )


def _route_form_page(
    request: HttpRequest, viewer: Viewer, form: RouteForm, route: Route | None
) -> HttpResponse:
    context = {"form": form, "route": route}
    return render_page(request, viewer, "dashboard/routes_form.html", context)


@admin_page
def route_new(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Publish a model name served by some of the org's deployments."""
    form = RouteForm(request.POST or None, org=viewer.org, instance=Route(org=viewer.org))
    if request.method == "POST" and form.is_valid():
        try:
            route = route_create(
                org=viewer.org,
                actor=actor_of(request),
                values=form.values(),
                deployments=list(form.cleaned_data["deployments"]),
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Route {route.model_name} added.", request)
    return _route_form_page(request, viewer, form, None)


@admin_page
def route_edit(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Change a route's deployments, strategy, fallbacks, split, shadow or cache."""
    route = get_object_or_404(Route, pk=pk, org=viewer.org)
    form = RouteForm(request.POST or None, org=viewer.org, instance=route)
    if request.method == "POST" and form.is_valid():
        try:
            route = route_update(
                route=route,
                actor=actor_of(request),
                changes=form.values(),
                deployments=list(form.cleaned_data["deployments"]),
            )
        except ValidationError as error:
            _show_service_errors(form, error)
        else:
            return _back_to_list(viewer, f"Route {route.model_name} saved.", request)
    route.refresh_from_db()
    return _route_form_page(request, viewer, form, route)


@require_POST
@admin_page
def route_toggle(request: HttpRequest, viewer: Viewer, pk: int) -> HttpResponse:
    """Enable or disable a route (a disabled one answers "model not found")."""
    route = get_object_or_404(Route, pk=pk, org=viewer.org)
    enabled = _enabled_choice(request)
    return _toggled(
        request,
        viewer,
        f"Route {route.model_name}",
        lambda: route_update(route=route, actor=actor_of(request), changes={"enabled": enabled}),
        enabled,
    )


urlpatterns = [
    path("providers/", provider_list, name="providers"),
    path("providers/new/", provider_new, name="providers_new"),
    path("providers/<int:pk>/edit/", provider_edit, name="providers_edit"),
    path("providers/<int:pk>/toggle/", provider_toggle, name="providers_toggle"),
    path(
        "providers/<int:pk>/deployments/new/",
        deployment_new,
        name="providers_deployment_new",
    ),
    path("deployments/<int:pk>/edit/", deployment_edit, name="providers_deployment_edit"),
    path("deployments/<int:pk>/toggle/", deployment_toggle, name="providers_deployment_toggle"),
    path("routes/new/", route_new, name="providers_route_new"),
    path("routes/<int:pk>/edit/", route_edit, name="providers_route_edit"),
    path("routes/<int:pk>/toggle/", route_toggle, name="providers_route_toggle"),
]
