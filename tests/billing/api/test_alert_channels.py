"""Alert channels over the management API: org scope, roles, the signing secret shown once,
the webhook URL guard, ETags, test sends to a real loopback receiver, and bad input."""

import pytest
from django.core import mail
from django.http import HttpResponse

from billing.alert_channels import alert_channel_create
from billing.models import AlertChannel, AlertDelivery
from billing.webhooks import webhook_signature_verify
from tenants.models import AuditLog, Organization
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory
from tests.support.api import token_client
from tests.support.webhooks import webhook_receiver

pytestmark = pytest.mark.django_db
PUBLIC_URL = "https://hooks.example.com/tollgate/T0KEN"
LIST = "/api/v1/alert-channels/"


def detail(channel: AlertChannel, action: str = "") -> str:
    return f"{LIST}{channel.pk}/{action}"


def a_webhook(org: Organization, url: str = PUBLIC_URL, **fields: object) -> AlertChannel:
    channel = AlertChannel(org=org, name="ops hook", kind="webhook", url=url, **fields)
    alert_channel_create(channel=channel, actor=TEST_ACTOR)
    return channel


def an_email_channel(org: Organization, recipients: str = "cfo@example.com") -> AlertChannel:
    channel = AlertChannel(org=org, name="finance mail", kind="email", recipients=recipients)
    alert_channel_create(channel=channel, actor=TEST_ACTOR)
    return channel


def assert_secret_not_shown(response: HttpResponse, channel: AlertChannel) -> None:
    """Neither the secret, its ciphertext, nor a signing_secret field is in the body."""
    channel.refresh_from_db()
    body = response.content.decode()
    assert channel.secret() and channel.secret() not in body
    assert channel.secret_encrypted not in body
    assert "signing_secret" not in response.json()


@pytest.fixture
def allow_loopback(settings) -> None:  # type: ignore[no-untyped-def]
    """The receivers below listen on 127.0.0.1, which production refuses."""
    settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = True


def test_an_admin_adds_a_webhook_and_sees_its_signing_secret_once(org) -> None:
    client = token_client(org)

    created = client.post(
        LIST, {"name": "ops", "kind": "webhook", "url": PUBLIC_URL, "notify_spike": False},
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    channel = AlertChannel.objects.get(org=org)
    assert body["id"] == channel.pk and body["kind"] == "webhook" and body["url"] == PUBLIC_URL
    assert body["signing_secret"] == channel.secret() != ""
    assert body["has_signing_secret"] is True and body["recipients"] == []
    assert (body["notify_threshold"], body["notify_spike"], body["enabled"]) == (True, False, True)
    assert created["Cache-Control"] == "no-store" and created["ETag"]
    read = client.get(detail(channel))
    assert read.status_code == 200 and read["ETag"] == created["ETag"]
    assert read.json()["has_signing_secret"] is True
    assert_secret_not_shown(read, channel)
    assert_secret_not_shown(client.get(LIST), channel)
    entry = AuditLog.objects.get(org=org, action="alert_channel.create")
    assert channel.secret() not in str(entry.after)


def test_an_email_channel_takes_a_list_of_addresses_and_has_no_secret(org) -> None:
    created = token_client(org).post(
        LIST,
        {"name": "finance", "kind": "email",
         "recipients": ["cfo@example.com", "ops@example.com", "cfo@example.com"]},
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["recipients"] == ["cfo@example.com", "ops@example.com"]
    assert body["signing_secret"] is None and body["has_signing_secret"] is False
    assert body["url"] == ""
    channel = AlertChannel.objects.get(org=org)
    assert channel.recipients == "cfo@example.com, ops@example.com" and not channel.has_secret


def test_the_list_filters_by_kind_and_enabled(org) -> None:
    hook = a_webhook(org)
    mail_channel = an_email_channel(org)
    off = a_webhook(org, enabled=False)
    client = token_client(org, "read_only")

    def ids(query: str) -> set[int]:
        response = client.get(LIST + query)
        assert response.status_code == 200, response.json()
        return {item["id"] for item in response.json()["data"]}

    assert ids("") == {hook.pk, mail_channel.pk, off.pk}
    assert ids("?kind=webhook") == {hook.pk, off.pk}
    assert ids("?kind=email") == {mail_channel.pk}
    assert ids("?enabled=false") == {off.pk}
    assert ids("?kind=webhook&enabled=true") == {hook.pk}
    assert client.get(LIST + "?kind=sms").status_code == 400


def test_another_orgs_channel_is_a_404_for_every_method(org) -> None:
    theirs = a_webhook(OrganizationFactory())
    secret_before = theirs.secret()
    client = token_client(org)

    calls = [
        ("get", detail(theirs)),
        ("patch", detail(theirs)),
        ("delete", detail(theirs)),
        ("post", detail(theirs, "rotate-secret/")),
        ("post", detail(theirs, "test/")),
    ]
    for method, path in calls:
        response = getattr(client, method)(path, {"name": "mine now"}, format="json")
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["type"] == "not_found_error"
        assert secret_before not in response.content.decode()

    assert client.get(LIST).json()["total"] == 0
    theirs.refresh_from_db()
    assert theirs.name == "ops hook" and theirs.secret() == secret_before
    assert not AlertDelivery.objects.exists()
    assert client.get(f"{LIST}{2**70}/").status_code == 404


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_read_channels_but_cannot_change_them(org, role) -> None:
    channel = a_webhook(org)
    secret_before = channel.secret()
    client = token_client(org, role)

    assert client.get(detail(channel)).status_code == 200
    assert client.get(LIST).status_code == 200
    refused = [
        client.post(LIST, {"name": "x", "kind": "webhook", "url": PUBLIC_URL}, format="json"),
        client.patch(detail(channel), {"name": "renamed"}, format="json"),
        client.delete(detail(channel)),
        client.post(detail(channel, "rotate-secret/")),
        client.post(detail(channel, "test/")),
    ]

    for response in refused:
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "permission_error"
        assert secret_before not in response.content.decode()
    channel.refresh_from_db()
    assert AlertChannel.objects.count() == 1 and channel.name == "ops hook"
    assert channel.secret() == secret_before
    assert not AlertDelivery.objects.exists()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "https://api.localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9000/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    ],
)
def test_a_webhook_to_our_own_network_is_refused_naming_the_url(org, url) -> None:
    client = token_client(org)
    created = client.post(LIST, {"name": "x", "kind": "webhook", "url": url}, format="json")

    assert created.status_code == 400, created.json()
    assert created.json()["error"]["param"] == "url"
    assert not AlertChannel.objects.exists()

    channel = a_webhook(org)
    moved = client.patch(detail(channel), {"url": url}, format="json")
    assert moved.status_code == 400 and moved.json()["error"]["param"] == "url"
    assert_secret_not_shown(moved, channel)
    channel.refresh_from_db()
    assert channel.url == PUBLIC_URL


def test_a_private_webhook_is_accepted_where_private_networks_are_allowed(
    org, allow_loopback
) -> None:
    created = token_client(org).post(
        LIST, {"name": "lab", "kind": "webhook", "url": "http://10.1.2.3/hook"}, format="json"
    )
    assert created.status_code == 201, created.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"kind": "webhook", "url": PUBLIC_URL}, "name"),
        ({"name": "", "kind": "webhook", "url": PUBLIC_URL}, "name"),
        ({"name": "x" * 201, "kind": "webhook", "url": PUBLIC_URL}, "name"),
        ({"name": "x", "url": PUBLIC_URL}, "kind"),
        ({"name": "x", "kind": "sms", "url": PUBLIC_URL}, "kind"),
        ({"name": "x", "kind": "webhook"}, "url"),
        ({"name": "x", "kind": "webhook", "url": "ftp://hooks.example.com/x"}, "url"),
        ({"name": "x", "kind": "webhook", "url": "https://u:p@hooks.example.com/x"}, "url"),
        ({"name": "x", "kind": "webhook", "url": "https://hooks.example.com/#x"}, "url"),
        ({"name": "x", "kind": "webhook", "url": "https://" + "a" * 2000}, "url"),
        ({"name": "x", "kind": "webhook", "url": ["https://hooks.example.com/"]}, "url"),
        ({"name": "x", "kind": "webhook", "url": PUBLIC_URL, "recipients": ["a@example.com"]},
         "recipients"),
        ({"name": "x", "kind": "email"}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": []}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": "a@example.com"}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": ["not an address"]}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": ['"a,b"@example.com']}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": [f"a{n}@example.com" for n in range(51)]},
         "recipients"),
        ({"name": "x", "kind": "email", "recipients": ["a@example.com"], "url": PUBLIC_URL},
         "url"),
        ({"name": "x", "kind": "webhook", "url": PUBLIC_URL, "notify_spike": "maybe"},
         "notify_spike"),
        ({"name": "x", "kind": "webhook", "url": PUBLIC_URL, "enabled": None}, "enabled"),
    ],
)  # fmt: skip
def test_bad_channel_input_gets_a_400_naming_the_field(org, body, param) -> None:
    response = token_client(org).post(LIST, body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param
    assert not AlertChannel.objects.exists()


def test_a_missing_or_non_object_body_is_a_400(org) -> None:
    client = token_client(org)
    channel = a_webhook(org)
    assert client.post(LIST, "{", content_type="application/json").status_code == 400
    assert client.post(LIST, [1, 2], format="json").status_code == 400
    assert client.post(LIST).status_code == 400
    assert client.patch(detail(channel), [1, 2], format="json").status_code == 400
    assert AlertChannel.objects.count() == 1


def test_patch_changes_only_what_it_is_sent_and_never_the_kind_or_secret(org) -> None:
    channel = a_webhook(org)
    secret_before = channel.secret()
    client = token_client(org)

    changed = client.patch(
        detail(channel),
        {"name": "pager", "url": "https://other.example.com/hook", "notify_threshold": False,
         "enabled": False, "kind": "webhook", "id": 999},
        format="json",
    )  # fmt: skip
    retyped = client.patch(detail(channel), {"kind": "email"}, format="json")
    stray = client.patch(detail(channel), {"recipients": ["a@example.com"]}, format="json")
    emptied = client.patch(detail(channel), {"url": ""}, format="json")

    assert changed.status_code == 200, changed.json()
    body = changed.json()
    assert (body["id"], body["name"], body["url"]) == (
        channel.pk, "pager", "https://other.example.com/hook"
    )  # fmt: skip
    assert body["notify_threshold"] is False and body["notify_exhausted"] is True
    assert body["enabled"] is False
    assert_secret_not_shown(changed, channel)
    assert retyped.status_code == 400 and retyped.json()["error"]["param"] == "kind"
    assert stray.status_code == 400 and stray.json()["error"]["param"] == "recipients"
    assert emptied.status_code == 400 and emptied.json()["error"]["param"] == "url"
    channel.refresh_from_db()
    assert (channel.kind, channel.name, channel.enabled) == ("webhook", "pager", False)
    assert channel.secret() == secret_before
    actions = set(AuditLog.objects.filter(org=org).values_list("action", flat=True))
    assert {"alert_channel.update", "alert_channel.disable"} <= actions


def test_an_email_channels_recipients_change_and_it_has_no_url(org) -> None:
    channel = an_email_channel(org)
    client = token_client(org)

    changed = client.patch(
        detail(channel), {"recipients": ["new@example.com", "ops@example.com"]}, format="json"
    )
    with_url = client.patch(detail(channel), {"url": PUBLIC_URL}, format="json")
    emptied = client.patch(detail(channel), {"recipients": []}, format="json")

    assert changed.status_code == 200, changed.json()
    assert changed.json()["recipients"] == ["new@example.com", "ops@example.com"]
    assert with_url.status_code == 400 and with_url.json()["error"]["param"] == "url"
    assert emptied.status_code == 400 and emptied.json()["error"]["param"] == "recipients"
    channel.refresh_from_db()
    assert channel.recipients == "new@example.com, ops@example.com" and channel.url == ""


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org) -> None:
    channel = a_webhook(org)
    client = token_client(org)
    first_read = client.get(detail(channel))["ETag"]
    renamed = client.patch(
        detail(channel), {"name": "first"}, format="json", HTTP_IF_MATCH=first_read
    )
    assert renamed.status_code == 200 and renamed["ETag"] != first_read
    secret_now = AlertChannel.objects.get().secret()

    late = [
        client.patch(detail(channel), {"name": "late"}, format="json", HTTP_IF_MATCH=first_read),
        client.delete(detail(channel), HTTP_IF_MATCH=first_read),
        client.post(detail(channel, "rotate-secret/"), HTTP_IF_MATCH=first_read),
    ]

    for response in late:
        assert response.status_code == 412
        assert response.json()["error"]["type"] == "precondition_failed_error"
        assert_secret_not_shown(response, channel)
    channel.refresh_from_db()
    assert channel.name == "first" and channel.secret() == secret_now
    fresh = client.delete(detail(channel), HTTP_IF_MATCH=renamed["ETag"])
    assert fresh.status_code == 204 and not AlertChannel.objects.exists()
    assert AuditLog.objects.filter(org=org, action="alert_channel.delete").exists()


def test_rotating_gives_a_webhook_a_new_secret_shown_once(org) -> None:
    channel = a_webhook(org)
    old_secret = channel.secret()
    client = token_client(org)
    etag = client.get(detail(channel))["ETag"]

    rotated = client.post(detail(channel, "rotate-secret/"), HTTP_IF_MATCH=etag)

    assert rotated.status_code == 200, rotated.json()
    channel.refresh_from_db()
    assert rotated.json()["signing_secret"] == channel.secret() != old_secret
    assert rotated["Cache-Control"] == "no-store" and rotated["ETag"] != etag
    assert_secret_not_shown(client.get(detail(channel)), channel)
    assert AuditLog.objects.filter(org=org, action="alert_channel.rotate_secret").exists()


def test_an_email_channel_has_no_secret_to_rotate(org) -> None:
    channel = an_email_channel(org)
    response = token_client(org).post(detail(channel, "rotate-secret/"))
    assert response.status_code == 409
    assert response.json()["error"]["type"] == "conflict_error"
    channel.refresh_from_db()
    assert not channel.has_secret


def test_a_test_send_delivers_a_signed_webhook_and_reports_it(org, allow_loopback) -> None:
    client = token_client(org)
    with webhook_receiver((200,)) as receiver:
        channel = a_webhook(org, url=receiver.url)
        response = client.post(detail(channel, "test/"))
    assert response.status_code == 200, response.json()
    assert response.json() == {"delivered": True, "response_status": 200, "error": ""}
    [request] = receiver.received()
    assert request.headers["x-tollgate-event"] == "test"
    assert webhook_signature_verify(
        channel.secret(), request.headers["x-tollgate-signature"], request.body
    )
    assert_secret_not_shown(response, channel)
    assert AlertDelivery.objects.get().status == AlertDelivery.Status.DELIVERED


def test_a_failed_test_send_says_why_and_is_not_retried(org, allow_loopback) -> None:
    with webhook_receiver((500,)) as receiver:
        channel = a_webhook(org, url=receiver.url)
        response = token_client(org).post(detail(channel, "test/"))
    assert response.status_code == 200
    body = response.json()
    assert body["delivered"] is False and body["response_status"] == 500
    assert "500" in body["error"] and receiver.url not in body["error"]
    delivery = AlertDelivery.objects.get()
    assert delivery.status == AlertDelivery.Status.FAILED and delivery.next_attempt_at is None


def test_a_test_send_to_a_private_address_is_refused_at_delivery(org, settings) -> None:
    settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = True
    with webhook_receiver((200,)) as receiver:
        channel = a_webhook(org, url=receiver.url)  # saved while allowed
        settings.TOLLGATE_WEBHOOK_ALLOW_PRIVATE_NETWORKS = False
        response = token_client(org).post(detail(channel, "test/"))
    assert response.json()["delivered"] is False and "refused" in response.json()["error"]
    assert receiver.received() == []


def test_a_test_send_to_an_email_channel_sends_the_mail(org) -> None:
    channel = an_email_channel(org, "cfo@example.com, ops@example.com")
    response = token_client(org).post(detail(channel, "test/"))
    assert response.status_code == 200
    assert response.json() == {"delivered": True, "response_status": None, "error": ""}
    [message] = mail.outbox
    assert message.to == ["cfo@example.com", "ops@example.com"]
