"""Dashboard sign-in and sign-out, and accepting invitation links."""

import time
import types
import uuid
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from tenants.members import invitation_create, invitation_revoke
from tenants.models import AuditLog, Invitation, Membership, Organization
from tenants.services import Actor
from tests.factories import OrganizationFactory, TeamFactory, UserFactory

# Every test counts its own sign-in and invitation POSTs (all come from 127.0.0.1).
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("limiter_clock")]
Role = Membership.Role
PASSWORD = "correct horse battery staple"
SIGN_IN = "/dashboard/sign-in/"


@pytest.fixture
def limiter_clock(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    """django-ratelimit's clock held still and counts of this test's own (see test_brute_force)."""
    frozen = time.time()
    monkeypatch.setattr("django_ratelimit.core.time", types.SimpleNamespace(time=lambda: frozen))
    settings.RATELIMIT_CACHE_PREFIX = f"rl:{uuid.uuid4().hex}:"


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(name="Acme Rockets")


@pytest.fixture
def owner(org: Organization) -> Membership:
    return Membership.objects.create(user=UserFactory(), org=org, role=Role.OWNER)


def invite(org: Organization, owner: Membership, role: str = Role.MEMBER, **fields: Any) -> str:
    """A new invitation's link path."""
    issued = invitation_create(org=org, role=role, actor=Actor(user=owner.user), **fields)
    return reverse("dashboard:invite_accept", args=[issued.token])


# ---------------------------------------------------------------- sign-in


def test_the_sign_in_page_has_labelled_fields_and_a_sign_in_button() -> None:
    page = Client().get(SIGN_IN).content.decode()
    assert '<label for="id_username">Username</label>' in page
    assert '<label for="id_password">Password</label>' in page
    assert ">Sign in</button>" in page


def test_any_member_signs_in_and_lands_where_they_were_going(org: Organization) -> None:
    user = UserFactory(username="grace")  # not staff: the admin's login would refuse her
    Membership.objects.create(user=user, org=org, role=Role.MEMBER)
    client = Client()
    response = client.post(
        f"{SIGN_IN}?next=/dashboard/keys/", {"username": "grace", "password": PASSWORD}
    )
    assert response.status_code == 302 and response["location"] == "/dashboard/keys/"
    assert client.get(reverse("dashboard:overview")).status_code == 200


def test_sign_in_ignores_a_next_on_another_site() -> None:
    UserFactory(username="grace")
    client = Client()
    response = client.post(
        SIGN_IN, {"username": "grace", "password": PASSWORD, "next": "https://evil.example/"}
    )
    assert response.status_code == 302 and response["location"] == reverse("dashboard:overview")


def test_a_wrong_password_is_refused_without_saying_which_part_was_wrong() -> None:
    UserFactory(username="grace")
    response = Client().post(SIGN_IN, {"username": "grace", "password": "nope"})
    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()


def test_signing_in_rotates_the_session_and_signing_out_ends_it(org: Organization) -> None:
    user = UserFactory(username="grace")
    Membership.objects.create(user=user, org=org, role=Role.MEMBER)
    client = Client()
    client.get(SIGN_IN)
    client.session["probe"] = 1  # a session before signing in
    before = client.cookies.get("sessionid")
    client.post(SIGN_IN, {"username": "grace", "password": PASSWORD})
    assert client.cookies["sessionid"].value != (before.value if before else None)
    assert client.get(reverse("dashboard:sign_out")).status_code == 405  # POST only
    response = client.post(reverse("dashboard:sign_out"))
    assert response.status_code == 302 and response["location"] == SIGN_IN
    assert "_auth_user_id" not in client.session
    assert client.get(reverse("dashboard:overview")).status_code == 302


def test_the_eleventh_dashboard_sign_in_attempt_in_a_minute_is_refused() -> None:
    UserFactory(username="grace")
    client, address = Client(), f"10.9.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"
    for _ in range(10):
        wrong = client.post(SIGN_IN, {"username": "grace", "password": "x"}, REMOTE_ADDR=address)
        assert wrong.status_code == 200
    refused = client.post(SIGN_IN, {"username": "grace", "password": PASSWORD}, REMOTE_ADDR=address)
    assert refused.status_code == 429 and refused["Retry-After"] == "60"
    assert "_auth_user_id" not in client.session


# ---------------------------------------------------------------- invitations


def test_a_visitor_creates_an_account_and_joins(org: Organization, owner: Membership) -> None:
    team = TeamFactory(org=org, name="Search")
    link = invite(org, owner, team=team, email="ada@example.com")
    client = Client()
    page = client.get(link).content.decode()
    assert "Acme Rockets" in page and "Member" in page and "Search" in page
    response = client.post(
        link,
        {"username": "ada", "password1": "a long passphrase", "password2": "a long passphrase"},
    )
    assert response.status_code == 302
    assert response["location"] == f"{reverse('dashboard:overview')}?org={org.slug}"
    user = get_user_model().objects.get(username="ada")
    assert user.email == "ada@example.com" and user.check_password("a long passphrase")
    membership = Membership.objects.get(user=user, org=org)
    assert membership.role == Role.MEMBER and membership.team == team
    assert client.session["_auth_user_id"] == str(user.pk)  # signed in
    assert "Welcome to Acme Rockets" in client.get(response["location"]).content.decode()
    assert AuditLog.objects.filter(action="invitation.accept", actor=user).exists()
    # The link is used up: nobody else gets in with it.
    assert Client().get(link).status_code == 410


def test_weak_or_mismatched_passwords_create_no_account(
    org: Organization, owner: Membership
) -> None:
    link = invite(org, owner)
    for password1, password2 in [("12345678", "12345678"), ("a long passphrase", "different")]:
        response = Client().post(
            link, {"username": "ada", "password1": password1, "password2": password2}
        )
        assert response.status_code == 200 and 'class="errorlist"' in response.content.decode()
    assert not get_user_model().objects.filter(username="ada").exists()
    assert Invitation.objects.get().accepted_at is None


def test_a_signed_in_user_accepts_into_their_account(org: Organization, owner: Membership) -> None:
    link = invite(org, owner, role=Role.FINANCE)
    user = UserFactory(username="lin")
    client = Client()
    client.force_login(user)
    page = client.get(link).content.decode()
    assert "signed in as <strong>lin</strong>" in page and "Accept invitation" in page
    assert client.post(link).status_code == 302
    assert Membership.objects.get(user=user, org=org).role == Role.FINANCE


def test_an_anonymous_visitor_can_sign_in_first_and_come_back(
    org: Organization, owner: Membership
) -> None:
    link = invite(org, owner)
    UserFactory(username="lin")
    client = Client()
    assert f"{SIGN_IN}?{urlencode({'next': link})}" in client.get(link).content.decode()
    response = client.post(
        f"{SIGN_IN}?next={link}", {"username": "lin", "password": PASSWORD, "next": link}
    )
    assert response["location"] == link


def test_accepting_when_already_a_member_changes_nothing_and_says_so(
    org: Organization, owner: Membership
) -> None:
    link = invite(org, owner, role=Role.MEMBER)
    admin = Membership.objects.create(user=UserFactory(), org=org, role=Role.ADMIN)
    client = Client()
    client.force_login(admin.user)
    response = client.post(link, follow=True)
    assert "already a member of Acme Rockets" in response.content.decode()
    assert Membership.objects.get(user=admin.user, org=org).role == Role.ADMIN
    assert Membership.objects.filter(user=admin.user).count() == 1


def test_unknown_used_revoked_and_expired_links_say_so_without_details(
    org: Organization, owner: Membership
) -> None:
    unknown = Client().get(reverse("dashboard:invite_accept", args=["no-such-token"]))
    assert unknown.status_code == 404 and b"not valid" in unknown.content
    revoked = invite(org, owner)
    invitation_revoke(invitation=Invitation.objects.get(), actor=Actor(user=owner.user))
    expired = invite(org, owner)
    Invitation.objects.filter(revoked_at__isnull=True).update(expires_at=timezone.now())
    for link in (revoked, expired):
        for response in (Client().get(link), Client().post(link, {"username": "x"})):
            assert response.status_code == 410
            assert b"no longer be used" in response.content
            assert b"Acme Rockets" not in response.content
    assert not get_user_model().objects.filter(username="x").exists()
