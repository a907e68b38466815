"""Members and invitations over the management API: guards, org scope, roles, links."""

import pytest
from django.core import mail
from django.urls import reverse

from tenants.members import invitation_by_token, invitation_create
from tenants.models import AuditLog, Invitation, Membership
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.api import token_client
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db
Role = Membership.Role


def member_of(org, role: str = "member", **fields) -> Membership:
    return Membership.objects.create(user=UserFactory(), org=org, role=role, **fields)


def test_members_are_listed_with_their_user_role_and_team(org, team) -> None:
    ann = member_of(org, "owner")
    bob = member_of(org, "member", team=team)
    member_of(OrganizationFactory(), "admin")

    listed = token_client(org, "read_only").get("/api/v1/members/")

    assert listed.status_code == 200
    rows = {row["id"]: row for row in listed.json()["data"]}
    assert set(rows) == {ann.pk, bob.pk}
    assert rows[bob.pk] == {
        "id": bob.pk, "user": bob.user_id, "username": bob.user.username,
        "email": bob.user.email, "role": "member", "team": team.pk,
        "created_at": rows[bob.pk]["created_at"],
    }  # fmt: skip


def test_an_admin_token_changes_a_members_role_and_team(org, team) -> None:
    bob = member_of(org, "finance")
    client = token_client(org)
    etag = client.get(f"/api/v1/members/{bob.pk}/")["ETag"]

    changed = client.patch(
        f"/api/v1/members/{bob.pk}/",
        {"role": "member", "team": team.pk},
        format="json",
        HTTP_IF_MATCH=etag,
    )

    assert changed.status_code == 200, changed.json()
    assert (changed.json()["role"], changed.json()["team"]) == ("member", team.pk)
    assert changed["ETag"] != etag
    stale = client.patch(
        f"/api/v1/members/{bob.pk}/", {"role": "admin"}, format="json", HTTP_IF_MATCH=etag
    )
    assert stale.status_code == 412
    bob.refresh_from_db()
    assert (bob.role, bob.team) == ("member", team)
    entry = AuditLog.objects.get(org=org, action="membership.change")
    assert entry.actor_label.startswith("api token tgm_")
    assert entry.after["role"] == "member"


def test_an_admin_token_acts_as_an_admin_not_an_owner(org) -> None:
    owner = member_of(org, "owner")
    bob = member_of(org, "member")
    client = token_client(org)

    refusals = [
        client.patch(f"/api/v1/members/{bob.pk}/", {"role": "owner"}, format="json"),
        client.patch(f"/api/v1/members/{owner.pk}/", {"role": "admin"}, format="json"),
        client.delete(f"/api/v1/members/{owner.pk}/"),
        client.post("/api/v1/invitations/", {"role": "owner"}, format="json"),
    ]

    for response in refusals:
        assert response.status_code == 403
        assert "Only owners" in response.json()["error"]["message"]
    assert Membership.objects.get(pk=owner.pk).role == "owner"
    assert Membership.objects.get(pk=bob.pk).role == "member"
    assert not Invitation.objects.exists()
    owner_invitation = invitation_create(org=org, role="owner", actor=TEST_ACTOR).invitation
    assert client.delete(f"/api/v1/invitations/{owner_invitation.pk}/").status_code == 403
    assert Invitation.objects.get(pk=owner_invitation.pk).revoked_at is None


def test_a_signed_in_owner_may_make_an_owner_and_nobody_changes_themselves(org) -> None:
    owner_client = signed_in_as("owner", org, username="olga")
    bob = member_of(org, "admin")

    promoted = owner_client.patch(
        f"/api/v1/members/{bob.pk}/?org={org.slug}",
        {"role": "owner"},
        content_type="application/json",
    )

    assert promoted.status_code == 200, promoted.json()
    olga = Membership.objects.get(org=org, user__username="olga")
    own = owner_client.delete(f"/api/v1/members/{olga.pk}/?org={org.slug}")
    assert own.status_code == 403
    assert "your own membership" in own.json()["error"]["message"]
    assert Membership.objects.filter(pk=olga.pk).exists()


def test_an_admin_token_removes_a_member(org) -> None:
    bob = member_of(org, "finance")
    client = token_client(org)
    assert client.delete(f"/api/v1/members/{bob.pk}/").status_code == 204
    assert not Membership.objects.filter(pk=bob.pk).exists()
    assert AuditLog.objects.filter(org=org, action="membership.remove").count() == 1


def test_a_team_must_be_this_orgs_and_is_only_for_members(org, team) -> None:
    bob = member_of(org, "member")
    foreign_team = TeamFactory(org=OrganizationFactory())
    client = token_client(org)

    for body in (
        {"team": foreign_team.pk},
        {"team": "x"},
        {"team": 2**70},
        {"role": "admin", "team": team.pk},
    ):
        response = client.patch(f"/api/v1/members/{bob.pk}/", body, format="json")
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == "team"
    unknown_role = client.patch(f"/api/v1/members/{bob.pk}/", {"role": "god"}, format="json")
    assert unknown_role.json()["error"]["param"] == "role"
    invited = client.post(
        "/api/v1/invitations/", {"role": "member", "team": foreign_team.pk}, format="json"
    )
    assert invited.status_code == 400 and invited.json()["error"]["param"] == "team"
    bob.refresh_from_db()
    assert (bob.role, bob.team) == ("member", None)
    assert not Invitation.objects.exists()


def test_an_invitation_shows_its_link_once_and_emails_it(org, team) -> None:
    client = token_client(org)

    created = client.post(
        "/api/v1/invitations/",
        {"email": "new@example.com", "role": "member", "team": team.pk},
        format="json",
    )

    assert created.status_code == 201, created.json()
    body = created.json()
    token = body["accept_url"].rstrip("/").rsplit("/", 1)[1]
    assert body["accept_url"] == reverse("dashboard:invite_accept", args=[token])
    assert invitation_by_token(token).pk == body["id"]
    assert (body["role"], body["team"], body["status"]) == ("member", team.pk, "pending")
    assert body["emailed"] is True and created["Cache-Control"] == "no-store"
    assert mail.outbox[0].to == ["new@example.com"]
    assert f"http://testserver{body['accept_url']}" in mail.outbox[0].body
    for later in (
        client.get("/api/v1/invitations/"),
        client.get(f"/api/v1/invitations/{body['id']}/"),
    ):
        assert later.status_code == 200
        assert token not in later.content.decode() and "accept_url" not in later.content.decode()
    assert client.get(body["accept_url"]).status_code == 200  # the link works


def test_pending_invitations_are_listed_and_a_revoked_one_drops_out(org) -> None:
    client = token_client(org)
    keep = invitation_create(org=org, role="finance", actor=TEST_ACTOR).invitation
    drop = invitation_create(org=org, role="member", actor=TEST_ACTOR).invitation
    invitation_create(org=OrganizationFactory(), role="member", actor=TEST_ACTOR)

    assert client.delete(f"/api/v1/invitations/{drop.pk}/").status_code == 204
    assert client.delete(f"/api/v1/invitations/{drop.pk}/").status_code == 204  # idempotent

    listed = client.get("/api/v1/invitations/").json()
    assert [row["id"] for row in listed["data"]] == [keep.pk]
    assert client.get(f"/api/v1/invitations/{drop.pk}/").status_code == 404
    assert Invitation.objects.get(pk=drop.pk).status == "revoked"
    assert AuditLog.objects.filter(org=org, action="invitation.revoke").count() == 1


def test_another_orgs_member_and_invitation_are_404_for_every_method(org) -> None:
    other_org = OrganizationFactory()
    theirs = member_of(other_org, "admin")
    invitation = invitation_create(org=other_org, role="member", actor=TEST_ACTOR).invitation
    client = token_client(org)

    for method in ("get", "patch", "delete"):
        response = getattr(client, method)(
            f"/api/v1/members/{theirs.pk}/", {"role": "member"}, format="json"
        )
        assert response.status_code == 404, method
    for method in ("get", "delete"):
        assert getattr(client, method)(f"/api/v1/invitations/{invitation.pk}/").status_code == 404
    assert Membership.objects.get(pk=theirs.pk).role == "admin"
    assert Invitation.objects.get(pk=invitation.pk).revoked_at is None


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_read_members_but_change_nothing(org, role) -> None:
    bob = member_of(org, "member")
    invitation = invitation_create(org=org, role="member", actor=TEST_ACTOR).invitation
    client = token_client(org, role)
    assert client.get("/api/v1/members/").status_code == 200
    assert client.get("/api/v1/invitations/").status_code == 200

    for response in (
        client.patch(f"/api/v1/members/{bob.pk}/", {"role": "admin"}, format="json"),
        client.delete(f"/api/v1/members/{bob.pk}/"),
        client.post("/api/v1/invitations/", {"role": "member"}, format="json"),
        client.delete(f"/api/v1/invitations/{invitation.pk}/"),
    ):
        assert response.status_code == 403
    assert Membership.objects.get(pk=bob.pk).role == "member"
    assert Invitation.objects.pending().count() == 1
