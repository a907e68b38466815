"""The caller's organization over the management API."""

import pytest

from tenants.models import AuditLog
from tests.factories import OrganizationFactory
from tests.support.api import token_client

pytestmark = pytest.mark.django_db


def test_an_admin_changes_the_time_zone_body_logging_and_limits(org) -> None:
    client = token_client(org)
    etag = client.get("/api/v1/organization/")["ETag"]

    changed = client.patch(
        "/api/v1/organization/",
        {"time_zone": "Asia/Kolkata", "log_request_bodies": True, "rpm_limit": 600},
        format="json", HTTP_IF_MATCH=etag,
    )  # fmt: skip

    assert changed.status_code == 200, changed.json()
    org.refresh_from_db()
    assert (org.time_zone, org.log_request_bodies, org.rpm_limit) == ("Asia/Kolkata", True, 600)
    assert org.name == changed.json()["name"]  # untouched
    actions = set(AuditLog.objects.filter(org=org).values_list("action", flat=True))
    assert {"organization.update", "organization.limits"} <= actions
    stale = client.patch("/api/v1/organization/", {"name": "X"}, format="json", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412


def test_it_is_always_the_tokens_own_organization(org) -> None:
    other = OrganizationFactory(slug="other-org")
    client = token_client(org, "read_only")
    assert client.get("/api/v1/organization/").json()["slug"] == org.slug
    assert client.get("/api/v1/organization/", {"org": "other-org"}).status_code == 404
    assert client.patch("/api/v1/organization/", {"name": "Mine"}, format="json").status_code == 403
    other.refresh_from_db()
    assert other.name != "Mine"


def test_an_unknown_time_zone_is_a_400_naming_it(org) -> None:
    response = token_client(org).patch(
        "/api/v1/organization/", {"time_zone": "Mars/Olympus"}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "time_zone"
