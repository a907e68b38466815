"""Provider adapters, chosen by the provider's kind."""

import aiohttp

from routing.errors import UpstreamError
from routing.providers.base import ProviderAdapter
from routing.providers.openai import OpenAIAdapter

# The built-in mock provider and generic OpenAI-compatible hosts speak OpenAI.
ADAPTERS: dict[str, type[ProviderAdapter]] = {
    "openai": OpenAIAdapter,
    "openai_compatible": OpenAIAdapter,
    "mock": OpenAIAdapter,
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
