"""Teams over the management API: org scope, roles, ETags and error bodies."""

import pytest

from tenants.api_tokens import api_token_create, api_token_revoke
from tenants.models import AuditLog, Team
from tenants.services import virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.api import token_client
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db


def test_an_admin_token_creates_changes_and_deletes_a_team(org) -> None:
    client = token_client(org)

    created = client.post(
        "/api/v1/teams/", {"slug": "search", "name": "Search", "rpm_limit": 60}, format="json"
    )
    assert created.status_code == 201, created.json()
    team_id = created.json()["id"]
    assert created.json()["rpm_limit"] == 60

    read = client.get(f"/api/v1/teams/{team_id}/")
    changed = client.patch(
        f"/api/v1/teams/{team_id}/", {"name": "Search & ranking"}, format="json",
        HTTP_IF_MATCH=read["ETag"],
    )  # fmt: skip
    assert changed.status_code == 200 and changed.json()["name"] == "Search & ranking"
    assert changed.json()["rpm_limit"] == 60  # PATCH keeps what it was not sent
    listed = client.get("/api/v1/teams/", {"ordering": "-name"}).json()
    assert listed["object"] == "list" and "Search & ranking" in [t["name"] for t in listed["data"]]

    assert client.delete(f"/api/v1/teams/{team_id}/").status_code == 204
    assert not Team.objects.filter(pk=team_id).exists()
    actions = set(AuditLog.objects.filter(org=org).values_list("action", "actor_label"))
    assert ("team.update", f"api token {client_prefix(client)}") in actions


def client_prefix(client) -> str:
    return client._credentials["HTTP_AUTHORIZATION"].split()[1][:12]


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org, team) -> None:
    client = token_client(org)
    first_read = client.get(f"/api/v1/teams/{team.pk}/")["ETag"]
    assert (
        client.patch(
            f"/api/v1/teams/{team.pk}/",
            {"name": "Renamed by Ann"},
            format="json",
            HTTP_IF_MATCH=first_read,
        ).status_code
        == 200
    )

    late = client.patch(
        f"/api/v1/teams/{team.pk}/",
        {"name": "Renamed by Bob"},
        format="json",
        HTTP_IF_MATCH=first_read,
    )

    assert late.status_code == 412
    assert late.json()["error"]["type"] == "precondition_failed_error"
    assert "changed since you read it" in late.json()["error"]["message"]
    team.refresh_from_db()
    assert team.name == "Renamed by Ann"


def test_another_orgs_team_is_a_404_for_every_method(org) -> None:
    other = TeamFactory(org=OrganizationFactory())
    client = token_client(org)
    for method in ("get", "patch", "delete"):
        response = getattr(client, method)(f"/api/v1/teams/{other.pk}/", {}, format="json")
        assert response.status_code == 404, method
        assert response.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/v1/teams/", {"org": other.org.slug}).status_code == 404
    assert Team.objects.filter(pk=other.pk).exists()


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_read_teams_but_cannot_change_them(org, team, role) -> None:
    client = token_client(org, role)
    assert client.get("/api/v1/teams/").status_code == 200
    refused = client.post("/api/v1/teams/", {"slug": "x", "name": "X"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert (
        client.patch(f"/api/v1/teams/{team.pk}/", {"name": "Y"}, format="json").status_code == 403
    )


def test_bad_input_gets_an_openai_shaped_400_naming_the_field(org) -> None:
    client = token_client(org)
    response = client.post("/api/v1/teams/", {"slug": "not a slug!", "rpm_limit": 0}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] in {"slug", "name", "rpm_limit"}
    assert set(error["fields"]) == {"slug", "name", "rpm_limit"}
    assert client.post("/api/v1/teams/", "{", content_type="application/json").status_code == 400
    too_deep = client.post("/api/v1/teams/", "[" * 100_000, content_type="application/json")
    assert (
        too_deep.status_code == 400 and "nested too deeply" in too_deep.json()["error"]["message"]
    )
    # Numbers beyond what the database stores are the caller's error, on every backend.
    for path, params in (("/api/v1/deployments/", {"provider": 10**30}),
                         ("/api/v1/budgets/", {"team": 10**30})):  # fmt: skip
        assert client.get(path, params).status_code in (200, 400), path
    unknown = client.get("/api/v1/teams/not-an-id/")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"


def test_a_team_with_keys_cannot_be_deleted(org, team) -> None:
    virtual_key_issue(org=org, team=team, name="k", actor=TEST_ACTOR)
    response = token_client(org).delete(f"/api/v1/teams/{team.pk}/")
    assert response.status_code == 409
    assert "still has virtual keys" in response.json()["error"]["message"]


def test_missing_revoked_and_wrong_kind_tokens_are_401(org) -> None:
    from rest_framework.test import APIClient

    assert APIClient().get("/api/v1/teams/").status_code in (401, 403)
    issued = api_token_create(org=org, name="t", role="admin", actor=TEST_ACTOR)
    api_token_revoke(token=issued.token, actor=TEST_ACTOR)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.plaintext}")
    revoked = client.get("/api/v1/teams/")
    assert revoked.status_code == 401
    assert revoked.json()["error"]["type"] == "authentication_error"
    assert issued.plaintext not in revoked.content.decode()
    key = virtual_key_issue(org=org, name="k", actor=TEST_ACTOR).plaintext
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert "virtual key" in client.get("/api/v1/teams/").json()["error"]["message"]


def test_the_dashboard_session_works_for_admins_and_not_for_members(org) -> None:
    admin = signed_in_as("admin", org)
    assert admin.get("/api/v1/teams/", {"org": org.slug}).status_code == 200
    member = signed_in_as("member", org)
    assert member.get("/api/v1/teams/", {"org": org.slug}).status_code == 403
    outsider = signed_in_as("admin", OrganizationFactory())
    assert outsider.get("/api/v1/teams/", {"org": org.slug}).status_code == 404
