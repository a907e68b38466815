"""Django admin for providers, deployments and routes.

A provider's API key is write-only: the form never renders it back, and a
blank field keeps the stored key.
"""

from typing import Any

from django import forms
from django.contrib import admin
from django.db import transaction
from django.http import HttpRequest

from routing.models import Deployment, Provider, Route
from routing.services import deployment_list_price_ensure
from tenants.admin import AuditedAdmin


class ProviderForm(forms.ModelForm):
    api_key = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored key.")

    class Meta:
        model = Provider
        fields = ["org", "name", "kind", "base_url", "api_version", "enabled"]

    def save(self, commit: bool = True) -> Provider:
        provider = super().save(commit=False)
        if self.cleaned_data.get("clear_api_key"):
            provider.set_api_key("")
        elif self.cleaned_data.get("api_key"):
            provider.set_api_key(self.cleaned_data["api_key"])
        if commit:
            provider.save()
        return provider


@admin.register(Provider)
class ProviderAdmin(AuditedAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "org", "base_url", "has_api_key", "enabled"]
    list_filter = ["kind", "enabled", "org"]
    search_fields = ["name"]

    @admin.display(boolean=True, description="API key set")
    def has_api_key(self, obj: Provider) -> bool:
        return obj.has_api_key


@admin.register(Deployment)
class DeploymentAdmin(AuditedAdmin):
    list_display = ["name", "provider", "upstream_model", "priority", "weight", "enabled"]
    list_filter = ["provider", "enabled"]
    search_fields = ["name", "upstream_model"]

    def save_model(self, request: HttpRequest, obj: Deployment, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # After commit: a rolled-back save leaves no price behind.
        transaction.on_commit(lambda: deployment_list_price_ensure(obj))


class RouteForm(forms.ModelForm):
    class Meta:
        model = Route
        fields = [
            "org", "model_name", "strategy", "deployments", "fallback_models", "max_attempts",
            "deadline_ms", "max_output_tokens", "cache_ttl_seconds", "cache_hit_billing",
            "variant_deployment", "variant_percent", "variant_sticky_by", "shadow_deployment",
            "shadow_percent", "unsupported_params", "enabled",
        ]  # fmt: skip

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        org = cleaned.get("org")
        extra = [cleaned.get("variant_deployment"), cleaned.get("shadow_deployment")]
        for deployment in [*(cleaned.get("deployments") or []), *filter(None, extra)]:
            provider_org = deployment.provider.org
            if provider_org is not None and provider_org != org:
                raise forms.ValidationError(
                    f"Deployment {deployment.name} uses a provider of another organization; "
                    "a route may only use global providers or its own organization's."
                )
        return cleaned


@admin.register(Route)
class RouteAdmin(AuditedAdmin):
    form = RouteForm
    list_display = ["model_name", "org", "strategy", "enabled"]
    list_filter = ["strategy", "enabled", "org"]
    search_fields = ["model_name"]
    filter_horizontal = ["deployments"]

    def get_queryset(self, request: HttpRequest) -> Any:
        return super().get_queryset(request).select_related("org")
