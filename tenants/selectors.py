"""Reads for tenants."""

from tenants.contracts import KeyContext
from tenants.models import Membership, Organization, VirtualKey


def virtual_key_contexts() -> list[KeyContext]:
    """Every key that is not revoked, as the proxy's snapshot needs it (one query).

    Expired keys are included so the proxy can say "expired" rather than "invalid".
    """
    rows = VirtualKey.objects.filter(revoked_at__isnull=True).values_list(
        "id", "prefix", "secret_hash", "name", "org_id", "org__slug", "team_id",
        "allowed_models", "expires_at",
    )  # fmt: skip
    return [
        KeyContext(
            key_id=key_id,
            prefix=prefix,
            secret_hash=secret_hash,
            name=name,
            org_id=org_id,
            org_slug=org_slug,
            team_id=team_id,
            allowed_models=frozenset(allowed_models or ()),
            expires_at=expires_at,
        )
        for (key_id, prefix, secret_hash, name, org_id, org_slug, team_id, allowed_models,
             expires_at) in rows
    ]  # fmt: skip


def organizations_for_user(*, user: object) -> list[Organization]:
    """Organizations the user may open in the dashboard (all of them for superusers)."""
    if getattr(user, "is_superuser", False):
        return list(Organization.objects.order_by("name"))
    return list(Organization.objects.filter(memberships__user=user).order_by("name"))


def membership_role(*, user: object, org: Organization) -> str | None:
    """The user's role in `org`, "owner" for superusers, None for outsiders."""
    if getattr(user, "is_superuser", False):
        return Membership.Role.OWNER
    return Membership.objects.filter(user=user, org=org).values_list("role", flat=True).first()
