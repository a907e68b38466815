"""Org scope and roles across the whole management API, driven by its own schema: every
operation on an object of another org answers 404 and changes nothing. (A role that may not
make a change at all gets 403 first, for any id, so that answer reveals nothing either.)
Finance cannot issue keys or read provider credentials anywhere."""

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from drf_spectacular.generators import SchemaGenerator

from billing.models import AlertChannel, Statement
from routing.models import Deployment, Provider, Route
from tenants.api_tokens import api_token_create
from tenants.members import invitation_create
from tenants.models import AuditLog, Membership, Organization
from tenants.services import budget_create, team_create, virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, UserFactory
from tests.support.api import token_client

pytestmark = pytest.mark.django_db
UPSTREAM_SECRET = "sk-live-do-not-leak-0123456789"


def other_orgs_objects(org: Organization) -> dict[str, Any]:
    """One object of each kind the API can address, all in `org`."""
    team = team_create(org=org, slug="b-team", name="B team", actor=TEST_ACTOR)
    key = virtual_key_issue(org=org, team=team, name="b key", actor=TEST_ACTOR).key
    owner = UserFactory()
    membership = Membership.objects.create(user=owner, org=org, role="owner")
    invitation = invitation_create(
        org=org, role="member", actor=TEST_ACTOR, email="x@example.com"
    ).invitation
    budget = budget_create(org=org, scope="team", team=team, limit_nanos=10**9, actor=TEST_ACTOR)
    provider = Provider(org=org, name="b provider", kind=Provider.Kind.OPENAI)
    provider.set_api_key(UPSTREAM_SECRET)
    provider.save()
    deployment = Deployment.objects.create(provider=provider, name="b dep", upstream_model="gpt-x")
    route = Route.objects.create(org=org, model_name="b-model")
    route.deployments.add(deployment)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    statement = Statement.objects.create(
        org=org, month=date(2026, 1, 1), time_zone="UTC", period_start=start,
        period_end=start + timedelta(days=31), closed_at=start + timedelta(days=32),
    )  # fmt: skip
    channel = AlertChannel.objects.create(
        org=org, name="b alerts", kind=AlertChannel.Kind.EMAIL, recipients="b@example.com"
    )
    return {
        "alert-channels": channel, "teams": team, "keys": key, "members": membership,
        "invitations": invitation,
        "budgets": budget, "providers": provider, "deployments": deployment, "routes": route,
        "statements": statement, "audit": AuditLog.objects.filter(org=org).first(),
    }  # fmt: skip


def object_operations() -> list[tuple[str, str]]:
    """(method, path) of every schema operation that addresses one object by id."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return [
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if path.startswith("/api/v1/") and "{" in path
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


@pytest.mark.parametrize("role", ["admin", "finance", "read_only"])
def test_every_object_of_another_org_is_a_404_for_every_method(org, role) -> None:
    theirs = other_orgs_objects(OrganizationFactory(slug="org-b"))
    before = AuditLog.objects.filter(org__slug="org-b").count()
    client = token_client(org, role)
    operations = object_operations()
    assert len(operations) >= 15, operations  # the schema lists the object endpoints

    for method, path in operations:
        kind = path.removeprefix("/api/v1/").split("/")[0]
        assert theirs.get(kind) is not None, f"add an object of another org for {path}"
        url = re.sub(r"\{[^}]+\}", str(theirs[kind].pk), path, count=1)
        response = client.generic(method, url, "{}", content_type="application/json")
        if response.status_code == 403 and role != "admin" and method != "GET":
            missing = re.sub(r"\{[^}]+\}", "999999999", path, count=1)
            same = client.generic(method, missing, "{}", content_type="application/json")
            assert same.status_code == 403, (method, url)  # no hint the object exists
            continue
        assert response.status_code == 404, (method, url, response.status_code, response.content)
        assert response.json()["error"]["type"] == "not_found_error"

    assert AuditLog.objects.filter(org__slug="org-b").count() == before  # nothing changed


def test_finance_cannot_issue_keys_or_read_provider_credentials(org, team) -> None:
    provider = Provider(org=org, name="ours", kind=Provider.Kind.OPENAI)
    provider.set_api_key(UPSTREAM_SECRET)
    provider.save()
    finance = token_client(org, "finance")

    refused = finance.post("/api/v1/keys/", {"name": "sneaky", "team": team.pk}, format="json")

    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert not org.keys.filter(name="sneaky").exists()
    for url in ("/api/v1/providers/", f"/api/v1/providers/{provider.pk}/"):
        response = finance.get(url)
        assert response.status_code == 200
        assert UPSTREAM_SECRET not in response.content.decode()
        assert provider.api_key_encrypted not in response.content.decode()


def test_a_token_cannot_reach_another_org_by_naming_it(org) -> None:
    other = OrganizationFactory(slug="org-c")
    api_token_create(org=other, name="theirs", role="admin", actor=TEST_ACTOR)
    client = token_client(org, "admin")
    assert client.get("/api/v1/teams/", {"org": "org-c"}).status_code == 404
    assert client.get("/api/v1/keys/", {"org": "org-c"}).status_code == 404
