"""Azure OpenAI: OpenAI's format, with per-deployment URLs, api-version and `api-key`."""

from urllib.parse import quote, urlencode

from routing.contracts import DeploymentSpec
from routing.providers.openai import OpenAIAdapter


class AzureOpenAIAdapter(OpenAIAdapter):
    """OpenAI's adapter addressed the Azure way; bodies and streams are unchanged."""

    kind = "azure"

    def _url(self, deployment: DeploymentSpec, target: str) -> str:
        """`{base}/openai/deployments/{upstream_model}{target}?api-version=…` for `deployment`."""
        # On Azure the upstream model is the deployment's name, chosen by its owner.
        name = quote(deployment.upstream_model, safe="")
        url = f"{deployment.base_url.rstrip('/')}/openai/deployments/{name}{target}"
        # Left out when unset, so Azure's own 400 says what is missing.
        if deployment.api_version:
            url += "?" + urlencode({"api-version": deployment.api_version})
        return url

    def _credentials(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}
