"""Writes for organizations, teams, members, virtual keys and budgets."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils import timezone

from tenants.ip_allowlist import ip_allowlist_normalise
from tenants.keys import generate_key
from tenants.models import AuditLog, Budget, Membership, Organization, Team, VirtualKey


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: a signed-in user, or a named tool such as "cli"."""

    user: AbstractBaseUser | None = None
    label: str = ""
    ip_address: str | None = None
    # A tool's membership role where it matters (who may grant what): an API token acts
    # with its own; None for the CLI or a seed, which act as owners.
    role: str | None = None

    @classmethod
    def system(cls, label: str) -> "Actor":
        return cls(label=label)


def audit_record(
    *,
    actor: Actor,
    org: Organization | None,
    action: str,
    target: models.Model,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditLog:
    """Append one audit entry; callers pass only values that are safe to show."""
    return AuditLog.objects.create(
        org=org,
        actor=actor.user if actor.user is not None and actor.user.pk else None,
        actor_label=actor.label or (str(actor.user) if actor.user else ""),
        action=action,
        target_type=target._meta.label_lower,
        target_id=str(target.pk),
        before=before,
        after=after,
        ip_address=actor.ip_address,
    )


@transaction.atomic
def organization_create(
    *, slug: str, name: str, actor: Actor, time_zone: str = "UTC"
) -> Organization:
    """Create an organization."""
    org = Organization(slug=slug, name=name, time_zone=time_zone)
    org.full_clean()
    org.save()
    audit_record(
        actor=actor,
        org=org,
        action="organization.create",
        target=org,
        after={"slug": slug, "name": name, "time_zone": time_zone},
    )
    return org


@transaction.atomic
def team_create(*, org: Organization, slug: str, name: str, actor: Actor) -> Team:
    """Create a team inside `org`."""
    team = Team(org=org, slug=slug, name=name)
    team.full_clean()
    team.save()
    audit_record(
        actor=actor, org=org, action="team.create", target=team, after={"slug": slug, "name": name}
    )
    return team


_TEAM_EDITABLE = ("name", "rpm_limit", "tpm_limit")
_LIMITS = ("rpm_limit", "tpm_limit")


@transaction.atomic
def organization_limits_update(
    *, org: Organization, actor: Actor, rpm_limit: int | None, tpm_limit: int | None
) -> Organization:
    """Change the org-wide rate limits (every key's requests count against them)."""
    org = Organization.objects.select_for_update().get(pk=org.pk)
    before = _audit_values(org, _LIMITS)
    org.rpm_limit, org.tpm_limit = rpm_limit, tpm_limit
    org.full_clean()
    old, new = _changes(before, _audit_values(org, _LIMITS))
    if not new:
        return org
    org.save(update_fields=[*new, "updated_at"])
    audit_record(
        actor=actor, org=org, action="organization.limits", target=org, before=old, after=new
    )
    return org


@transaction.atomic
def team_update(
    *, team: Team, actor: Actor, name: str, rpm_limit: int | None, tpm_limit: int | None
) -> Team:
    """Rename a team or change its rate limits (its slug, in URLs and reports, stays)."""
    team = Team.objects.select_for_update().select_related("org").get(pk=team.pk)
    before = _audit_values(team, _TEAM_EDITABLE)
    team.name, team.rpm_limit, team.tpm_limit = name, rpm_limit, tpm_limit
    team.full_clean()
    old, new = _changes(before, _audit_values(team, _TEAM_EDITABLE))
    if not new:
        return team
    team.save(update_fields=[*new, "updated_at"])
    audit_record(
        actor=actor, org=team.org, action="team.update", target=team, before=old, after=new
    )
    return team


@transaction.atomic
def team_delete(*, team: Team, actor: Actor) -> None:
    """Delete a team that has no keys (revoked ones included: their usage names the team)."""
    team = Team.objects.select_for_update().select_related("org").get(pk=team.pk)
    if team.keys.exists():
        raise ValidationError(
            "This team still has virtual keys (revoked keys count: their usage history "
            "names the team). Move or keep the team instead."
        )
    audit_record(
        actor=actor, org=team.org, action="team.delete", target=team,
        before={"slug": team.slug, "name": team.name},
    )  # fmt: skip
    try:
        team.delete()
    except models.ProtectedError:
        raise ValidationError("This team has usage on record; it is kept for reports.") from None


@transaction.atomic
def membership_set(
    *,
    org: Organization,
    user: AbstractBaseUser,
    role: str,
    actor: Actor,
    team: Team | None = None,
) -> Membership:
    """Give `user` the `role` in `org`, creating or updating the membership."""
    membership = Membership.objects.filter(org=org, user=user).first()
    before = {"role": membership.role} if membership else None
    if membership is None:
        membership = Membership(org=org, user=user)
    membership.role = role
    membership.team = team
    membership.full_clean()
    membership.save()
    audit_record(
        actor=actor,
        org=org,
        action="membership.set",
        target=membership,
        before=before,
        after={"user": str(user), "role": role, "team": team.slug if team else None},
    )
    return membership


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: VirtualKey
    plaintext: str  # shown to the user once; only its hash is stored


@transaction.atomic
def virtual_key_issue(
    *,
    org: Organization,
    name: str,
    actor: Actor,
    team: Team | None = None,
    owner: AbstractBaseUser | None = None,
    allowed_models: Sequence[str] = (),
    expires_at: datetime | None = None,
    metadata: dict[str, Any] | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    monthly_budget_nanos: int | None = None,
    allowed_ips: Sequence[str] = (),
) -> IssuedKey:
    """Create an active key; the plaintext is returned here and nowhere else.

    With `monthly_budget_nanos`, the key gets a hard monthly budget of its own in the
    same transaction, so it is never usable without it. `allowed_ips` (CIDRs) limits
    where it may be used from; empty: anywhere.
    """
    ips = _allowed_ips(allowed_ips)
    generated = generate_key()
    key = VirtualKey(
        org=org,
        team=team,
        owner=owner,
        name=name,
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        allowed_models=sorted(set(allowed_models)),
        allowed_ips=ips,
        expires_at=expires_at,
        metadata=metadata or {},
        rpm_limit=rpm_limit,
        tpm_limit=tpm_limit,
    )
    key.full_clean()
    key.save()
    audit_record(
        actor=actor,
        org=org,
        action="virtual_key.issue",
        target=key,
        after={
            "name": name,
            "prefix": key.prefix,
            "team": team.slug if team else None,
            "allowed_models": key.allowed_models,
            "allowed_ips": key.allowed_ips,
            "expires_at": expires_at.isoformat() if expires_at else None,
            "rpm_limit": rpm_limit,
            "tpm_limit": tpm_limit,
        },
    )
    if monthly_budget_nanos is not None:
        budget_create(
            org=org,
            scope=Budget.Scope.KEY,
            key=key,
            limit_nanos=monthly_budget_nanos,
            period=Budget.Period.MONTHLY,
            enforcement=Budget.Enforcement.HARD,
            actor=actor,
        )
    return IssuedKey(key=key, plaintext=generated.plaintext)


@transaction.atomic
def virtual_key_revoke(*, key: VirtualKey, actor: Actor) -> VirtualKey:
    """Revoke `key` for good; every web process stops accepting it within a poll interval."""
    # Re-read under a row lock: two admins revoking at once change it once.
    key = VirtualKey.objects.select_for_update().select_related("org").get(pk=key.pk)
    if key.revoked_at is not None:
        return key
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at", "updated_at"])
    audit_record(
        actor=actor,
        org=key.org,
        action="virtual_key.revoke",
        target=key,
        before={"revoked_at": None},
        after={"revoked_at": key.revoked_at.isoformat()},
    )
    return key


@transaction.atomic
def budget_create(
    *,
    org: Organization,
    scope: str,
    limit_nanos: int,
    actor: Actor,
    period: str = Budget.Period.MONTHLY,
    team: Team | None = None,
    key: VirtualKey | None = None,
    enforcement: str = Budget.Enforcement.HARD,
    soft_thresholds: Sequence[int] = (50, 80, 100),
) -> Budget:
    """Create a budget on the org, one of its teams or one of its keys."""
    budget = Budget(
        org=org,
        scope=scope,
        team=team,
        key=key,
        period=period,
        limit_nanos=limit_nanos,
        enforcement=enforcement,
        soft_thresholds=list(soft_thresholds),
    )
    budget.full_clean()
    budget.save()
    audit_record(
        actor=actor,
        org=org,
        action="budget.create",
        target=budget,
        after={
            "scope": scope,
            "period": period,
            "limit_nanos": limit_nanos,
            "enforcement": enforcement,
            "soft_thresholds": list(soft_thresholds),
        },
    )
    return budget


# The settings an edit may change, as audit entries show them (never the hash).
_KEY_EDITABLE = ("name", "allowed_models", "allowed_ips", "rpm_limit", "tpm_limit", "expires_at")
_BUDGET_EDITABLE = ("period", "limit_nanos", "enforcement", "soft_thresholds")


def _audit_values(instance: models.Model, fields: Sequence[str]) -> dict[str, Any]:
    """The named fields as JSON-safe values for an audit entry."""
    values = {}
    for name in fields:
        value = getattr(instance, name)
        values[name] = value.isoformat() if isinstance(value, datetime) else value
    return values


def _changes(
    before: dict[str, Any], after: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the fields that changed, before and after."""
    changed = [name for name in after if before.get(name) != after[name]]
    return {n: before.get(n) for n in changed}, {n: after[n] for n in changed}


def _allowed_ips(values: Sequence[str]) -> list[str]:
    """The networks as stored (canonical CIDRs); ValidationError on `allowed_ips` otherwise."""
    if isinstance(values, str):
        raise ValidationError({"allowed_ips": "Give a list of IP addresses or networks."})
    try:
        return ip_allowlist_normalise(values)
    except ValueError as exc:
        raise ValidationError({"allowed_ips": str(exc)}) from None


def _locked_key(key: VirtualKey) -> VirtualKey:
    """The key re-read under a row lock; a revoked key cannot change any more."""
    key = VirtualKey.objects.select_for_update().select_related("org").get(pk=key.pk)
    if key.revoked_at is not None:
        raise ValidationError("This key is revoked; issue a new key instead.")
    return key


@transaction.atomic
def virtual_key_update(
    *,
    key: VirtualKey,
    actor: Actor,
    name: str,
    allowed_models: Sequence[str],
    rpm_limit: int | None,
    tpm_limit: int | None,
    expires_at: datetime | None,
    allowed_ips: Sequence[str] | None = None,
) -> VirtualKey:
    """Change a key's name, allowed models, rate limits, expiry and (unless None) IP
    allowlist; its secret stays."""
    ips = None if allowed_ips is None else _allowed_ips(allowed_ips)
    key = _locked_key(key)
    before = _audit_values(key, _KEY_EDITABLE)
    key.name = name
    key.allowed_models = sorted(set(allowed_models))
    if ips is not None:
        key.allowed_ips = ips
    key.rpm_limit = rpm_limit
    key.tpm_limit = tpm_limit
    key.expires_at = expires_at
    key.full_clean()
    old, new = _changes(before, _audit_values(key, _KEY_EDITABLE))
    if not new:
        return key
    key.save(update_fields=[*new, "updated_at"])
    audit_record(
        actor=actor, org=key.org, action="virtual_key.update", target=key, before=old, after=new
    )
    return key


@transaction.atomic
def virtual_key_rotate(*, key: VirtualKey, actor: Actor) -> IssuedKey:
    """Give the key a new secret (and prefix); the old secret stops working.

    The key record, its budgets and its usage history stay attached. Web processes
    stop accepting the old secret within a configuration poll interval.
    """
    key = _locked_key(key)
    old_prefix = key.prefix
    generated = generate_key()
    key.prefix = generated.prefix
    key.secret_hash = generated.secret_hash
    key.save(update_fields=["prefix", "secret_hash", "updated_at"])
    audit_record(
        actor=actor,
        org=key.org,
        action="virtual_key.rotate",
        target=key,
        before={"prefix": old_prefix},
        after={"prefix": key.prefix},
    )
    return IssuedKey(key=key, plaintext=generated.plaintext)


@transaction.atomic
def budget_update(
    *,
    budget: Budget,
    actor: Actor,
    period: str,
    limit_nanos: int,
    enforcement: str,
    soft_thresholds: Sequence[int],
) -> Budget:
    """Change a budget's period, limit, enforcement and alert thresholds.

    Its target (org, team or key) is fixed: counters and alerts already recorded
    belong to it. A new period starts counting from the ledger.
    """
    budget = Budget.objects.select_for_update().select_related("org").get(pk=budget.pk)
    before = _audit_values(budget, _BUDGET_EDITABLE)
    budget.period = period
    budget.limit_nanos = limit_nanos
    budget.enforcement = enforcement
    budget.soft_thresholds = list(soft_thresholds)
    budget.full_clean()
    old, new = _changes(before, _audit_values(budget, _BUDGET_EDITABLE))
    if not new:
        return budget
    budget.save(update_fields=[*new, "updated_at"])
    audit_record(
        actor=actor, org=budget.org, action="budget.update", target=budget, before=old, after=new
    )
    return budget


@transaction.atomic
def budget_delete(*, budget: Budget, actor: Actor) -> None:
    """Delete a budget: its limit stops applying to requests from the next snapshot."""
    budget = Budget.objects.select_related("org", "team", "key").get(pk=budget.pk)
    target = {"team": budget.team, "key": budget.key}.get(budget.scope)
    before = {
        "scope": budget.scope,
        "target": str(target) if target is not None else budget.org.slug,
        **_audit_values(budget, _BUDGET_EDITABLE),
    }
    # The entry names the budget by id; written first, while the row still exists.
    audit_record(actor=actor, org=budget.org, action="budget.delete", target=budget, before=before)
    budget.delete()
