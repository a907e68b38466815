"""Deployment health over API tokens: admins of the org only, its own deployments only."""

import pytest

from tests.routing.api.conftest import Routing
from tests.support.api import token_client

pytestmark = pytest.mark.django_db


def test_an_admin_token_sees_its_orgs_deployments_only(org, ours: Routing, theirs: Routing) -> None:
    response = token_client(org).get("/api/v1/deployments/health/")

    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["object"] == "list" and body["organization"] == org.slug
    [row] = body["data"]
    assert row["id"] == ours.deployment.pk and row["routes"] == ["OpenAI-fast"]
    assert row["provider"] == "OpenAI" and row["circuit"] == "closed" and not row["live"]


@pytest.mark.parametrize("role", ["finance", "read_only"])
def test_finance_and_read_only_tokens_may_not_see_deployment_health(org, role) -> None:
    response = token_client(org, role).get("/api/v1/deployments/health/")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_naming_another_org_is_a_404(org, theirs: Routing) -> None:
    other_slug = theirs.provider.org.slug
    response = token_client(org).get("/api/v1/deployments/health/", {"org": other_slug})
    assert response.status_code == 404
