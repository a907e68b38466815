"""Who belongs to an organization: invitations, role and team changes, removal,
and the organization's own settings.

Guards live here, not in views, so every interface gets them: only owners make
or touch owners, nobody changes their own role, and an organization always
keeps at least one owner (checked under row locks, so two owners demoting each
other at once cannot both succeed).
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.utils import timezone

from tenants.models import Invitation, Membership, Organization, Team
from tenants.selectors import one_line
from tenants.services import Actor, audit_record

Role = Membership.Role
INVITATION_LIFETIME = timedelta(days=7)


class InvitationUnusable(Exception):
    """The invitation was used, revoked or has expired (or never existed)."""


def _role_of(actor: Actor, org: Organization) -> str | None:
    """The actor's role in `org`. A tool without a user acts with its own role (an API
    token: at most admin), else (the CLI, a seed) as an owner."""
    if actor.user is None or not actor.user.pk:
        return actor.role or Role.OWNER
    return (
        Membership.objects.filter(org=org, user=actor.user).values_list("role", flat=True).first()
    )


def _grantable_roles(actor_role: str | None) -> set[str]:
    """Roles `actor_role` may give: owners any; admins any but owner; others none."""
    if actor_role == Role.OWNER:
        return set(Role.values)
    if actor_role == Role.ADMIN:
        return set(Role.values) - {Role.OWNER}
    return set()


def _team_for(role: str, team: Team | None, org: Organization) -> Team | None:
    """Only members belong to a team (it limits what they see); others get none."""
    if role != Role.MEMBER or team is None:
        return None
    if team.org_id != org.pk:
        raise ValidationError({"team": "The team belongs to another organization."})
    return team


# ---------------------------------------------------------------- organization


ORG_SETTINGS_FIELDS = ("name", "time_zone", "log_request_bodies")


@transaction.atomic
def organization_settings_update(
    *, org: Organization, name: str, time_zone: str, log_request_bodies: bool, actor: Actor
) -> Organization:
    """Change the org's name, time zone and body logging; audited with before and after.

    Saving the organization bumps the configuration revision (tenants/signals.py),
    so every proxy process picks the change up within a poll interval.
    """
    org = Organization.objects.select_for_update().get(pk=org.pk)
    before = {field: getattr(org, field) for field in ORG_SETTINGS_FIELDS}
    org.name, org.time_zone, org.log_request_bodies = name, time_zone, log_request_bodies
    org.full_clean()
    after = {field: getattr(org, field) for field in ORG_SETTINGS_FIELDS}
    if after == before:
        return org
    org.save(update_fields=[*ORG_SETTINGS_FIELDS, "updated_at"])
    changed = [field for field in ORG_SETTINGS_FIELDS if before[field] != after[field]]
    audit_record(
        actor=actor,
        org=org,
        action="organization.update",
        target=org,
        before={field: before[field] for field in changed},
        after={field: after[field] for field in changed},
    )
    return org


# ---------------------------------------------------------------- invitations


def invitation_token_hash(token: str) -> str:
    """What is stored for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedInvitation:
    invitation: Invitation
    token: str  # goes into the link shown once; only its hash is stored


def _invitation_facts(invitation: Invitation) -> dict[str, Any]:
    return {
        "email": invitation.email,
        "role": invitation.role,
        "team": invitation.team.slug if invitation.team else None,
        "expires_at": invitation.expires_at.isoformat(),
    }


@transaction.atomic
def invitation_create(
    *, org: Organization, role: str, actor: Actor, email: str = "", team: Team | None = None
) -> IssuedInvitation:
    """Create a single-use invitation valid for 7 days; the token is returned here only.

    Raises PermissionDenied when the actor may not grant `role` (admins cannot invite owners).
    """
    if role not in _grantable_roles(_role_of(actor, org)):
        raise PermissionDenied("Only owners can invite owners.")
    token = secrets.token_urlsafe(32)
    invitation = Invitation(
        org=org,
        email=email.strip(),
        role=role,
        team=_team_for(role, team, org),
        token_hash=invitation_token_hash(token),
        invited_by=actor.user if actor.user is not None and actor.user.pk else None,
        expires_at=timezone.now() + INVITATION_LIFETIME,
    )
    invitation.full_clean()
    invitation.save()
    audit_record(
        actor=actor,
        org=org,
        action="invitation.create",
        target=invitation,
        after=_invitation_facts(invitation),
    )
    return IssuedInvitation(invitation=invitation, token=token)


def invitation_email_send(*, invitation: Invitation, link: str) -> bool:
    """E-mail the accept link to the invitation's address; False if there is none or it failed."""
    if not invitation.email:
        return False
    inviter = invitation.invited_by.get_username() if invitation.invited_by else "An admin"
    subject = one_line(f"[Tollgate] You are invited to {invitation.org.name}")
    body = (
        f"{inviter} invited you to join {invitation.org.name} on Tollgate as "
        f"{invitation.get_role_display().lower()}.\n\n"
        f"Open this link to accept (it works once, until "
        f"{invitation.expires_at:%Y-%m-%d %H:%M} UTC):\n{link}\n"
    )
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [invitation.email])
    except Exception:  # SMTP down or misconfigured: the link is still shown to the admin
        return False
    return True


def invitation_by_token(token: str) -> Invitation | None:
    """The invitation a link's token belongs to, whatever its status; None if unknown."""
    if not token or len(token) > 200:
        return None
    return (
        Invitation.objects.select_related("org", "team")
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )


@dataclass(frozen=True, slots=True)
class Acceptance:
    membership: Membership
    # False when the user was a member already: nothing about their membership changed.
    joined: bool


def _accept(invitation: Invitation, user: AbstractBaseUser, actor: Actor) -> Acceptance:
    # Lock the row: of two people opening the same link at once, one gets in.
    invitation = (
        Invitation.objects.select_for_update(of=("self",))
        .select_related("org", "team")
        .get(pk=invitation.pk)
    )
    if invitation.status != Invitation.Status.PENDING:
        raise InvitationUnusable
    existing = Membership.objects.filter(org=invitation.org, user=user).first()
    invitation.accepted_at, invitation.accepted_by = timezone.now(), user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    if existing is not None:
        membership, joined = existing, False
    else:
        membership = Membership.objects.create(
            org=invitation.org, user=user, role=invitation.role, team=invitation.team
        )
        joined = True
    audit_record(
        actor=actor,
        org=invitation.org,
        action="invitation.accept",
        target=invitation,
        after={
            "user": user.get_username(),
            "role": membership.role,
            "team": membership.team.slug if membership.team else None,
            "already_member": not joined,
        },
    )
    return Acceptance(membership=membership, joined=joined)


@transaction.atomic
def invitation_accept(
    *, invitation: Invitation, user: AbstractBaseUser, actor: Actor
) -> Acceptance:
    """Make `user` a member as invited; the invitation is used up either way.

    A user who is a member already keeps their role (no duplicate membership).
    Raises InvitationUnusable if it was used, revoked or expired meanwhile.
    """
    return _accept(invitation, user, actor)


@transaction.atomic
def invitation_sign_up(
    *, invitation: Invitation, username: str, password: str, actor: Actor
) -> Acceptance:
    """Create an account (password already validated) and accept the invitation with it.

    One transaction: if the invitation is no longer usable, no account is left behind.
    """
    user = get_user_model().objects.create_user(
        username=username, email=invitation.email, password=password
    )
    return _accept(invitation, user, Actor(user=user, ip_address=actor.ip_address))


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: Actor) -> Invitation:
    """Revoke a pending invitation so its link stops working; no-op if it is not pending."""
    invitation = (
        Invitation.objects.select_for_update(of=("self",))
        .select_related("org")
        .get(pk=invitation.pk)
    )
    if invitation.status != Invitation.Status.PENDING:
        return invitation
    if invitation.role not in _grantable_roles(_role_of(actor, invitation.org)):
        raise PermissionDenied("Only owners can revoke an invitation for an owner.")
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        org=invitation.org,
        action="invitation.revoke",
        target=invitation,
        before={"status": Invitation.Status.PENDING.value},
        after={"status": Invitation.Status.REVOKED.value},
    )
    return invitation


# ---------------------------------------------------------------- members


def _guard_change(membership: Membership, actor: Actor, new_role: str | None) -> None:
    """PermissionDenied unless `actor` may change (new_role given) or remove `membership`."""
    actor_role = _role_of(actor, membership.org)
    grantable = _grantable_roles(actor_role)
    if not grantable:
        raise PermissionDenied("Only owners and admins manage members.")
    if actor.user is not None and membership.user_id == actor.user.pk:
        raise PermissionDenied("You cannot change your own membership; ask another owner.")
    if membership.role not in grantable:
        raise PermissionDenied("Only owners can change or remove an owner.")
    if new_role is not None and new_role not in grantable:
        raise PermissionDenied("Only owners can make someone an owner.")


def _guard_last_owner(membership: Membership) -> None:
    """ValidationError if `membership` is the org's last owner (owner rows locked first)."""
    owners = list(
        Membership.objects.select_for_update()
        .filter(org_id=membership.org_id, role=Role.OWNER)
        .values_list("pk", flat=True)
    )
    if owners == [membership.pk]:
        raise ValidationError(
            "An organization needs at least one owner: make someone else owner first."
        )


@transaction.atomic
def membership_change(
    *, membership: Membership, role: str, actor: Actor, team: Team | None = None
) -> Membership:
    """Change a member's role and team, within the guards; audited with before and after."""
    membership = (
        Membership.objects.select_for_update(of=("self",)).select_related("org", "team", "user")
        .get(pk=membership.pk)
    )  # fmt: skip
    if role not in Role.values:
        raise ValidationError({"role": "Choose a role."})
    _guard_change(membership, actor, role)
    team = _team_for(role, team, membership.org)
    before = {"role": membership.role, "team": membership.team.slug if membership.team else None}
    after = {"role": role, "team": team.slug if team else None}
    if before == after:
        return membership
    if membership.role == Role.OWNER and role != Role.OWNER:
        _guard_last_owner(membership)
    membership.role, membership.team = role, team
    membership.full_clean()
    membership.save(update_fields=["role", "team"])
    audit_record(
        actor=actor,
        org=membership.org,
        action="membership.change",
        target=membership,
        before={"user": membership.user.get_username(), **before},
        after={"user": membership.user.get_username(), **after},
    )
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: Actor) -> None:
    """Remove someone from the organization, within the guards; audited."""
    membership = (
        Membership.objects.select_for_update(of=("self",)).select_related("org", "team", "user")
        .get(pk=membership.pk)
    )  # fmt: skip
    _guard_change(membership, actor, None)
    if membership.role == Role.OWNER:
        _guard_last_owner(membership)
    facts = {
        "user": membership.user.get_username(),
        "role": membership.role,
        "team": membership.team.slug if membership.team else None,
    }
    audit_record(
        actor=actor, org=membership.org, action="membership.remove", target=membership, before=facts
    )
    membership.delete()
