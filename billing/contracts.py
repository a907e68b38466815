"""What billing exchanges with the proxy: frozen, model-free, money in nanos."""

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int = 0
    cached_input_tokens: int = 0  # part of input_tokens served from the provider's cache
    output_tokens: int = 0
    reasoning_tokens: int = 0  # part of output_tokens spent on reasoning
    estimated: bool = False

    @property
    def is_zero(self) -> bool:
        return self.input_tokens == 0 and self.output_tokens == 0


@dataclass(frozen=True, slots=True)
class PriceRates:
    """One price row, in USD per million tokens."""

    price_id: int
    org_id: int | None
    provider_kind: str
    model: str
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cached_input_usd_per_mtok: Decimal | None
    reasoning_usd_per_mtok: Decimal | None
    effective_from: datetime
    effective_until: datetime | None

    def applies_at(self, moment: datetime) -> bool:
        return self.effective_from <= moment and (
            self.effective_until is None or moment < self.effective_until
        )


@dataclass(frozen=True, slots=True)
class UpstreamAttempt:
    """One upstream call made for a request (a retry or a fallback is another one)."""

    deployment_id: int
    deployment_name: str
    provider_kind: str
    outcome: str  # a UsageEvent.Outcome value: how this call ended
    status_code: int  # what the gateway made of it (502, 504, 429…; 200 when it answered)
    error_class: str = ""
    started_ms: int = 0  # after the request arrived
    duration_ms: int = 0  # until it failed, or (the one that answered) until the request ended
    ttfb_ms: int | None = None  # first byte relayed to the client, from this call's start


@dataclass(frozen=True, slots=True)
class LoggedBodies:
    """Request and response bodies of one request, kept only for orgs that turned it on.

    Text capped at TOLLGATE_BODY_LOG_MAX_BYTES (UTF-8) each; never headers, never a key.
    A stream's response is the raw server-sent events the gateway relayed.
    """

    request: str = ""
    request_truncated: bool = False
    response: str = ""
    response_truncated: bool = False


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One proxied request, as the proxy reports it for the ledger."""

    event_id: uuid.UUID
    org_id: int
    team_id: int | None
    key_id: int | None
    endpoint: str
    model: str
    outcome: str
    status_code: int
    started_at: datetime
    finished_at: datetime
    route_id: int | None = None
    deployment_id: int | None = None
    deployment_name: str = ""
    provider_kind: str = ""
    upstream_model: str = ""
    usage: TokenUsage = TokenUsage()
    cost_nanos: int = 0
    price_id: int | None = None
    priced: bool = True
    error_class: str = ""
    cache_hit: bool = False
    attempts: int = 1
    is_stream: bool = False
    latency_ms: int | None = None
    ttft_ms: int | None = None
    # Attribution the client sent: validated tags, in order, and its own end-user id.
    tags: tuple[str, ...] = ()
    end_user: str = ""
    # Every upstream call, in order; `attempts` is its length.
    attempt_log: tuple[UpstreamAttempt, ...] = ()
    bodies: LoggedBodies | None = None
