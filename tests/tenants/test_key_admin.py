"""Keys in the Django admin: the IP allowlist is checked and stored as the API stores it,
and its changes are audited."""

import json

import pytest
from django.test import Client
from django.urls import reverse

from tenants.ip_allowlist import MAX_ALLOWED_IPS
from tenants.models import AuditLog, VirtualKey

pytestmark = pytest.mark.django_db


def key_form(org, **fields: str) -> dict[str, object]:
    """The admin's key form as a browser posts it."""
    return {"org": org.pk, "name": "from admin", "allowed_models": "[]", "metadata": "{}", **fields}


def test_admin_stores_the_ip_allowlist_normalised_and_audits_its_changes(
    admin_client: Client, admin_user, org
) -> None:
    added = admin_client.post(
        reverse("admin:tenants_virtualkey_add"),
        key_form(org, allowed_ips='["2001:db8::1", "10.1.2.3/8", " 10.0.0.0/8 "]'),
    )
    assert added.status_code == 302
    key = VirtualKey.objects.get(name="from admin")
    # Host bits dropped, duplicates merged, IPv4 first: as the API and the dashboard store it.
    assert key.allowed_ips == ["10.0.0.0/8", "2001:db8::1/128"]
    issued = AuditLog.objects.get(action="virtual_key.issue", target_id=str(key.pk))
    assert issued.after["allowed_ips"] == ["10.0.0.0/8", "2001:db8::1/128"]

    change_url = reverse("admin:tenants_virtualkey_change", args=[key.pk])
    page = admin_client.get(change_url)
    assert json.loads(page.context["adminform"].form["allowed_ips"].value()) == key.allowed_ips
    changed = admin_client.post(change_url, key_form(org, allowed_ips='["::ffff:192.0.2.7"]'))
    assert changed.status_code == 302
    key.refresh_from_db()
    assert key.allowed_ips == ["192.0.2.7/32"]
    update = AuditLog.objects.get(action="virtual_key.update", target_id=str(key.pk))
    assert update.actor == admin_user and update.org == org
    assert update.before == {"allowed_ips": ["10.0.0.0/8", "2001:db8::1/128"]}
    assert update.after == {"allowed_ips": ["192.0.2.7/32"]}

    cleared = admin_client.post(change_url, key_form(org, allowed_ips="[]"))
    assert cleared.status_code == 302
    key.refresh_from_db()
    assert key.allowed_ips == []


@pytest.mark.parametrize(
    ("entered", "message"),
    [
        ('["10.0.0.0/8", "office"]', "is not an IP address or network"),
        ('["10.0.0.300"]', "is not an IP address or network"),
        ("[42]", "Give each network as text"),
        ('"10.0.0.0/8"', "Give a list of IP addresses or networks"),
        ('{"10.0.0.0/8": true}', "Give a list of IP addresses or networks"),
        (json.dumps([f"10.0.{i}.0/24" for i in range(MAX_ALLOWED_IPS + 1)]), "at most"),
    ],
)
def test_admin_refuses_an_invalid_ip_allowlist_with_a_form_error(
    admin_client: Client, org, entered: str, message: str
) -> None:
    added = admin_client.post(
        reverse("admin:tenants_virtualkey_add"), key_form(org, allowed_ips=entered)
    )
    assert added.status_code == 200  # the form again, with the error on the field
    assert message in " ".join(added.context["adminform"].form.errors["allowed_ips"])
    assert not VirtualKey.objects.exists()

    valid = admin_client.post(
        reverse("admin:tenants_virtualkey_add"), key_form(org, allowed_ips='["10.0.0.0/8"]')
    )
    assert valid.status_code == 302
    key = VirtualKey.objects.get()
    changed = admin_client.post(
        reverse("admin:tenants_virtualkey_change", args=[key.pk]),
        key_form(org, allowed_ips=entered),
    )
    assert changed.status_code == 200
    assert message in " ".join(changed.context["adminform"].form.errors["allowed_ips"])
    key.refresh_from_db()
    assert key.allowed_ips == ["10.0.0.0/8"]
    assert not AuditLog.objects.filter(action="virtual_key.update").exists()
