"""What tenants hands to other apps and to the hot path: frozen, model-free."""

from dataclasses import dataclass, field
from datetime import datetime

from tenants.ip_allowlist import IPAllowlist


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """Per-minute limits of the key, its team or its org (None: no limit)."""

    scope: str  # "key", "team" or "org"
    scope_id: int
    label: str  # for people: "key 'ci' (tgk_ab12)", "team 'search'"
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A budget that applies to a key's requests (its org's, its team's or its own)."""

    budget_id: int
    scope: str  # "org", "team" or "key"
    label: str  # for people: "Team 'search' monthly budget"
    period: str
    time_zone: str  # the org's: periods are calendar periods there
    limit_nanos: int
    hard: bool
    created_at: datetime  # a lifetime budget's burn rate counts from here


@dataclass(frozen=True, slots=True)
class KeyContext:
    """An active virtual key as the proxy sees it."""

    key_id: int
    prefix: str
    secret_hash: str = field(repr=False)
    name: str
    org_id: int
    org_slug: str
    team_id: int | None
    # Empty means every model the org can reach.
    allowed_models: frozenset[str]
    expires_at: datetime | None
    # Rate limits of the key, its team and its org, those that set any.
    limits: tuple[ScopeLimits, ...] = ()
    # Every budget its requests count against; all must hold.
    budgets: tuple[BudgetSpec, ...] = ()
    # The org keeps request and response bodies in its request log.
    log_request_bodies: bool = False
    # Client networks the key may be used from; None: any (nothing to check).
    ip_allowlist: IPAllowlist | None = None

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now
