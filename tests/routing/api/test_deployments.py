"""Deployments over the management API: the org's own providers only, roles, ETags."""

import pytest

from routing.models import Deployment, Provider
from tests.routing.api.conftest import Routing, routing_of
from tests.support.api import token_client

pytestmark = pytest.mark.django_db


def test_an_admin_adds_and_tunes_a_deployment(org, ours: Routing) -> None:
    client = token_client(org)

    created = client.post(
        "/api/v1/deployments/",
        {
            "provider": ours.provider.pk, "name": "4o-eastus", "upstream_model": "gpt-4o",
            "weight": 3, "rpm_limit": 600, "ttft_timeout_ms": 20_000,
        },
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["provider"] == ours.provider.pk and body["weight"] == 3
    assert body["rpm_limit"] == 600 and body["tpm_limit"] is None
    assert body["connect_timeout_ms"] == 5_000, "the model's default"
    url = f"/api/v1/deployments/{body['id']}/"
    read = client.get(url)
    changed = client.patch(
        url, {"priority": 2, "rpm_limit": None}, format="json", HTTP_IF_MATCH=read["ETag"]
    )
    assert changed.status_code == 200, changed.json()
    assert changed.json()["priority"] == 2 and changed.json()["rpm_limit"] is None
    assert changed.json()["weight"] == 3, "PATCH keeps what it was not sent"
    assert changed["ETag"] != read["ETag"]


def test_deployments_filter_by_provider_enabled_and_upstream_model(org, ours: Routing) -> None:
    other = routing_of(org, name="Backup")
    Deployment.objects.filter(pk=other.deployment.pk).update(enabled=False, upstream_model="o3")
    client = token_client(org)

    def names(**query: object) -> list[str]:
        response = client.get("/api/v1/deployments/", query)
        assert response.status_code == 200, response.json()
        return sorted(d["name"] for d in response.json()["data"])

    assert names() == ["Backup mini", "OpenAI mini"]
    assert names(provider=ours.provider.pk) == ["OpenAI mini"]
    assert names(enabled="false") == ["Backup mini"]
    assert names(upstream_model="gpt-4o-mini") == ["OpenAI mini"]
    assert names(ordering="-name") == ["Backup mini", "OpenAI mini"]
    assert client.get("/api/v1/deployments/", {"provider": "x"}).status_code == 400


def test_a_deployment_on_another_orgs_provider_is_refused_naming_the_provider(
    org, theirs: Routing
) -> None:
    platform = Provider.objects.create(org=None, name="Platform", kind="openai")
    client = token_client(org)
    for provider_id in (theirs.provider.pk, platform.pk, 10**12):
        response = client.post(
            "/api/v1/deployments/",
            {"provider": provider_id, "name": "stolen", "upstream_model": "gpt-4o"},
            format="json",
        )
        assert response.status_code == 400, provider_id
        assert response.json()["error"]["param"] == "provider"
    assert not Deployment.objects.filter(name="stolen").exists()


def test_another_orgs_deployment_is_a_404_for_every_method(org, theirs: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/deployments/{theirs.deployment.pk}/"
    assert client.get(url).status_code == 404
    assert client.patch(url, {"weight": 99}, format="json").status_code == 404
    assert client.get("/api/v1/deployments/").json()["data"] == []
    filtered = client.get("/api/v1/deployments/", {"provider": theirs.provider.pk})
    assert filtered.status_code == 200 and filtered.json()["data"] == []
    theirs.deployment.refresh_from_db()
    assert theirs.deployment.weight == 1


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_read_deployments_but_cannot_change_them(
    org, ours: Routing, role
) -> None:
    client = token_client(org, role)
    assert client.get(f"/api/v1/deployments/{ours.deployment.pk}/").status_code == 200
    added = client.post(
        "/api/v1/deployments/",
        {"provider": ours.provider.pk, "name": "x", "upstream_model": "x"},
        format="json",
    )
    changed = client.patch(
        f"/api/v1/deployments/{ours.deployment.pk}/", {"enabled": False}, format="json"
    )
    assert added.status_code == 403 and changed.status_code == 403
    ours.deployment.refresh_from_db()
    assert ours.deployment.enabled and Deployment.objects.count() == 1


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org, ours: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/deployments/{ours.deployment.pk}/"
    first_read = client.get(url)["ETag"]
    ann = client.patch(url, {"weight": 5}, format="json", HTTP_IF_MATCH=first_read)
    assert ann.status_code == 200

    bob = client.patch(url, {"weight": 7}, format="json", HTTP_IF_MATCH=first_read)

    assert bob.status_code == 412
    ours.deployment.refresh_from_db()
    assert ours.deployment.weight == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"connect_timeout_ms": 0}, "connect_timeout_ms"),
        ({"weight": -1}, "weight"),
        ({"rpm_limit": 2**40}, "rpm_limit"),
        ({"priority": "first"}, "priority"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_changes_are_a_400_naming_the_field(org, ours: Routing, body, param) -> None:
    response = token_client(org).patch(
        f"/api/v1/deployments/{ours.deployment.pk}/", body, format="json"
    )
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param


def test_a_second_deployment_with_the_same_name_on_a_provider_is_a_400(org, ours: Routing) -> None:
    response = token_client(org).post(
        "/api/v1/deployments/",
        {"provider": ours.provider.pk, "name": ours.deployment.name, "upstream_model": "gpt-4o"},
        format="json",
    )
    assert response.status_code == 400
    assert Deployment.objects.filter(provider=ours.provider).count() == 1
