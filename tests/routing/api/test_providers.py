"""Providers over the management API: write-only keys, roles, org scope, ETags, SSRF."""

import pytest

from routing.models import Provider
from tenants.models import AuditLog
from tests.routing.api.conftest import SECRET, Routing
from tests.support.api import token_client

pytestmark = pytest.mark.django_db

NEW_SECRET = "sk-rotated-also-secret-9876543210"


def assert_no_secret(body: str, provider: Provider) -> None:
    provider.refresh_from_db()
    assert SECRET not in body and NEW_SECRET not in body
    assert provider.api_key_encrypted and provider.api_key_encrypted not in body
    # Not even a recognisable piece of the ciphertext (Fernet tokens start alike).
    assert provider.api_key_encrypted[-24:] not in body
    assert "api_key_encrypted" not in body


def test_an_admin_adds_a_provider_whose_key_is_never_shown_again(org) -> None:
    client = token_client(org)

    created = client.post(
        "/api/v1/providers/",
        {"name": "OpenAI prod", "kind": "openai", "api_key": SECRET},
        format="json",
    )

    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["name"] == "OpenAI prod" and body["kind"] == "openai" and body["enabled"]
    assert body["has_api_key"] is True and "api_key" not in body
    assert created["ETag"]
    provider = Provider.objects.get(pk=body["id"])
    assert provider.org == org and provider.api_key() == SECRET
    assert_no_secret(created.content.decode(), provider)
    assert AuditLog.objects.filter(org=org, action="provider.create").exists()


@pytest.mark.parametrize("role", ["admin", "finance", "read_only"])
def test_no_role_ever_reads_a_providers_key_or_its_ciphertext(org, ours: Routing, role) -> None:
    client = token_client(org, role)

    listed = client.get("/api/v1/providers/")
    detail = client.get(f"/api/v1/providers/{ours.provider.pk}/")

    assert listed.status_code == 200 and detail.status_code == 200
    assert [row["has_api_key"] for row in listed.json()["data"]] == [True]
    assert detail.json()["has_api_key"] is True
    for response in (listed, detail):
        assert_no_secret(response.content.decode(), ours.provider)


def test_an_admin_rotates_and_then_removes_the_key(org, ours: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/providers/{ours.provider.pk}/"

    rotated = client.patch(url, {"api_key": NEW_SECRET}, format="json")
    assert rotated.status_code == 200 and rotated.json()["has_api_key"] is True
    ours.provider.refresh_from_db()
    assert ours.provider.api_key() == NEW_SECRET
    assert_no_secret(rotated.content.decode(), ours.provider)

    renamed = client.patch(url, {"name": "OpenAI EU", "api_key": ""}, format="json")
    assert renamed.status_code == 200 and renamed.json()["name"] == "OpenAI EU"
    ours.provider.refresh_from_db()
    assert ours.provider.api_key() == NEW_SECRET, "an empty key keeps the stored one"

    removed = client.patch(url, {"remove_api_key": True}, format="json")
    assert removed.status_code == 200 and removed.json()["has_api_key"] is False
    ours.provider.refresh_from_db()
    assert ours.provider.api_key() == ""

    disabled = client.patch(url, {"enabled": False}, format="json")
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False


def test_a_new_key_and_its_removal_together_are_refused(org, ours: Routing) -> None:
    response = token_client(org).patch(
        f"/api/v1/providers/{ours.provider.pk}/",
        {"api_key": NEW_SECRET, "remove_api_key": True},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "remove_api_key"
    assert NEW_SECRET not in response.content.decode()
    ours.provider.refresh_from_db()
    assert ours.provider.api_key() == SECRET


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_cannot_add_or_change_providers(
    org, ours: Routing, role
) -> None:
    client = token_client(org, role)

    added = client.post(
        "/api/v1/providers/", {"name": "Sneaky", "kind": "openai", "api_key": "x"}, format="json"
    )
    changed = client.patch(
        f"/api/v1/providers/{ours.provider.pk}/",
        {"base_url": "https://evil.example.com/v1", "api_key": "attacker-key"},
        format="json",
    )

    assert added.status_code == 403 and changed.status_code == 403
    assert added.json()["error"]["type"] == "permission_error"
    assert list(Provider.objects.filter(org=org)) == [ours.provider]
    ours.provider.refresh_from_db()
    assert ours.provider.base_url == "" and ours.provider.api_key() == SECRET


def test_another_orgs_provider_is_a_404_for_every_method(org, theirs: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/providers/{theirs.provider.pk}/"

    assert client.get(url).status_code == 404
    patched = client.patch(url, {"name": "Mine now", "api_key": "x"}, format="json")
    assert patched.status_code == 404
    assert patched.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/v1/providers/").json()["data"] == []
    theirs.provider.refresh_from_db()
    assert theirs.provider.name == "Theirs" and theirs.provider.api_key() == SECRET


def test_a_platform_provider_is_not_the_orgs_to_read_or_change(org) -> None:
    platform = Provider(org=None, name="Platform", kind="openai")
    platform.set_api_key(SECRET)
    platform.save()
    client = token_client(org)
    assert client.get(f"/api/v1/providers/{platform.pk}/").status_code == 404
    patched = client.patch(f"/api/v1/providers/{platform.pk}/", {"enabled": False}, format="json")
    assert patched.status_code == 404
    assert SECRET not in client.get("/api/v1/providers/").content.decode()


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org, ours: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/providers/{ours.provider.pk}/"
    first_read = client.get(url)["ETag"]
    assert (
        client.patch(url, {"name": "By Ann"}, format="json", HTTP_IF_MATCH=first_read).status_code
        == 200
    )

    late = client.patch(url, {"name": "By Bob"}, format="json", HTTP_IF_MATCH=first_read)

    assert late.status_code == 412
    assert late.json()["error"]["type"] == "precondition_failed_error"
    ours.provider.refresh_from_db()
    assert ours.provider.name == "By Ann"
    fresh = client.get(url)["ETag"]
    assert (
        client.patch(url, {"name": "By Bob"}, format="json", HTTP_IF_MATCH=fresh).status_code == 200
    )


@pytest.mark.parametrize(
    "base_url", ["http://10.0.0.5/v1", "http://127.0.0.1:11434/v1", "http://localhost:8000/v1"]
)
def test_a_private_network_base_url_is_refused(org, ours: Routing, settings, base_url) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = False
    client = token_client(org)

    added = client.post(
        "/api/v1/providers/",
        {"name": "Internal", "kind": "openai_compatible", "base_url": base_url},
        format="json",
    )
    moved = client.patch(
        f"/api/v1/providers/{ours.provider.pk}/", {"base_url": base_url}, format="json"
    )

    for response in (added, moved):
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "base_url"
        assert "private or local network" in response.json()["error"]["message"]
    assert not Provider.objects.filter(name="Internal").exists()
    ours.provider.refresh_from_db()
    assert ours.provider.base_url == ""


def test_a_private_base_url_is_accepted_where_the_operator_allows_it(org, settings) -> None:
    settings.TOLLGATE_PROVIDER_ALLOW_PRIVATE_NETWORKS = True
    added = token_client(org).post(
        "/api/v1/providers/",
        {"name": "Ollama", "kind": "ollama", "base_url": "http://127.0.0.1:11434/v1"},
        format="json",
    )
    assert added.status_code == 201, added.json()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"name": "Azure", "kind": "azure", "base_url": "https://x.openai.azure.com"},
            "api_version",
        ),
        ({"name": "Host", "kind": "openai_compatible"}, "base_url"),
        ({"name": "X", "kind": "not-a-kind"}, "kind"),
        ({"name": "X", "kind": "openai", "base_url": "ftp://files.example.com"}, "base_url"),
        ({"name": "X", "kind": "openai", "base_url": "http://[::1"}, "base_url"),
        ({"name": "X", "kind": "openai", "base_url": "https://example.com:99999/v1"}, "base_url"),
        ({"name": "X", "kind": "openai", "base_url": "https://u:p@example.com/v1"}, "base_url"),
        ({"name": "X", "kind": "openai", "enabled": "maybe"}, "enabled"),
        ({"kind": "openai"}, "name"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(org, body, param) -> None:
    response = token_client(org).post("/api/v1/providers/", body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param
    assert not Provider.objects.filter(org=org).exists()


def test_providers_filter_by_kind_and_order_by_name(org, ours: Routing) -> None:
    client = token_client(org)
    client.post(
        "/api/v1/providers/",
        {"name": "Anthropic", "kind": "anthropic", "enabled": False},
        format="json",
    )
    names = [p["name"] for p in client.get("/api/v1/providers/").json()["data"]]
    assert names == ["Anthropic", "OpenAI"]
    only = client.get("/api/v1/providers/", {"kind": "anthropic"}).json()["data"]
    assert [p["name"] for p in only] == ["Anthropic"]
    enabled = client.get("/api/v1/providers/", {"enabled": "true"}).json()["data"]
    assert [p["name"] for p in enabled] == ["OpenAI"]
