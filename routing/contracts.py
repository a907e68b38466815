"""Routing's frozen contracts: what the hot path and adapters work with."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """Everything needed to call one deployment; carries a decrypted secret."""

    deployment_id: int
    name: str
    provider_id: int
    provider_kind: str
    base_url: str
    api_key: str = field(repr=False)
    api_version: str  # Azure OpenAI only
    upstream_model: str
    weight: int
    priority: int
    connect_timeout_s: float
    ttft_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    context_window_tokens: int | None = None
    rpm_limit: int | None = None  # the provider's limits for this deployment
    tpm_limit: int | None = None


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A public model name and the deployments that may serve it."""

    route_id: int
    org_id: int | None
    model_name: str
    strategy: str
    deployments: tuple[DeploymentSpec, ...]
    unsupported_params: str  # "reject" or "drop"
    fallback_models: tuple[str, ...]
    max_attempts: int
    deadline_s: float
    cache_ttl_s: int  # 0: no response cache
    cache_hits_billed: bool
    created: int  # Unix time, as /v1/models reports it
    variant: DeploymentSpec | None = None  # A/B split
    variant_percent: int = 0
    variant_sticky_by: str = "key"  # or "user"
    shadow: DeploymentSpec | None = None  # shadow traffic
    shadow_percent: int = 0
    max_output_tokens: int | None = None  # sent and reserved under a hard budget


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated chat-completions request; `payload` is the client's JSON object."""

    model: str
    payload: dict[str, Any] = field(repr=False)
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str
    payload: dict[str, Any] = field(repr=False)
