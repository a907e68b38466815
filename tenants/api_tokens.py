"""Management API tokens: issue, revoke, and find the token behind a presented secret."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from tenants.keys import generate_key, key_matches, key_prefix
from tenants.models import APIToken, Organization
from tenants.services import Actor, audit_record

API_TOKEN_SCHEME = "tgm"
# last_used_at is written at most this often per token: one row write per call is waste.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: APIToken
    plaintext: str  # shown to its creator once; only its hash is stored


@transaction.atomic
def api_token_create(
    *, org: Organization, name: str, role: str, actor: Actor, expires_at: datetime | None = None
) -> IssuedToken:
    """Issue a token for `org`'s management API with `role` (see APIToken.Role)."""
    generated = generate_key(API_TOKEN_SCHEME)
    token = APIToken(
        org=org,
        name=" ".join(name.split()),
        role=role,
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        created_by=actor.user if actor.user is not None and actor.user.pk else None,
        expires_at=expires_at,
    )
    token.full_clean()
    token.save()
    audit_record(
        actor=actor,
        org=org,
        action="api_token.create",
        target=token,
        after={
            "name": token.name,
            "role": role,
            "prefix": token.prefix,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return IssuedToken(token=token, plaintext=generated.plaintext)


@transaction.atomic
def api_token_revoke(*, token: APIToken, actor: Actor) -> APIToken:
    """Revoke a token: its next call is refused. Revoking twice changes nothing."""
    token = APIToken.objects.select_for_update().select_related("org").get(pk=token.pk)
    if token.revoked_at is not None:
        return token
    token.revoked_at = timezone.now()
    token.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        org=token.org,
        action="api_token.revoke",
        target=token,
        before={"name": token.name, "prefix": token.prefix},
    )
    return token


def api_token_authenticate(presented: str) -> APIToken | None:
    """The active token whose secret is `presented` (None for anything else), its
    last use recorded; compared in constant time."""
    prefix = key_prefix(presented, API_TOKEN_SCHEME)
    if prefix is None:
        return None
    token = APIToken.objects.active().select_related("org").filter(prefix=prefix).first()
    if token is None or not key_matches(presented, token.secret_hash):
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        APIToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token
