"""Forms for editing providers, deployments and routes (the dashboard's).

They check the shape of what was typed; the services in routing/services.py
validate the row again and write it. A provider's API key is write-only: the
field never renders a stored key back, and leaving it empty keeps the key.
"""

from typing import Any

from django import forms

from routing.models import Deployment, Provider, Route
from routing.services import DEPLOYMENT_FIELDS, PROVIDER_FIELDS, ROUTE_FIELDS
from tenants.models import Organization


class ProviderForm(forms.ModelForm):
    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    remove_api_key = forms.BooleanField(label="Remove the stored key", required=False)

    class Meta:
        model = Provider
        fields = list(PROVIDER_FIELDS)
        labels = {"base_url": "Base URL", "api_version": "API version"}
        help_texts = {
            "base_url": "Leave blank to use the usual address of this kind of provider.",
            "api_version": "Azure OpenAI only, e.g. 2024-10-21.",
            "enabled": "A disabled provider's deployments take no traffic.",
        }
        widgets = {"base_url": forms.URLInput(attrs={"placeholder": "https://…"})}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stored = self.instance.pk is not None and self.instance.has_api_key
        self.fields["api_key"].help_text = (
            "Write-only. Leave empty to keep the stored key."
            if stored
            else "Write-only: it is stored encrypted and never shown again."
        )
        if not stored:
            del self.fields["remove_api_key"]

    def values(self) -> dict[str, Any]:
        """The provider's own fields, for provider_create / provider_update."""
        return {name: self.cleaned_data[name] for name in PROVIDER_FIELDS}


class DeploymentForm(forms.ModelForm):
    class Meta:
        model = Deployment
        fields = list(DEPLOYMENT_FIELDS)
        labels = {
            "upstream_model": "Upstream model",
            "connect_timeout_ms": "Connect timeout (ms)",
            "ttft_timeout_ms": "First-token timeout (ms)",
            "read_timeout_ms": "Read timeout (ms)",
            "total_timeout_ms": "Total timeout (ms)",
            "context_window_tokens": "Context window (tokens)",
            "rpm_limit": "Requests per minute",
            "tpm_limit": "Tokens per minute",
        }
        help_texts = {
            "name": "Unique within this provider, e.g. gpt-4o-eastus.",
            "upstream_model": "The model name the provider expects, e.g. gpt-4o-mini.",
            "context_window_tokens": "Longer requests go elsewhere. Blank: unknown.",
            "rpm_limit": "The provider's limit for this deployment. Blank: none.",
            "tpm_limit": "The provider's limit for this deployment. Blank: none.",
        }

    def values(self) -> dict[str, Any]:
        return {name: self.cleaned_data[name] for name in DEPLOYMENT_FIELDS}


class ModelNamesField(forms.CharField):
    """A list of model names typed one per line or separated by commas."""

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:
        text = super().to_python(value) or ""
        names = [name.strip() for name in text.replace("\n", ",").split(",")]
        return list(dict.fromkeys(name for name in names if name))


class DeploymentChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: Deployment) -> str:
        return f"{obj.name} ({obj.provider.name} · {obj.upstream_model})"


class DeploymentChoices(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj: Deployment) -> str:
        return f"{obj.name} ({obj.provider.name} · {obj.upstream_model})"


class RouteForm(forms.ModelForm):
    fallback_models = ModelNamesField(
        label="Fallback models",
        required=False,
        help_text="Other model names to try, in order, when every deployment fails. "
        "Separate them with commas.",
    )

    class Meta:
        model = Route
        fields = [*ROUTE_FIELDS, "deployments"]
        labels = {
            "model_name": "Model name",
            "max_attempts": "Max attempts",
            "deadline_ms": "Deadline (ms)",
            "max_output_tokens": "Max output tokens",
            "variant_deployment": "A/B variant deployment",
            "variant_percent": "A/B variant %",
            "variant_sticky_by": "Keep each caller on one side by",
            "shadow_deployment": "Shadow deployment",
            "shadow_percent": "Shadow %",
            "cache_ttl_seconds": "Cache TTL (seconds)",
            "cache_hit_billing": "Cache-hit billing",
            "unsupported_params": "Unsupported parameters",
        }
        help_texts = {
            "model_name": "The model name clients send in their requests.",
            "cache_ttl_seconds": "0 keeps the response cache off.",
            "variant_percent": "Share of traffic tried on the variant first (0 to 100).",
            "shadow_percent": "Share of requests also sent, unseen, to the shadow (0 to 100).",
        }
        field_classes = {
            "deployments": DeploymentChoices,
            "variant_deployment": DeploymentChoice,
            "shadow_deployment": DeploymentChoice,
        }
        widgets = {"deployments": forms.CheckboxSelectMultiple}

    def __init__(self, *args: Any, org: Organization, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only this organization's deployments can be chosen: a forged id of
        # another's is "not one of the available choices".
        own = Deployment.objects.filter(provider__org=org).select_related("provider")
        for name in ("deployments", "variant_deployment", "shadow_deployment"):
            self.fields[name].queryset = own  # type: ignore[attr-defined]
        self.fields["deployments"].help_text = "The deployments that serve this model name."

    def values(self) -> dict[str, Any]:
        return {name: self.cleaned_data[name] for name in ROUTE_FIELDS}
