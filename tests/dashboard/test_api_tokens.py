"""API tokens in the dashboard: created by admins, shown once, usable at once, revocable."""

import re

import pytest
from rest_framework.test import APIClient

from tenants.api_tokens import api_token_create
from tenants.models import APIToken, AuditLog
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db
URL = "/dashboard/settings/api-tokens/"


def test_an_admin_creates_a_token_sees_it_once_and_it_works_at_once(org) -> None:
    admin = signed_in_as("admin", org)

    created = admin.post(URL, {"name": "terraform", "role": "finance", "lifetime": "30"})

    assert created.status_code == 200 and created["Cache-Control"] == "no-store"
    secret = re.search(r'id="api-token-secret">(tgm_\w+)<', created.content.decode()).group(1)
    token = APIToken.objects.get(org=org, name="terraform")
    assert token.role == "finance" and token.expires_at is not None
    assert secret not in admin.get(URL).content.decode()  # listed by prefix only
    assert token.prefix in admin.get(URL).content.decode()
    caller = APIClient()
    caller.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert caller.get("/api/v1/teams/").status_code == 200
    assert AuditLog.objects.filter(action="api_token.create", org=org).exists()

    revoked = admin.post(f"{URL}{token.pk}/revoke/", follow=True)

    assert "revoked" in revoked.content.decode()
    assert caller.get("/api/v1/teams/").status_code == 401


@pytest.mark.parametrize("role", ["finance", "member"])
def test_only_owners_and_admins_manage_tokens(org, role) -> None:
    client = signed_in_as(role, org)
    assert client.get(URL).status_code == 403
    assert client.post(URL, {"name": "x", "role": "admin", "lifetime": ""}).status_code == 403
    assert not APIToken.objects.exists()


def test_another_orgs_token_cannot_be_revoked(org) -> None:
    other = api_token_create(org=OrganizationFactory(), name="t", role="admin", actor=TEST_ACTOR)
    admin = signed_in_as("owner", org)
    assert admin.post(f"{URL}{other.token.pk}/revoke/").status_code == 404
    other.token.refresh_from_db()
    assert other.token.revoked_at is None


def test_a_bad_form_says_what_is_wrong(org) -> None:
    response = signed_in_as("admin", org).post(URL, {"name": "", "role": "root"})
    assert response.status_code == 400
    assert "This field is required" in response.content.decode()
    assert not APIToken.objects.exists()
