"""Invitations, membership changes and org settings: the guards hold whoever calls them."""

import hashlib
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from tenants.members import (
    INVITATION_LIFETIME,
    InvitationUnusable,
    invitation_accept,
    invitation_by_token,
    invitation_create,
    invitation_revoke,
    invitation_sign_up,
    membership_change,
    membership_remove,
    organization_settings_update,
)
from tenants.models import AuditLog, ConfigRevision, Invitation, Membership, Organization
from tenants.services import Actor
from tests.factories import OrganizationFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db
Role = Membership.Role


def member(org: Organization, role: str, **fields: object) -> Membership:
    return Membership.objects.create(user=UserFactory(), org=org, role=role, **fields)


def as_actor(membership: Membership) -> Actor:
    return Actor(user=membership.user)


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(name="Acme")


@pytest.fixture
def owner(org: Organization) -> Membership:
    return member(org, Role.OWNER)


@pytest.fixture
def admin(org: Organization) -> Membership:
    return member(org, Role.ADMIN)


def test_an_invitation_stores_only_the_hash_of_its_token_and_expires_in_seven_days(
    org: Organization, admin: Membership
) -> None:
    team = TeamFactory(org=org)
    issued = invitation_create(
        org=org, role=Role.MEMBER, team=team, email="ada@example.com", actor=as_actor(admin)
    )
    invitation = Invitation.objects.get()
    assert invitation.token_hash == hashlib.sha256(issued.token.encode()).hexdigest()
    assert issued.token not in str(Invitation.objects.values().get())
    assert abs(invitation.expires_at - (timezone.now() + INVITATION_LIFETIME)) < timedelta(
        minutes=1
    )
    assert invitation.team == team and invitation.invited_by == admin.user
    entry = AuditLog.objects.get(action="invitation.create")
    assert entry.after["role"] == "member" and issued.token not in str(entry.after)
    assert invitation_by_token(issued.token) == invitation
    assert invitation_by_token(issued.token + "x") is None


def test_only_members_keep_the_team_of_their_invitation(
    org: Organization, owner: Membership
) -> None:
    team = TeamFactory(org=org)
    issued = invitation_create(org=org, role=Role.FINANCE, team=team, actor=as_actor(owner))
    assert issued.invitation.team is None
    with pytest.raises(ValidationError):
        invitation_create(
            org=org, role=Role.MEMBER, team=TeamFactory(), actor=as_actor(owner)
        )  # another org's team


def test_admins_cannot_invite_owners_and_finance_cannot_invite_at_all(
    org: Organization, owner: Membership, admin: Membership
) -> None:
    with pytest.raises(PermissionDenied):
        invitation_create(org=org, role=Role.OWNER, actor=as_actor(admin))
    with pytest.raises(PermissionDenied):
        invitation_create(org=org, role=Role.MEMBER, actor=as_actor(member(org, Role.FINANCE)))
    assert invitation_create(org=org, role=Role.OWNER, actor=as_actor(owner)).token
    assert Invitation.objects.count() == 1


def test_an_invitation_works_once(org: Organization, admin: Membership) -> None:
    issued = invitation_create(org=org, role=Role.FINANCE, actor=as_actor(admin))
    user = UserFactory()
    acceptance = invitation_accept(invitation=issued.invitation, user=user, actor=Actor(user=user))
    assert acceptance.joined and acceptance.membership.role == Role.FINANCE
    assert Membership.objects.get(user=user, org=org).role == Role.FINANCE
    with pytest.raises(InvitationUnusable):
        invitation_accept(invitation=issued.invitation, user=UserFactory(), actor=Actor())
    assert Membership.objects.filter(org=org).count() == 2
    entry = AuditLog.objects.get(action="invitation.accept")
    assert entry.after == {
        "user": user.username,
        "role": "finance",
        "team": None,
        "already_member": False,
    }


def test_an_existing_member_accepting_keeps_their_role_without_a_duplicate(
    org: Organization, owner: Membership, admin: Membership
) -> None:
    issued = invitation_create(org=org, role=Role.MEMBER, actor=as_actor(owner))
    acceptance = invitation_accept(
        invitation=issued.invitation, user=admin.user, actor=as_actor(admin)
    )
    assert not acceptance.joined
    assert Membership.objects.get(user=admin.user, org=org).role == Role.ADMIN
    assert Membership.objects.filter(user=admin.user).count() == 1


def test_revoked_and_expired_invitations_cannot_be_accepted(
    org: Organization, admin: Membership
) -> None:
    revoked = invitation_create(org=org, role=Role.MEMBER, actor=as_actor(admin)).invitation
    invitation_revoke(invitation=revoked, actor=as_actor(admin))
    expired = invitation_create(org=org, role=Role.MEMBER, actor=as_actor(admin)).invitation
    Invitation.objects.filter(pk=expired.pk).update(expires_at=timezone.now())
    for invitation in (revoked, expired):
        with pytest.raises(InvitationUnusable):
            invitation_accept(invitation=invitation, user=UserFactory(), actor=Actor())
    assert not Invitation.objects.pending().exists()
    assert AuditLog.objects.get(action="invitation.revoke").after == {"status": "revoked"}


def test_signing_up_with_a_used_invitation_leaves_no_account_behind(
    org: Organization, admin: Membership
) -> None:
    invitation = invitation_create(org=org, role=Role.MEMBER, actor=as_actor(admin)).invitation
    invitation_accept(invitation=invitation, user=UserFactory(), actor=Actor())
    with pytest.raises(InvitationUnusable):
        invitation_sign_up(
            invitation=invitation, username="late", password="a long passphrase", actor=Actor()
        )
    assert not get_user_model().objects.filter(username="late").exists()


def test_admins_cannot_touch_owners_or_make_anyone_owner(
    org: Organization, owner: Membership, admin: Membership
) -> None:
    plain = member(org, Role.MEMBER)
    with pytest.raises(PermissionDenied):
        membership_change(membership=owner, role=Role.ADMIN, actor=as_actor(admin))
    with pytest.raises(PermissionDenied):
        membership_remove(membership=owner, actor=as_actor(admin))
    with pytest.raises(PermissionDenied):
        membership_change(membership=plain, role=Role.OWNER, actor=as_actor(admin))
    membership_change(membership=plain, role=Role.FINANCE, actor=as_actor(admin))
    owner.refresh_from_db()
    plain.refresh_from_db()
    assert owner.role == Role.OWNER and plain.role == Role.FINANCE
    entry = AuditLog.objects.get(action="membership.change")
    assert entry.before["role"] == "member" and entry.after["role"] == "finance"


def test_nobody_changes_their_own_role(org: Organization, owner: Membership) -> None:
    member(org, Role.OWNER)
    with pytest.raises(PermissionDenied):
        membership_change(membership=owner, role=Role.ADMIN, actor=as_actor(owner))
    with pytest.raises(PermissionDenied):
        membership_remove(membership=owner, actor=as_actor(owner))
    with pytest.raises(PermissionDenied):  # finance manages nobody
        membership_remove(
            membership=member(org, Role.MEMBER), actor=as_actor(member(org, Role.FINANCE))
        )


def test_another_owner_may_demote_or_remove_an_owner(org: Organization, owner: Membership) -> None:
    second, third = member(org, Role.OWNER), member(org, Role.OWNER)
    membership_change(membership=owner, role=Role.ADMIN, actor=as_actor(second))
    membership_remove(membership=third, actor=as_actor(second))
    assert list(Membership.objects.filter(org=org, role=Role.OWNER)) == [second]
    # A tool without a user (the CLI, a seed) acts with an owner's rights.
    membership_change(membership=owner, role=Role.OWNER, actor=Actor(label="cli"))
    assert Membership.objects.filter(org=org, role=Role.OWNER).count() == 2


def test_the_last_owner_is_never_demoted_or_removed(
    org: Organization, owner: Membership, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two owners demoting each other at once: each read the other as an owner before
    # either change landed. The second change finds one owner left, under the lock.
    ex_owner = member(org, Role.ADMIN)
    monkeypatch.setattr("tenants.members._role_of", lambda actor, org: Role.OWNER)
    with pytest.raises(ValidationError, match="at least one owner"):
        membership_change(membership=owner, role=Role.ADMIN, actor=as_actor(ex_owner))
    with pytest.raises(ValidationError, match="at least one owner"):
        membership_remove(membership=owner, actor=as_actor(ex_owner))
    owner.refresh_from_db()
    assert owner.role == Role.OWNER
    assert not AuditLog.objects.filter(action__startswith="membership.").exists()


def test_org_settings_changes_are_audited_and_reach_the_proxy(
    org: Organization, django_capture_on_commit_callbacks
) -> None:
    ConfigRevision.objects.get_or_create(pk=1)
    token_before = ConfigRevision.objects.get(pk=1).token
    with django_capture_on_commit_callbacks(execute=True):
        organization_settings_update(
            org=org,
            name="Acme Corp",
            time_zone="Europe/Berlin",
            log_request_bodies=True,
            actor=Actor(label="tests"),
        )
    org.refresh_from_db()
    assert (org.name, org.time_zone, org.log_request_bodies) == ("Acme Corp", "Europe/Berlin", True)
    assert ConfigRevision.objects.get(pk=1).token != token_before
    entry = AuditLog.objects.get(action="organization.update")
    assert entry.before == {"name": "Acme", "time_zone": "UTC", "log_request_bodies": False}
    assert entry.after == {
        "name": "Acme Corp",
        "time_zone": "Europe/Berlin",
        "log_request_bodies": True,
    }
    with pytest.raises(ValidationError):
        organization_settings_update(
            org=org, name="Acme", time_zone="Mars/Olympus", log_request_bodies=False,
            actor=Actor(label="tests"),
        )  # fmt: skip
    org.refresh_from_db()
    assert org.time_zone == "Europe/Berlin"
