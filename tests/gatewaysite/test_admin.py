"""The Django admin covers every model and never shows a secret back."""

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse

from routing.models import Provider
from tenants.models import AuditLog, VirtualKey
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

OUR_APPS = {"tenants", "billing", "routing"}


@pytest.fixture
def admin_client_logged_in() -> Client:
    client = Client()
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def test_every_model_has_working_admin_pages(admin_client_logged_in: Client) -> None:
    registered = {model._meta.app_label for model in admin.site._registry}
    assert registered >= OUR_APPS
    for model in admin.site._registry:
        opts = model._meta
        if opts.app_label not in OUR_APPS:
            continue
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        assert admin_client_logged_in.get(changelist).status_code == 200, opts.label
        add = reverse(f"admin:{opts.app_label}_{opts.model_name}_add")
        # Append-only and computed models (ledger, audit log, rollups) refuse "add" on purpose.
        read_only = {
            "billing.UsageEvent", "tenants.AuditLog", "billing.UsageRollup",
            "billing.UsageTagRollup", "billing.UsageTeamRollup", "billing.ReconciliationRun",
            "billing.RollupState", "tenants.APIToken",
            "billing.Statement", "billing.Alert", "billing.AlertDelivery",
        }  # fmt: skip
        expected = 403 if opts.label in read_only else 200
        assert admin_client_logged_in.get(add).status_code == expected, opts.label


def test_provider_api_key_is_write_only(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        reverse("admin:routing_provider_add"),
        {"name": "OpenAI", "kind": "openai", "base_url": "https://api.openai.com/v1",
         "enabled": "on", "api_key": "sk-live-very-secret-123"},
    )  # fmt: skip
    assert response.status_code == 302
    provider = Provider.objects.get(name="OpenAI")
    assert provider.api_key() == "sk-live-very-secret-123"
    assert "sk-live-very-secret-123" not in provider.api_key_encrypted
    change = admin_client_logged_in.get(
        reverse("admin:routing_provider_change", args=[provider.pk])
    )
    assert b"sk-live-very-secret-123" not in change.content
    assert provider.api_key_encrypted.encode() not in change.content
    listing = admin_client_logged_in.get(reverse("admin:routing_provider_changelist"))
    assert b"sk-live-very-secret-123" not in listing.content

    # A blank field keeps the key; the clear box removes it.
    admin_client_logged_in.post(
        reverse("admin:routing_provider_change", args=[provider.pk]),
        {"name": "OpenAI", "kind": "openai", "base_url": "https://api.openai.com/v1",
         "enabled": "on", "api_key": ""},
    )  # fmt: skip
    provider.refresh_from_db()
    assert provider.api_key() == "sk-live-very-secret-123"
    admin_client_logged_in.post(
        reverse("admin:routing_provider_change", args=[provider.pk]),
        {"name": "OpenAI", "kind": "openai", "base_url": "https://api.openai.com/v1",
         "enabled": "on", "clear_api_key": "on"},
    )  # fmt: skip
    provider.refresh_from_db()
    assert not provider.has_api_key


def test_provider_base_url_must_be_http_without_credentials(admin_client_logged_in: Client) -> None:
    for bad in ("file:///etc/passwd", "https://user:pw@api.example.com/v1", "not a url"):
        response = admin_client_logged_in.post(
            reverse("admin:routing_provider_add"),
            {"name": "x", "kind": "openai", "base_url": bad, "enabled": "on"},
        )
        assert response.status_code == 200, bad  # the form comes back with an error
    assert not Provider.objects.exists()


def test_new_key_is_shown_once_and_only_its_prefix_afterwards(
    admin_client_logged_in: Client,
) -> None:
    org = OrganizationFactory()
    response = admin_client_logged_in.post(
        reverse("admin:tenants_virtualkey_add"),
        {"org": org.pk, "name": "from admin", "allowed_models": "[]", "metadata": "{}"},
        follow=True,
    )
    key = VirtualKey.objects.get(name="from admin")
    shown = [str(message) for message in response.context["messages"]]
    secrets = [message for message in shown if "shown only now" in message]
    assert len(secrets) == 1
    plaintext = secrets[0].split(": ", 1)[1]
    assert plaintext.startswith(key.prefix)
    change = admin_client_logged_in.get(reverse("admin:tenants_virtualkey_change", args=[key.pk]))
    assert plaintext.encode() not in change.content
    assert key.secret_hash.encode() not in change.content
    assert key.prefix.encode() in change.content
    assert AuditLog.objects.filter(action="virtual_key.issue", target_id=str(key.pk)).exists()
    # Keys are revoked, never deleted: usage history points at them.
    delete = admin_client_logged_in.get(reverse("admin:tenants_virtualkey_delete", args=[key.pk]))
    assert delete.status_code == 403


def test_audit_log_is_read_only(admin_client_logged_in: Client) -> None:
    org = OrganizationFactory()
    entry = AuditLog.objects.create(org=org, action="x", target_type="t", target_id="1")
    assert admin_client_logged_in.get(reverse("admin:tenants_auditlog_add")).status_code == 403
    delete = admin_client_logged_in.get(reverse("admin:tenants_auditlog_delete", args=[entry.pk]))
    assert delete.status_code == 403
    response = admin_client_logged_in.post(
        reverse("admin:tenants_auditlog_change", args=[entry.pk]), {"action": "tampered"}
    )
    entry.refresh_from_db()
    assert entry.action == "x"
    assert response.status_code == 403
