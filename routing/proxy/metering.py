"""Settling a request into exactly one usage event."""

import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from billing.contracts import TokenUsage, UsageRecord
from billing.models import UsageEvent
from billing.pricing import cost_nanos
from billing.stream import UsageSink
from routing.contracts import DeploymentSpec, RoutePlan
from routing.errors import GatewayError, LimitExceeded, UpstreamError
from routing.health import DeploymentHealth
from routing.proxy.http import ProxyRequest
from routing.proxy.limits import Admission
from routing.snapshot import ConfigSnapshot
from tenants.contracts import KeyContext


def outcome_of(exc: GatewayError) -> str:
    """Whose failure it was: the provider's, or the client's (a request nobody could serve)."""
    if isinstance(exc, UpstreamError) and exc.retryable:
        return UsageEvent.Outcome.UPSTREAM_ERROR
    if isinstance(exc, LimitExceeded):
        return UsageEvent.Outcome.BLOCKED
    return UsageEvent.Outcome.CLIENT_ERROR


Background = Callable[[Coroutine[Any, Any, None]], None]


class Meter:
    """What one authenticated request did; `record` emits its usage event once.

    A request admitted on budgets or rate limits is settled on them first, in
    the background (`settle_later`), and its event emitted after: the ledger
    never gets ahead of the counters, which reconciliation relies on.
    """

    def __init__(
        self,
        *,
        request: ProxyRequest,
        key: KeyContext,
        endpoint: str,
        snapshot: ConfigSnapshot,
        sink: UsageSink,
        settle_later: Background,
        health: DeploymentHealth | None = None,
    ) -> None:
        self._request = request
        self._key = key
        self._snapshot = snapshot
        self._sink = sink
        self._health = health  # hears the tokens each deployment used, for TPM limits
        self._settle_later = settle_later
        self._recorded = False
        self.admission: Admission | None = None
        self.endpoint = endpoint
        self.model = ""
        self.is_stream = False
        self.route: RoutePlan | None = None
        self.deployment: DeploymentSpec | None = None
        self.attempts = 0
        self.cache_hit = False
        # (provider kind, upstream model) that prices this request, when no
        # deployment was called (a billed cache hit).
        self.priced_as: tuple[str, str] | None = None
        self.ttft_ms: int | None = None
        self.last_usage = TokenUsage()  # what the recorded event was billed for
        self.tags: tuple[str, ...] = ()  # attribution the client sent (steps.parse_attribution)
        self.end_user = ""

    def serving(self, deployment: DeploymentSpec) -> None:
        """An upstream attempt begins on `deployment`."""
        self.deployment = deployment
        self.attempts += 1

    def first_byte_sent(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = self._request.elapsed_ms()

    def record_failure(self, exc: GatewayError, usage: TokenUsage | None = None) -> None:
        """Record a failed request, with whatever it used before failing."""
        self.record(
            outcome=outcome_of(exc), status_code=exc.status, usage=usage, error_class=exc.code or ""
        )

    def record(
        self,
        *,
        outcome: str,
        status_code: int,
        usage: TokenUsage | None = None,
        error_class: str = "",
    ) -> None:
        """Price the usage and queue the event; later calls are ignored."""
        if self._recorded:
            return
        self._recorded = True
        usage = self.last_usage = usage or TokenUsage()
        deployment = self.deployment
        priced_as = self.priced_as or (
            (deployment.provider_kind, deployment.upstream_model) if deployment else None
        )
        if self._health is not None and deployment is not None and not usage.is_zero:
            self._health.record_tokens(
                deployment.deployment_id,
                usage.input_tokens + usage.output_tokens,
                time.monotonic(),
            )
        price_id, cost, priced = None, 0, True
        if priced_as is not None and not usage.is_zero:
            rates = self._snapshot.price_for(
                provider_kind=priced_as[0],
                model=priced_as[1],
                org_id=self._key.org_id,
                moment=self._request.started_at,
            )
            if rates is None:
                priced = False  # flagged for finance, never silently free
            else:
                price_id, cost = rates.price_id, cost_nanos(usage=usage, rates=rates)
        record = UsageRecord(
            event_id=self._request.event_id,
            org_id=self._key.org_id,
            team_id=self._key.team_id,
            key_id=self._key.key_id,
            endpoint=self.endpoint,
            model=self.model,
            outcome=outcome,
            status_code=status_code,
            started_at=self._request.started_at,
            finished_at=datetime.now(UTC),
            route_id=self.route.route_id if self.route else None,
            deployment_id=deployment.deployment_id if deployment else None,
            deployment_name=deployment.name if deployment else "",
            provider_kind=deployment.provider_kind if deployment else "",
            upstream_model=deployment.upstream_model if deployment else "",
            usage=usage,
            cost_nanos=cost,
            price_id=price_id,
            priced=priced,
            error_class=error_class,
            cache_hit=self.cache_hit,
            attempts=self.attempts,
            is_stream=self.is_stream,
            latency_ms=self._request.elapsed_ms(),
            ttft_ms=self.ttft_ms,
            tags=self.tags,
            end_user=self.end_user,
        )
        if self.admission is None:
            self._sink.add(record)
            return
        self._settle_later(self._settle_then_emit(self.admission, record))

    async def _settle_then_emit(self, admission: Admission, record: UsageRecord) -> None:
        usage = record.usage
        try:
            await admission.settle(
                cost_nanos=record.cost_nanos, tokens_used=usage.input_tokens + usage.output_tokens
            )
        finally:
            self._sink.add(record)
