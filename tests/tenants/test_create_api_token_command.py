"""`manage.py create_api_token`: a token for scripts, printed once, working at once."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from tenants.models import APIToken, AuditLog

pytestmark = pytest.mark.django_db


def test_prints_only_a_working_token_with_the_role_asked(org) -> None:
    out = StringIO()
    call_command("create_api_token", "--org", org.slug, "--name", "ci", "--role", "finance",
                 "--expires-days", "7", stdout=out)  # fmt: skip

    (plaintext,) = out.getvalue().splitlines()
    token = APIToken.objects.get(org=org)
    assert plaintext.startswith(token.prefix) and token.role == "finance"
    assert token.expires_at is not None
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert client.get("/api/v1/teams/").status_code == 200
    assert (
        client.post("/api/v1/teams/", {"slug": "x", "name": "X"}, format="json").status_code == 403
    )
    assert AuditLog.objects.filter(action="api_token.create", actor_label="cli").exists()


def test_refuses_an_unknown_org_and_a_bad_lifetime(org) -> None:
    with pytest.raises(CommandError, match="No organization"):
        call_command("create_api_token", "--org", "nope", "--name", "x")
    with pytest.raises(CommandError, match="positive"):
        call_command("create_api_token", "--org", org.slug, "--name", "x", "--expires-days", "0")
    assert not APIToken.objects.exists()
