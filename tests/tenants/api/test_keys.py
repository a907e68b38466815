"""Virtual keys over the management API: the plaintext once, org scope, roles, ETags."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.keys import key_matches
from tenants.models import AuditLog, VirtualKey
from tenants.services import virtual_key_issue, virtual_key_revoke
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.api import token_client
from tests.support.dashboard import signed_in_as

pytestmark = pytest.mark.django_db


def token_prefix(client) -> str:
    return client._credentials["HTTP_AUTHORIZATION"].split()[1][:12]


def issued_key(org, **fields) -> VirtualKey:
    return virtual_key_issue(org=org, name=fields.pop("name", "k"), actor=TEST_ACTOR, **fields).key


def test_the_plaintext_is_returned_once_and_never_again(org, team) -> None:
    client = token_client(org)

    created = client.post(
        "/api/v1/keys/",
        {
            "name": "search backend", "team": team.pk, "allowed_models": ["gpt-4o", "gpt-4o"],
            "rpm_limit": 60, "metadata": {"owner": "search"},
            "expires_at": (timezone.now() + timedelta(days=30)).isoformat(),
        },
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    plaintext = body["key"]
    key = VirtualKey.objects.get(pk=body["id"])
    assert key_matches(plaintext, key.secret_hash) and plaintext.startswith(body["prefix"])
    assert body["team"] == team.pk and body["status"] == "active"
    assert body["allowed_models"] == ["gpt-4o"] and body["metadata"] == {"owner": "search"}
    assert "secret_hash" not in body and created["Cache-Control"] == "no-store"
    for later in (
        client.get(f"/api/v1/keys/{key.pk}/"),
        client.get("/api/v1/keys/"),
        client.patch(f"/api/v1/keys/{key.pk}/", {"name": "renamed"}, format="json"),
        client.post(f"/api/v1/keys/{key.pk}/revoke/"),
    ):
        assert later.status_code == 200
        assert plaintext not in later.content.decode()
        assert key.secret_hash not in later.content.decode()
        assert "key" not in later.json() and "secret_hash" not in later.content.decode()
    assert client.get(f"/api/v1/keys/{key.pk}/").json()["prefix"] == body["prefix"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "name"),
        ({"name": "k", "team": "not an id"}, "team"),
        ({"name": "k", "allowed_models": "gpt-4o"}, "allowed_models"),
        ({"name": "k", "allowed_models": [""]}, "allowed_models"),
        ({"name": "k", "allowed_models": ["m" * 201]}, "allowed_models"),
        ({"name": "k", "allowed_models": [f"m{i}" for i in range(201)]}, "allowed_models"),
        ({"name": "k", "allowed_models": [7]}, "allowed_models"),
        ({"name": "k", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"name": "k", "metadata": {"big": "x" * 9000}}, "metadata"),
        ({"name": "k", "metadata": {"nul": "a\x00b"}}, "metadata"),
        ({"name": "k", "rpm_limit": 0}, "rpm_limit"),
        ({"name": "k", "tpm_limit": 2**31}, "tpm_limit"),
        ({"name": "k", "rpm_limit": -5}, "rpm_limit"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "k", "expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at"),
        ({"name": "k\x00"}, "name"),
    ],
)
def test_bad_key_settings_get_a_400_naming_the_field(org, body, field) -> None:
    response = token_client(org).post("/api/v1/keys/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == field
    assert not VirtualKey.objects.filter(org=org).exists()


def test_another_orgs_team_in_the_body_is_refused_not_used(org) -> None:
    foreign_team = TeamFactory(org=OrganizationFactory())
    response = token_client(org).post(
        "/api/v1/keys/", {"name": "k", "team": foreign_team.pk}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "team"
    assert not VirtualKey.objects.exists()


def test_a_missing_or_malformed_body_is_a_400(org) -> None:
    client = token_client(org)
    assert client.post("/api/v1/keys/").status_code == 400
    assert (
        client.post("/api/v1/keys/", "[1, 2]", content_type="application/json").status_code == 400
    )
    assert client.post("/api/v1/keys/", "{", content_type="application/json").status_code == 400
    infinite = '{"name": "k", "metadata": {"n": 1e999}}'
    response = client.post("/api/v1/keys/", infinite, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "metadata"


def test_keys_are_listed_filtered_by_team_status_and_search(org, team) -> None:
    other_team = TeamFactory(org=org)
    active = issued_key(org, name="Search prod", team=team)
    revoked = issued_key(org, name="Search old", team=team)
    virtual_key_revoke(key=revoked, actor=TEST_ACTOR)
    expired = issued_key(org, name="Billing", team=other_team)
    VirtualKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    issued_key(OrganizationFactory(), name="Search elsewhere")
    client = token_client(org, "read_only")

    def names(**query) -> list[str]:
        response = client.get("/api/v1/keys/", query)
        assert response.status_code == 200, response.json()
        return [key["name"] for key in response.json()["data"]]

    assert names(ordering="name") == ["Billing", "Search old", "Search prod"]
    assert names(team=team.pk, ordering="-name") == ["Search prod", "Search old"]
    assert names(status="active") == ["Search prod"]
    assert names(status="revoked") == ["Search old"]
    assert names(status="expired") == ["Billing"]
    assert names(search="search", ordering="name") == ["Search old", "Search prod"]
    assert names(search=active.prefix) == ["Search prod"]
    for bad in ({"status": "paused"}, {"team": "x"}, {"team": 2**70}):
        assert client.get("/api/v1/keys/", bad).status_code == 400, bad


def test_patch_changes_only_what_it_is_sent_and_is_audited(org) -> None:
    key = issued_key(org, name="k", rpm_limit=10, allowed_models=["a"])
    client = token_client(org)
    etag = client.get(f"/api/v1/keys/{key.pk}/")["ETag"]

    changed = client.patch(
        f"/api/v1/keys/{key.pk}/",
        {"allowed_models": ["b", "a"], "tpm_limit": 1000},
        format="json",
        HTTP_IF_MATCH=etag,
    )

    assert changed.status_code == 200, changed.json()
    assert changed.json()["allowed_models"] == ["a", "b"]
    assert (changed.json()["name"], changed.json()["rpm_limit"]) == ("k", 10)
    assert changed.json()["tpm_limit"] == 1000 and changed["ETag"] != etag
    entry = AuditLog.objects.get(org=org, action="virtual_key.update")
    assert entry.actor_label == f"api token {token_prefix(client)}"
    assert entry.after == {"allowed_models": ["a", "b"], "tpm_limit": 1000}


def test_a_stale_if_match_on_patch_is_412_and_the_key_is_unchanged(org) -> None:
    key = issued_key(org, name="original")
    client = token_client(org)
    first_read = client.get(f"/api/v1/keys/{key.pk}/")["ETag"]
    assert (
        client.patch(
            f"/api/v1/keys/{key.pk}/", {"rpm_limit": 5}, format="json", HTTP_IF_MATCH=first_read
        ).status_code
        == 200
    )

    late = client.patch(
        f"/api/v1/keys/{key.pk}/", {"name": "late"}, format="json", HTTP_IF_MATCH=first_read
    )

    assert late.status_code == 412
    assert late.json()["error"]["type"] == "precondition_failed_error"
    key.refresh_from_db()
    assert (key.name, key.rpm_limit) == ("original", 5)


def test_a_revoked_key_cannot_be_changed_or_rotated(org) -> None:
    key = issued_key(org)
    virtual_key_revoke(key=key, actor=TEST_ACTOR)
    client = token_client(org)

    for response in (
        client.patch(f"/api/v1/keys/{key.pk}/", {"name": "again"}, format="json"),
        client.post(f"/api/v1/keys/{key.pk}/rotate/"),
    ):
        assert response.status_code == 409
        assert response.json()["error"]["type"] == "conflict_error"
    key.refresh_from_db()
    assert key.name == "k"


def test_rotate_returns_a_new_plaintext_and_the_old_one_stops_matching(org) -> None:
    issued = virtual_key_issue(org=org, name="k", actor=TEST_ACTOR)
    client = token_client(org)
    etag = client.get(f"/api/v1/keys/{issued.key.pk}/")["ETag"]

    rotated = client.post(f"/api/v1/keys/{issued.key.pk}/rotate/", HTTP_IF_MATCH=etag)

    assert rotated.status_code == 200, rotated.json()
    new_plaintext = rotated.json()["key"]
    key = VirtualKey.objects.get(pk=issued.key.pk)
    assert key_matches(new_plaintext, key.secret_hash)
    assert not key_matches(issued.plaintext, key.secret_hash)
    assert rotated.json()["prefix"] == key.prefix != issued.key.prefix
    assert new_plaintext not in client.get(f"/api/v1/keys/{key.pk}/").content.decode()
    stale = client.post(f"/api/v1/keys/{key.pk}/rotate/", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert VirtualKey.objects.get(pk=key.pk).prefix == key.prefix


def test_revoke_sets_revoked_at_once_and_is_audited_as_the_token(org) -> None:
    key = issued_key(org)
    client = token_client(org)

    first = client.post(f"/api/v1/keys/{key.pk}/revoke/")
    again = client.post(f"/api/v1/keys/{key.pk}/revoke/")

    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "revoked" and first.json()["revoked_at"]
    assert again.json()["revoked_at"] == first.json()["revoked_at"]
    key.refresh_from_db()
    assert key.revoked_at is not None
    entries = AuditLog.objects.filter(org=org, action="virtual_key.revoke", target_id=str(key.pk))
    assert list(entries.values_list("actor_label", flat=True)) == [
        f"api token {token_prefix(client)}"
    ]


def test_delete_revokes_the_key(org) -> None:
    key = issued_key(org)
    client = token_client(org)
    assert client.delete(f"/api/v1/keys/{key.pk}/").status_code == 204
    assert client.delete(f"/api/v1/keys/{key.pk}/").status_code == 204
    key.refresh_from_db()
    assert key.revoked_at is not None  # kept: its usage history names it
    assert client.get(f"/api/v1/keys/{key.pk}/").json()["status"] == "revoked"


def test_another_orgs_key_is_a_404_for_every_method(org) -> None:
    other = issued_key(OrganizationFactory(), name="theirs")
    client = token_client(org)
    calls = [
        ("get", f"/api/v1/keys/{other.pk}/"),
        ("patch", f"/api/v1/keys/{other.pk}/"),
        ("delete", f"/api/v1/keys/{other.pk}/"),
        ("post", f"/api/v1/keys/{other.pk}/rotate/"),
        ("post", f"/api/v1/keys/{other.pk}/revoke/"),
    ]
    for method, url in calls:
        response = getattr(client, method)(url, {"name": "mine now"}, format="json")
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/v1/keys/").json()["total"] == 0
    unchanged = VirtualKey.objects.get(pk=other.pk)
    assert (unchanged.name, unchanged.prefix, unchanged.revoked_at) == (
        "theirs",
        other.prefix,
        None,
    )


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_read_keys_but_change_nothing(org, role) -> None:
    key = issued_key(org, name="k")
    client = token_client(org, role)
    assert client.get("/api/v1/keys/").status_code == 200
    assert client.get(f"/api/v1/keys/{key.pk}/").status_code == 200

    for response in (
        client.post("/api/v1/keys/", {"name": "new"}, format="json"),
        client.patch(f"/api/v1/keys/{key.pk}/", {"name": "x"}, format="json"),
        client.delete(f"/api/v1/keys/{key.pk}/"),
        client.post(f"/api/v1/keys/{key.pk}/rotate/"),
        client.post(f"/api/v1/keys/{key.pk}/revoke/"),
    ):
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "permission_error"
    assert VirtualKey.objects.filter(org=org).count() == 1
    unchanged = VirtualKey.objects.get(pk=key.pk)
    assert (unchanged.name, unchanged.prefix, unchanged.revoked_at) == ("k", key.prefix, None)


def test_a_signed_in_admin_issues_keys_they_own(org) -> None:
    admin = signed_in_as("admin", org, username="ann")
    created = admin.post(
        f"/api/v1/keys/?org={org.slug}", {"name": "mine"}, content_type="application/json"
    )
    assert created.status_code == 201, created.json()
    key = VirtualKey.objects.get(pk=created.json()["id"])
    assert key.owner.username == "ann"
    assert AuditLog.objects.get(action="virtual_key.issue", target_id=str(key.pk)).actor_label == (
        "ann"
    )
