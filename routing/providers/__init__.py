"""Provider adapters, chosen by the provider's kind."""

import aiohttp

from routing.errors import UpstreamError
from routing.providers.anthropic import AnthropicAdapter
from routing.providers.azure import AzureOpenAIAdapter
from routing.providers.base import ProviderAdapter
from routing.providers.gemini import GeminiAdapter
from routing.providers.openai import OpenAIAdapter

# Hosts that speak the OpenAI API; the presets only differ by base URL.
_OPENAI_DIALECTS = (
    "openai", "openai_compatible", "mock", "groq", "together", "mistral", "deepseek",
    "fireworks", "openrouter", "vllm", "ollama", "lmstudio",
)  # fmt: skip

ADAPTERS: dict[str, type[ProviderAdapter]] = {
    **dict.fromkeys(_OPENAI_DIALECTS, OpenAIAdapter),
    "anthropic": AnthropicAdapter,
    "azure": AzureOpenAIAdapter,
    "gemini": GeminiAdapter,
}


def adapters_for(session: aiohttp.ClientSession) -> dict[str, ProviderAdapter]:
    """One adapter instance per provider kind, sharing the process's upstream session."""
    return {kind: adapter_class(session) for kind, adapter_class in ADAPTERS.items()}


def adapter_for(adapters: dict[str, ProviderAdapter], kind: str) -> ProviderAdapter:
    """The adapter for `kind`; an unknown kind is a configuration fault, not a crash."""
    adapter = adapters.get(kind)
    if adapter is None:
        raise UpstreamError(f"Provider kind {kind!r} is not supported by this gateway.")
    return adapter
