"""Routes over the management API: the org's own deployments only, roles, ETags."""

import pytest

from routing.models import Route
from tests.routing.api.conftest import Routing, routing_of
from tests.support.api import token_client

pytestmark = pytest.mark.django_db


def test_an_admin_publishes_and_changes_a_route(org, ours: Routing) -> None:
    backup = routing_of(org, name="Backup").deployment
    client = token_client(org)

    created = client.post(
        "/api/v1/routes/",
        {
            "model_name": "smart", "strategy": "weighted",
            "deployments": [ours.deployment.pk, backup.pk, backup.pk],
            "fallback_models": ["OpenAI-fast"], "variant_deployment": backup.pk,
            "variant_percent": 10,
        },
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    assert sorted(body["deployments"]) == sorted([ours.deployment.pk, backup.pk])
    assert body["strategy"] == "weighted" and body["fallback_models"] == ["OpenAI-fast"]
    assert body["variant_deployment"] == backup.pk and body["shadow_deployment"] is None
    assert body["max_attempts"] == 3, "the model's default"
    url = f"/api/v1/routes/{body['id']}/"
    read = client.get(url)
    changed = client.patch(
        url, {"deployments": [backup.pk], "max_attempts": 2}, format="json",
        HTTP_IF_MATCH=read["ETag"],
    )  # fmt: skip
    assert changed.status_code == 200, changed.json()
    assert changed.json()["deployments"] == [backup.pk] and changed.json()["max_attempts"] == 2
    assert changed.json()["strategy"] == "weighted", "PATCH keeps what it was not sent"
    route = Route.objects.get(pk=body["id"])
    assert list(route.deployments.all()) == [backup] and route.org == org
    listed = client.get("/api/v1/routes/", {"model_name": "smart"}).json()["data"]
    assert [r["id"] for r in listed] == [body["id"]]


@pytest.mark.parametrize("field", ["deployments", "variant_deployment", "shadow_deployment"])
def test_a_route_naming_another_orgs_deployment_is_refused(
    org, ours: Routing, theirs: Routing, field
) -> None:
    client = token_client(org)
    foreign = [theirs.deployment.pk] if field == "deployments" else theirs.deployment.pk
    mixed = [ours.deployment.pk, theirs.deployment.pk] if field == "deployments" else foreign

    added = client.post(
        "/api/v1/routes/",
        {"model_name": "stolen", "deployments": [ours.deployment.pk], field: mixed},
        format="json",
    )
    changed = client.patch(f"/api/v1/routes/{ours.route.pk}/", {field: foreign}, format="json")

    for response in (added, changed):
        assert response.status_code == 400, response.json()
        assert response.json()["error"]["param"] == field
    assert not Route.objects.filter(model_name="stolen").exists()
    assert list(ours.route.deployments.all()) == [ours.deployment]


def test_another_orgs_route_is_a_404_for_every_method(org, theirs: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/routes/{theirs.route.pk}/"
    assert client.get(url).status_code == 404
    assert client.patch(url, {"enabled": False}, format="json").status_code == 404
    assert client.get("/api/v1/routes/").json()["data"] == []
    theirs.route.refresh_from_db()
    assert theirs.route.enabled


def test_a_global_route_is_not_listed_or_changeable(org) -> None:
    shared = Route.objects.create(org=None, model_name="everyone")
    client = token_client(org)
    assert client.get(f"/api/v1/routes/{shared.pk}/").status_code == 404
    assert client.patch(f"/api/v1/routes/{shared.pk}/", {}, format="json").status_code == 404
    assert client.get("/api/v1/routes/").json()["data"] == []


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_read_routes_but_cannot_change_them(
    org, ours: Routing, role
) -> None:
    client = token_client(org, role)
    assert client.get("/api/v1/routes/").status_code == 200
    added = client.post(
        "/api/v1/routes/",
        {"model_name": "x", "deployments": [ours.deployment.pk]},
        format="json",
    )
    changed = client.patch(f"/api/v1/routes/{ours.route.pk}/", {"enabled": False}, format="json")
    assert added.status_code == 403 and changed.status_code == 403
    assert Route.objects.count() == 1


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org, ours: Routing) -> None:
    client = token_client(org)
    url = f"/api/v1/routes/{ours.route.pk}/"
    first_read = client.get(url)["ETag"]
    ann = client.patch(url, {"deadline_ms": 30_000}, format="json", HTTP_IF_MATCH=first_read)
    assert ann.status_code == 200

    bob = client.patch(url, {"deadline_ms": 60_000}, format="json", HTTP_IF_MATCH=first_read)

    assert bob.status_code == 412
    ours.route.refresh_from_db()
    assert ours.route.deadline_ms == 30_000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model_name": "OpenAI-fast"}, "model_name"),
        ({"deployments": str(0)}, "deployments"),
        ({"deployments": []}, "deployments"),
        ({"deployments": ["one"]}, "deployments"),
        ({"fallback_models": "gpt-4o"}, "fallback_models"),
        ({"fallback_models": ["OpenAI-fast"]}, "fallback_models"),
        ({"strategy": "cheapest-ish"}, "strategy"),
        ({"variant_percent": 101}, "variant_percent"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_bad_changes_are_a_400_naming_the_field(org, ours: Routing, body, param) -> None:
    routing_of(org, name="Other")  # so that "OpenAI-fast" is taken by another route
    url = f"/api/v1/routes/{ours.route.pk}/"
    if "model_name" in body:
        url = f"/api/v1/routes/{Route.objects.get(model_name='Other-fast').pk}/"
    response = token_client(org).patch(url, body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"].startswith(param)
    assert list(ours.route.deployments.all()) == [ours.deployment]


def test_a_route_needs_deployments_and_a_name(org) -> None:
    response = token_client(org).post("/api/v1/routes/", {}, format="json")
    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == {"model_name", "deployments"}
