"""The settings page: organization, members, invitations and alert channels."""

from typing import Any

import pytest
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import Alert, AlertChannel, AlertDelivery
from tenants.members import invitation_create, invitation_token_hash
from tenants.models import AuditLog, Invitation, Membership, Organization
from tenants.services import Actor
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.dashboard import signed_in_as
from tests.support.webhooks import webhook_receiver

pytestmark = pytest.mark.django_db
Role = Membership.Role


@pytest.fixture
def org() -> Organization:
    return OrganizationFactory(name="Acme")


def url(org: Organization, name: str, *args: object) -> str:
    return f"{reverse(f'dashboard:{name}', args=args)}?org={org.slug}"


def member_of(org: Organization, role: str, **fields: Any) -> Membership:
    return Membership.objects.create(user=UserFactory(), org=org, role=role, **fields)


def webhook(org: Organization, address: str = "https://hooks.example.com/t/abc") -> AlertChannel:
    channel = AlertChannel(org=org, name="ops", kind=AlertChannel.Kind.WEBHOOK, url=address)
    channel.set_secret("whsec_test")
    channel.save()
    return channel


# ---------------------------------------------------------------- access


@pytest.mark.parametrize(
    ("role", "status"), [("owner", 200), ("admin", 200), ("finance", 403), ("member", 403)]
)
def test_settings_are_for_owners_and_admins(org: Organization, role: str, status: int) -> None:
    response = signed_in_as(role, org).get(url(org, "settings"))
    assert response.status_code == status
    if status == 200:
        page = response.content.decode()
        for heading in ("Organization", "Members", "Invitations", "Alert channels"):
            assert f">{heading}</h2>" in page


def test_the_settings_page_costs_the_same_queries_however_many_rows(org: Organization) -> None:
    client = signed_in_as("owner", org)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url(org, "settings")).status_code == 200
        return len(captured)

    def add_rows() -> None:
        member_of(org, Role.MEMBER, team=TeamFactory(org=org))
        webhook(org)
        invitation_create(org=org, role=Role.MEMBER, actor=Actor(label="tests"))

    add_rows()
    few = queries()
    for _ in range(5):
        add_rows()
    assert queries() == few <= 10


def test_another_orgs_objects_are_not_found(org: Organization) -> None:
    other = OrganizationFactory()
    theirs = member_of(other, Role.MEMBER)
    channel = webhook(other)
    invitation = invitation_create(org=other, role=Role.MEMBER, actor=Actor()).invitation
    client = signed_in_as("owner", org)
    posts = [
        url(org, "settings_member", theirs.pk),
        url(org, "settings_member_remove", theirs.pk),
        url(org, "settings_invitation_revoke", invitation.pk),
        url(org, "settings_channel_enable", channel.pk),
        url(org, "settings_channel_delete", channel.pk),
        url(org, "settings_channel_rotate", channel.pk),
        url(org, "settings_channel_test", channel.pk),
    ]
    assert [client.post(target).status_code for target in posts] == [404] * len(posts)
    assert client.get(url(org, "settings_channel", channel.pk)).status_code == 404
    assert client.get(url(other, "settings")).status_code == 404  # not one of theirs
    assert Membership.objects.filter(pk=theirs.pk).exists()
    assert AlertChannel.objects.filter(pk=channel.pk, enabled=True).exists()


def test_finance_cannot_post_changes(org: Organization) -> None:
    target = member_of(org, Role.MEMBER)
    client = signed_in_as("finance", org)
    assert client.post(url(org, "settings_member_remove", target.pk)).status_code == 403
    assert client.post(url(org, "settings_invite"), {"role": "member"}).status_code == 403
    assert Membership.objects.filter(pk=target.pk).exists() and not Invitation.objects.exists()


# ---------------------------------------------------------------- organization


def test_saving_the_organization_is_audited(org: Organization) -> None:
    client = signed_in_as("admin", org)
    page = client.get(url(org, "settings")).content.decode()
    assert "only metadata is kept" in page  # body logging explains itself
    response = client.post(
        url(org, "settings_organization"),
        {"name": "Acme Corp", "time_zone": "Europe/Berlin", "log_request_bodies": "on"},
    )
    assert response.status_code == 302
    org.refresh_from_db()
    assert (org.name, org.time_zone, org.log_request_bodies) == ("Acme Corp", "Europe/Berlin", True)
    entry = AuditLog.objects.get(action="organization.update")
    assert entry.before["log_request_bodies"] is False and entry.after["log_request_bodies"] is True


def test_an_unknown_time_zone_is_refused(org: Organization) -> None:
    response = signed_in_as("owner", org).post(
        url(org, "settings_organization"), {"name": "Acme", "time_zone": "Mars/Olympus"}
    )
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    org.refresh_from_db()
    assert org.time_zone == "UTC"


# ---------------------------------------------------------------- invitations


def test_an_invitation_link_is_shown_once_and_mailed(org: Organization) -> None:
    team = TeamFactory(org=org, name="Search")
    client = signed_in_as("admin", org)
    page = client.get(url(org, "settings")).content.decode()
    for label in ('for="id_email">E-mail<', 'for="id_role">Role<', 'for="id_team">Team<'):
        assert label in page
    assert "Create invitation</button>" in page
    response = client.post(
        url(org, "settings_invite"), {"email": "ada@example.com", "role": "member", "team": team.pk}
    )
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    link = response.context["link"]
    assert f'<code id="invite-link">{link}</code>' in response.content.decode()
    token = link.rstrip("/").rsplit("/", 1)[-1]
    invitation = Invitation.objects.get()
    assert invitation.token_hash == invitation_token_hash(token) and invitation.team == team
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["ada@example.com"]
    assert link in mail.outbox[0].body
    settings_page = client.get(url(org, "settings")).content.decode()
    assert "ada@example.com" in settings_page and token not in settings_page
    assert token not in str(AuditLog.objects.get(action="invitation.create").after)


def test_an_invitation_without_an_address_sends_no_mail(org: Organization) -> None:
    response = signed_in_as("owner", org).post(url(org, "settings_invite"), {"role": "finance"})
    assert response.status_code == 200 and 'id="invite-link"' in response.content.decode()
    assert mail.outbox == [] and Invitation.objects.get().role == Role.FINANCE


def test_admins_cannot_invite_owners(org: Organization) -> None:
    client = signed_in_as("admin", org)
    assert '<option value="owner"' not in client.get(url(org, "settings")).content.decode()
    assert client.post(url(org, "settings_invite"), {"role": "owner"}).status_code == 403
    assert not Invitation.objects.exists()


def test_revoking_an_invitation_stops_its_link(org: Organization) -> None:
    issued = invitation_create(org=org, role=Role.MEMBER, actor=Actor())
    client = signed_in_as("admin", org)
    response = client.post(url(org, "settings_invitation_revoke", issued.invitation.pk))
    assert response.status_code == 302
    assert Client().get(reverse("dashboard:invite_accept", args=[issued.token])).status_code == 410
    assert AuditLog.objects.filter(action="invitation.revoke").count() == 1


# ---------------------------------------------------------------- members


def test_an_admin_changes_a_members_role_and_team(org: Organization) -> None:
    team = TeamFactory(org=org)
    target = member_of(org, Role.FINANCE)
    client = signed_in_as("admin", org)
    response = client.post(
        url(org, "settings_member", target.pk),
        {f"m{target.pk}-role": "member", f"m{target.pk}-team": team.pk},
    )
    assert response.status_code == 302
    target.refresh_from_db()
    assert (target.role, target.team) == (Role.MEMBER, team)
    assert "membership updated" in client.get(response["location"]).content.decode()


def test_admins_cannot_change_or_remove_owners_or_make_owners(org: Organization) -> None:
    owner = member_of(org, Role.OWNER)
    target = member_of(org, Role.MEMBER)
    client = signed_in_as("admin", org)
    page = client.get(url(org, "settings")).content.decode()
    assert f"Remove {owner.user.username}" not in page and f"Remove {target.user.username}" in page
    for post in (
        (url(org, "settings_member", owner.pk), {f"m{owner.pk}-role": "member"}),
        (url(org, "settings_member_remove", owner.pk), {}),
        (url(org, "settings_member", target.pk), {f"m{target.pk}-role": "owner"}),
    ):
        assert client.post(*post).status_code == 403
    owner.refresh_from_db()
    target.refresh_from_db()
    assert owner.role == Role.OWNER and target.role == Role.MEMBER


def test_owners_manage_other_owners_but_not_themselves(org: Organization) -> None:
    client = signed_in_as("owner", org, username="boss")
    me = Membership.objects.get(user__username="boss")
    other = member_of(org, Role.OWNER)
    assert (
        client.post(url(org, "settings_member", me.pk), {f"m{me.pk}-role": "admin"}).status_code
        == 403
    )
    response = client.post(url(org, "settings_member", other.pk), {f"m{other.pk}-role": "admin"})
    assert response.status_code == 302
    other.refresh_from_db()
    assert other.role == Role.ADMIN
    assert client.post(url(org, "settings_member_remove", other.pk)).status_code == 302
    assert not Membership.objects.filter(pk=other.pk).exists()
    assert AuditLog.objects.get(action="membership.remove").before["role"] == "admin"


# ---------------------------------------------------------------- alert channels


def test_a_new_webhook_shows_its_signing_secret_once(org: Organization) -> None:
    client = signed_in_as("admin", org)
    assert client.get(url(org, "settings_channel_new")).status_code == 200
    response = client.post(
        url(org, "settings_channel_new"),
        {"name": "ops", "kind": "webhook", "url": "https://hooks.example.com/t/abc",
         "notify_threshold": "on", "notify_spike": "on"},
    )  # fmt: skip
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    assert secret.startswith("whsec_") and f'<code id="channel-secret">{secret}</code>' in (
        response.content.decode()
    )
    channel = AlertChannel.objects.get()
    assert channel.secret() == secret and secret not in channel.secret_encrypted
    assert (channel.notify_threshold, channel.notify_exhausted, channel.notify_spike) == (
        True, False, True,
    )  # fmt: skip
    assert secret not in client.get(url(org, "settings")).content.decode()
    assert secret not in str(list(AuditLog.objects.values("before", "after")))


def test_channel_urls_and_recipients_are_validated(org: Organization) -> None:
    client = signed_in_as("owner", org)
    bad_url = client.post(
        url(org, "settings_channel_new"),
        {"name": "x", "kind": "webhook", "url": "ftp://user:pw@example.com/"},
    )
    bad_mail = client.post(
        url(org, "settings_channel_new"), {"name": "x", "kind": "email", "recipients": "nope"}
    )
    assert bad_url.status_code == 400 and "http:// or https://" in bad_url.content.decode()
    assert bad_mail.status_code == 400 and "is not an e-mail address" in bad_mail.content.decode()
    # Refused when saved, not only when the first alert is sent.
    internal = client.post(
        url(org, "settings_channel_new"),
        {"name": "x", "kind": "webhook", "url": "http://169.254.169.254/latest/"},
    )
    assert internal.status_code == 400 and "public hosts only" in internal.content.decode()
    assert not AlertChannel.objects.exists()
    good = client.post(
        url(org, "settings_channel_new"),
        {"name": "finance", "kind": "email", "recipients": "a@example.com, b@example.com"},
    )
    assert good.status_code == 302
    assert AlertChannel.objects.get().recipients == "a@example.com, b@example.com"


def test_a_channel_is_edited_disabled_rotated_and_deleted(org: Organization) -> None:
    channel = webhook(org)
    client = signed_in_as("admin", org)
    edited = client.post(
        url(org, "settings_channel", channel.pk),
        {"name": "ops-2", "url": "https://other.example.com/hook", "notify_exhausted": "on"},
    )
    assert edited.status_code == 302
    channel.refresh_from_db()
    assert (channel.name, channel.url, channel.notify_threshold) == (
        "ops-2", "https://other.example.com/hook", False,
    )  # fmt: skip
    assert (
        client.post(url(org, "settings_channel_enable", channel.pk), {"enabled": "0"}).status_code
        == 302
    )
    channel.refresh_from_db()
    assert not channel.enabled
    assert "Disabled" in client.get(url(org, "settings")).content.decode()
    rotated = client.post(url(org, "settings_channel_rotate", channel.pk))
    channel.refresh_from_db()
    assert rotated.context["secret"] == channel.secret() != "whsec_test"
    assert client.post(url(org, "settings_channel_delete", channel.pk)).status_code == 302
    assert not AlertChannel.objects.exists()
    actions = set(AuditLog.objects.values_list("action", flat=True))
    assert {"alert_channel.update", "alert_channel.disable", "alert_channel.rotate_secret",
            "alert_channel.delete"} <= actions  # fmt: skip


def test_send_test_delivers_a_signed_webhook_and_shows_the_outcome(
    org: Organization, settings: Any
) -> None:
    settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = True
    client = signed_in_as("admin", org)
    with webhook_receiver((200,)) as receiver:
        channel = webhook(org, receiver.url)
        response = client.post(url(org, "settings_channel_test", channel.pk), follow=True)
    assert "Test alert delivered to &#x27;ops&#x27; (HTTP 200)" in response.content.decode()
    [request] = receiver.received()
    assert (
        request.headers["x-tollgate-event"] == "test" and "x-tollgate-signature" in request.headers
    )
    delivery = AlertDelivery.objects.get()
    assert delivery.status == AlertDelivery.Status.DELIVERED and delivery.alert.kind == "test"
    assert AuditLog.objects.get(action="alert_channel.test").after["delivered"] is True


def test_a_failed_test_says_why_and_is_not_retried(org: Organization, settings: Any) -> None:
    settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = True
    client = signed_in_as("owner", org)
    with webhook_receiver((500,)) as receiver:
        channel = webhook(org, receiver.url)
        response = client.post(url(org, "settings_channel_test", channel.pk), follow=True)
    page = response.content.decode()
    assert "Test alert to &#x27;ops&#x27; failed: HTTP 500." in page
    delivery = AlertDelivery.objects.get()
    assert delivery.status == AlertDelivery.Status.FAILED and delivery.next_attempt_at is None
    assert Alert.objects.count() == 1


def test_send_test_to_an_email_channel_sends_mail(org: Organization) -> None:
    channel = AlertChannel.objects.create(
        org=org, name="finance", kind=AlertChannel.Kind.EMAIL, recipients="cfo@example.com"
    )
    response = signed_in_as("admin", org).post(
        url(org, "settings_channel_test", channel.pk), follow=True
    )
    assert "Test alert delivered to &#x27;finance&#x27;." in response.content.decode()
    assert mail.outbox[0].to == ["cfo@example.com"] and "Test alert" in mail.outbox[0].body
