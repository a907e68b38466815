"""Choosing deployments and failing over between them, before the first byte.

A request is tried on the route's deployments in the order its strategy gives,
then on its fallback routes' deployments, skipping open circuits, deployments at
their RPM/TPM limits and models too small for the request, until one answers,
the attempts run out, or the route's deadline passes. Errors caused by the
request itself are never retried. Once a stream's first byte has gone to the
client nothing is retried.
"""

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from billing.contracts import TokenUsage
from billing.pricing import cost_nanos
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import (
    GatewayError,
    InvalidRequest,
    LimitExceeded,
    NoDeploymentAvailable,
    UpstreamError,
)
from routing.health import DeploymentHealth
from routing.providers import adapter_for
from routing.providers.base import ProviderAdapter
from routing.snapshot import ConfigSnapshot

T = TypeVar("T")

# Backoff before retrying the same deployment: exponential, with jitter.
_BACKOFF_BASE_S = 0.1
_BACKOFF_MAX_S = 2.0
# Output tokens assumed for cost ranking when the request sets no max_tokens.
_DEFAULT_OUTPUT_TOKENS = 256


class Demand:
    """What a request needs from a deployment: tokens, for context and cost ranking.

    The prompt is only counted if a routing decision asks (lowest cost, or a
    deployment with a context window), so most requests never pay for it.
    """

    __slots__ = ("_estimate", "_prompt_tokens", "max_output_tokens")

    def __init__(
        self,
        *,
        max_output_tokens: int | None,
        prompt_tokens: int | None = None,
        estimate: Callable[[], int] | None = None,
    ) -> None:
        self.max_output_tokens = max_output_tokens
        self._prompt_tokens = prompt_tokens
        self._estimate = estimate

    @property
    def prompt_tokens(self) -> int:
        if self._prompt_tokens is None:
            self._prompt_tokens = self._estimate() if self._estimate else 0
        return self._prompt_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + (self.max_output_tokens or 0)


def _weighted_order(deployments: list[DeploymentSpec]) -> list[DeploymentSpec]:
    """A random order where heavier deployments tend to come first (by weight)."""
    remaining, ordered = list(deployments), []
    while remaining:
        weights = [max(d.weight, 0) for d in remaining]
        if sum(weights) == 0:
            random.shuffle(remaining)
            return ordered + remaining
        chosen = random.choices(remaining, weights=weights)[0]
        ordered.append(chosen)
        remaining.remove(chosen)
    return ordered


def _reserved_tokens(deployment: DeploymentSpec, demand: Demand) -> int:
    """Tokens a call holds against the deployment's TPM while in flight (only if it has one)."""
    return demand.total_tokens if deployment.tpm_limit else 0


def _load(
    deployment: DeploymentSpec, health: DeploymentHealth, demand: Demand, now: float
) -> float:
    """Share of the deployment's tightest per-minute limit this request would bring it to.

    Above 1.0 the call would break the provider's limit; 0.0 for a deployment without limits.
    """
    if deployment.rpm_limit is None and deployment.tpm_limit is None:
        return 0.0
    requests, tokens = health.minute_usage(deployment.deployment_id, now)
    load = 0.0
    if deployment.rpm_limit is not None:
        load = (requests + 1) / max(deployment.rpm_limit, 1)
    if deployment.tpm_limit is not None:
        load = max(load, (tokens + demand.total_tokens) / max(deployment.tpm_limit, 1))
    return load


def order_deployments(
    plan: RoutePlan,
    *,
    health: DeploymentHealth,
    snapshot: ConfigSnapshot,
    org_id: int,
    demand: Demand,
) -> list[DeploymentSpec]:
    """The route's deployments in the order its strategy prefers them."""
    deployments = list(plan.deployments)
    if plan.strategy == "weighted":
        return _weighted_order(deployments)
    if plan.strategy == "least_latency":
        # A deployment without (recent) data goes first, so it gets measured.
        now = time.monotonic()
        return sorted(deployments, key=lambda d: health.latency_ms(d.deployment_id, now) or 0.0)
    if plan.strategy == "usage_aware":
        now = time.monotonic()
        random.shuffle(deployments)  # equal headroom is shared, not always won by the first
        return sorted(deployments, key=lambda d: _load(d, health, demand, now))
    if plan.strategy == "least_busy":
        random.shuffle(deployments)  # ties are shared, not always won by the first
        return sorted(deployments, key=lambda d: health.in_flight(d.deployment_id))
    if plan.strategy == "lowest_cost":
        now = datetime.now(UTC)
        usage = TokenUsage(
            input_tokens=demand.prompt_tokens,
            output_tokens=demand.max_output_tokens or _DEFAULT_OUTPUT_TOKENS,
        )

        def cost(deployment: DeploymentSpec) -> tuple[int, int]:
            rates = snapshot.price_for(
                provider_kind=deployment.provider_kind,
                model=deployment.upstream_model,
                org_id=org_id,
                moment=now,
            )
            if rates is None:
                return (1, 0)  # unpriced: after every priced deployment
            return (0, cost_nanos(usage=usage, rates=rates))

        return sorted(deployments, key=cost)
    return deployments  # priority: already sorted by priority, then name


def ab_bucket(route_id: int, subject: str) -> int:
    """A stable 0-99 bucket for `subject` on this route, so an A/B choice is sticky."""
    digest = hashlib.sha256(f"{route_id}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def candidates(
    plan: RoutePlan,
    *,
    health: DeploymentHealth,
    snapshot: ConfigSnapshot,
    org_id: int,
    demand: Demand,
    subject: str = "",
) -> list[DeploymentSpec]:
    """The route's deployments by strategy, then its fallback routes', without repeats.

    In the A/B variant's share (by `subject`: a key or an end user) the variant
    comes first; the route's own deployments remain its fallbacks.
    """
    in_variant = (
        plan.variant is not None
        and plan.variant_percent > 0
        and ab_bucket(plan.route_id, subject) < plan.variant_percent
    )
    plans = [plan]
    for name in plan.fallback_models:
        fallback = snapshot.route_for(org_id=org_id, model=name)
        if fallback is not None and fallback not in plans:
            plans.append(fallback)
    seen: set[int] = set()
    ordered = []
    if in_variant:
        assert plan.variant is not None
        seen.add(plan.variant.deployment_id)
        ordered.append(plan.variant)
    for each in plans:
        for deployment in order_deployments(
            each, health=health, snapshot=snapshot, org_id=org_id, demand=demand
        ):
            if deployment.deployment_id not in seen:
                seen.add(deployment.deployment_id)
                ordered.append(deployment)
    return ordered


def _retry_after_s(error: UpstreamError) -> float | None:
    value = error.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter ("equal jitter": half fixed, half random)."""
    ceiling = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _attempt_order(
    deployments: list[DeploymentSpec], max_attempts: int
) -> Iterator[DeploymentSpec]:
    """Each deployment once (failover), then again in turn while attempts remain (retries)."""
    for index in range(max(max_attempts, len(deployments))):
        yield deployments[index % len(deployments)]


Attempt = Callable[[DeploymentSpec, ProviderAdapter], Awaitable[T]]


async def serve_with_failover(
    plan: RoutePlan,
    *,
    snapshot: ConfigSnapshot,
    adapters: dict[str, ProviderAdapter],
    health: DeploymentHealth,
    org_id: int,
    demand: Demand,
    attempt: Attempt[T],
    on_attempt: Callable[[DeploymentSpec], None],
    on_attempt_failed: Callable[[GatewayError], None] | None = None,
    subject: str = "",
) -> T:
    """The first successful `attempt`, failing over and retrying per the route.

    `attempt` must raise before anything reaches the client (a stream returns
    after its first event); `on_attempt` hears of each upstream call as it starts,
    `on_attempt_failed` of each one left behind for another (not of one whose
    error ends the request: the request's own outcome tells that).
    """
    started_at = time.monotonic()
    deadline = started_at + plan.deadline_s
    ordered = candidates(
        plan, health=health, snapshot=snapshot, org_id=org_id, demand=demand, subject=subject
    )
    fitting = [
        d
        for d in ordered
        if d.context_window_tokens is None or demand.total_tokens <= d.context_window_tokens
    ]
    if ordered and not fitting:
        raise InvalidRequest(
            f"The request needs about {demand.total_tokens} tokens, more than any deployment "
            f"of '{plan.model_name}' accepts.",
            param="messages",
            code="context_length_exceeded",
        )
    last_error: GatewayError | None = None
    previous: DeploymentSpec | None = None
    attempts = 0
    at_limit = False
    for deployment in _attempt_order(fitting, plan.max_attempts) if fitting else ():
        now = time.monotonic()
        if now >= deadline:
            break
        if _load(deployment, health, demand, now) > 1.0:
            at_limit = True
            continue  # at its provider's limit: not tried, not counted
        if not health.allow(deployment.deployment_id, now):
            continue  # open circuit: not tried, not counted
        if previous is not None and previous.deployment_id == deployment.deployment_id:
            # Retrying the same deployment: wait as it asked, or back off.
            assert isinstance(last_error, UpstreamError)
            wait_s = _retry_after_s(last_error) or _backoff_s(attempts)
            if now + wait_s >= deadline:
                break
            await asyncio.sleep(wait_s)
        adapter = adapter_for(adapters, deployment.provider_kind)
        previous = deployment
        attempts += 1
        on_attempt(deployment)
        reserved = _reserved_tokens(deployment, demand)
        health.started(deployment.deployment_id, now, reserved_tokens=reserved)
        begun = time.monotonic()
        try:
            result = await attempt(deployment, adapter)
        except UpstreamError as exc:
            if not exc.retryable:
                # The provider refused this request (4xx): the request is at fault, not the
                # deployment; counting it would let any client open the circuit for all.
                raise
            health.record_failure(deployment.deployment_id, time.monotonic())
            last_error = exc
            if on_attempt_failed is not None:
                on_attempt_failed(exc)
            continue
        except InvalidRequest as exc:
            if attempts == 1:
                raise  # the request itself is wrong for the route's first choice
            last_error = last_error or NoDeploymentAvailable("No fallback could take this request.")
            if on_attempt_failed is not None:
                on_attempt_failed(exc)
            continue  # a fallback that cannot honour it is skipped
        finally:
            health.finished(deployment.deployment_id, reserved_tokens=reserved)
        elapsed_ms = (time.monotonic() - begun) * 1000
        health.record_success(deployment.deployment_id, time.monotonic(), latency_ms=elapsed_ms)
        return result
    if last_error is not None:
        raise last_error
    if at_limit:
        raise LimitExceeded(
            f"Every deployment of '{plan.model_name}' is at its requests- or tokens-per-minute "
            "limit; retry shortly.",
            code="deployment_rate_limited",
            headers={"retry-after": "1"},
        )
    raise NoDeploymentAvailable(
        f"No deployment of '{plan.model_name}' is available right now; retry shortly.",
        headers={"retry-after": "5"},
    )
