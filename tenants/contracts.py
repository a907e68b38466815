"""What tenants hands to other apps and to the hot path: frozen, model-free."""

from dataclasses import dataclass, field
from datetime import datetime


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

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now
