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
