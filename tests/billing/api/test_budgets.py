"""Budgets over the management API: org scope, roles, standings, ETags and bad input.

Standings are read by async code that hands its database connection back, so these
tests commit (transaction=True) like a real request would.
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.models import AuditLog, Budget, Organization
from tenants.services import budget_create, virtual_key_issue, virtual_key_revoke
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.api import token_client
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db(transaction=True)
USD = 10**9


def a_budget(org: Organization, limit_usd: int = 10, **fields) -> Budget:  # type: ignore[no-untyped-def]
    scope = "team" if "team" in fields else "key" if "key" in fields else "org"
    return budget_create(
        org=org, scope=scope, limit_nanos=limit_usd * USD, actor=TEST_ACTOR, **fields
    )


def test_finance_creates_a_team_budget_in_dollars_and_reads_it_back(org, team) -> None:
    client = token_client(org, "finance")

    created = client.post(
        "/api/v1/budgets/",
        {"scope": "team", "team": team.pk, "limit_usd": "12.5", "period": "weekly",
         "enforcement": "soft", "soft_thresholds": [100, 80, 80]},
        format="json",
    )  # fmt: skip

    assert created.status_code == 201, created.json()
    body = created.json()
    assert body["team"] == team.pk and body["key"] is None and body["scope"] == "team"
    assert body["limit_nanos"] == 12_500_000_000 and body["limit_usd"] == "12.500000000"
    assert body["soft_thresholds"] == [80, 100]
    assert body["standing"]["spent_nanos"] == 0
    assert body["standing"]["remaining_nanos"] == 12_500_000_000
    assert body["standing"]["period_end"] is not None
    assert created["ETag"]
    read = client.get(f"/api/v1/budgets/{body['id']}/")
    assert read.status_code == 200 and read.json()["period"] == "weekly"
    assert read["ETag"] == created["ETag"]
    assert AuditLog.objects.filter(org=org, action="budget.create").exists()


def test_a_budget_stands_at_the_spend_in_the_ledger(org, team) -> None:
    monthly = a_budget(org, 10, team=team)
    lifetime = a_budget(org, 4, period="lifetime")
    record_usage(org, timezone.now() - timedelta(seconds=30), 3 * USD, team=team)
    record_usage(org, timezone.now() - timedelta(seconds=20), 2 * USD)  # no team

    listed = token_client(org, "read_only").get("/api/v1/budgets/").json()

    standings = {item["id"]: item["standing"] for item in listed["data"]}
    assert listed["total"] == 2
    assert standings[monthly.pk]["spent_nanos"] == 3 * USD
    assert standings[monthly.pk]["spent_usd"] == "3.000000000"
    assert standings[monthly.pk]["remaining_nanos"] == 7 * USD
    assert standings[lifetime.pk]["spent_nanos"] == 5 * USD  # the org's: every team
    assert standings[lifetime.pk]["remaining_nanos"] == 0  # overspent, never negative
    assert standings[lifetime.pk]["period_end"] is None
    assert standings[lifetime.pk]["forecast"]["projected_nanos"] is None
    assert standings[lifetime.pk]["forecast"]["exhausted_at"] is not None  # already


def test_the_list_filters_by_scope_team_and_key(org, team) -> None:
    key = virtual_key_issue(org=org, team=team, name="k", actor=TEST_ACTOR).key
    org_budget = a_budget(org)
    team_budget = a_budget(org, team=team)
    key_budget = a_budget(org, key=key)
    client = token_client(org, "read_only")

    def ids(**params) -> list[int]:  # type: ignore[no-untyped-def]
        response = client.get("/api/v1/budgets/", params)
        assert response.status_code == 200, response.json()
        return [item["id"] for item in response.json()["data"]]

    assert ids(scope="org") == [org_budget.pk]
    assert ids(team=team.pk) == [team_budget.pk]
    assert ids(key=key.pk) == [key_budget.pk]
    assert ids(ordering="-id") == sorted([org_budget.pk, team_budget.pk, key_budget.pk])[::-1]
    assert client.get("/api/v1/budgets/", {"team": "abc"}).status_code == 400
    assert client.get("/api/v1/budgets/", {"team": str(2**70)}).status_code == 400
    assert client.get("/api/v1/budgets/", {"scope": "galaxy"}).status_code == 400


def test_another_orgs_budget_is_a_404_for_every_method(org) -> None:
    other = a_budget(OrganizationFactory())
    client = token_client(org)
    for method in ("get", "patch", "delete"):
        response = getattr(client, method)(
            f"/api/v1/budgets/{other.pk}/", {"limit_usd": "1"}, format="json"
        )
        assert response.status_code == 404, method
        assert response.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/v1/budgets/").json()["total"] == 0
    other.refresh_from_db()
    assert other.limit_nanos == 10 * USD


def test_a_budget_naming_another_orgs_team_or_key_is_refused_naming_the_field(org) -> None:
    stranger = OrganizationFactory()
    their_team = TeamFactory(org=stranger)
    their_key = virtual_key_issue(org=stranger, name="theirs", actor=TEST_ACTOR).key
    client = token_client(org)

    for scope, target in (("team", their_team.pk), ("key", their_key.pk)):
        response = client.post(
            "/api/v1/budgets/", {"scope": scope, scope: target, "limit_usd": "1"}, format="json"
        )
        assert response.status_code == 400, scope
        assert response.json()["error"]["param"] == scope
        assert "in this organization" in response.json()["error"]["message"]
    assert not Budget.objects.exists()


def test_a_revoked_key_and_a_target_the_scope_does_not_name_are_refused(org, team) -> None:
    issued = virtual_key_issue(org=org, name="old", actor=TEST_ACTOR)
    virtual_key_revoke(key=issued.key, actor=TEST_ACTOR)
    client = token_client(org)

    revoked = client.post(
        "/api/v1/budgets/", {"scope": "key", "key": issued.key.pk, "limit_usd": "1"}, format="json"
    )
    stray_team = client.post(
        "/api/v1/budgets/", {"scope": "org", "team": team.pk, "limit_usd": "1"}, format="json"
    )
    no_team = client.post("/api/v1/budgets/", {"scope": "team", "limit_usd": "1"}, format="json")

    assert revoked.status_code == 400 and revoked.json()["error"]["param"] == "key"
    assert stray_team.status_code == 400 and stray_team.json()["error"]["param"] == "team"
    assert no_team.status_code == 400 and no_team.json()["error"]["param"] == "team"
    assert not Budget.objects.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scope": "org"}, "limit_usd"),
        ({"scope": "org", "limit_usd": "0.0000000001"}, "limit_usd"),  # 10 places
        ({"scope": "org", "limit_usd": "-1"}, "limit_usd"),
        ({"scope": "org", "limit_usd": "NaN"}, "limit_usd"),
        ({"scope": "org", "limit_usd": "1e30"}, "limit_usd"),
        ({"scope": "org", "limit_nanos": 0}, "limit_nanos"),
        ({"scope": "org", "limit_nanos": 2**80}, "limit_nanos"),
        ({"scope": "org", "limit_usd": "1", "limit_nanos": 5}, "limit_usd"),
        ({"scope": "org", "limit_usd": "1", "soft_thresholds": "50"}, "soft_thresholds"),
        ({"scope": "org", "limit_usd": "1", "soft_thresholds": [101]}, "soft_thresholds"),
        ({"scope": "org", "limit_usd": "1", "period": "yearly"}, "period"),
        ({"scope": "galaxy", "limit_usd": "1"}, "scope"),
        ({"scope": "team", "team": True, "limit_usd": "1"}, "team"),
        ({"scope": "team", "team": 2**70, "limit_usd": "1"}, "team"),
    ],
)
def test_bad_budget_input_gets_a_400_naming_the_field(org, body, param) -> None:
    response = token_client(org).post("/api/v1/budgets/", body, format="json")
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param
    assert not Budget.objects.exists()


def test_a_missing_or_non_object_body_is_a_400(org) -> None:
    client = token_client(org)
    assert client.post("/api/v1/budgets/", "{", content_type="application/json").status_code == 400
    assert client.post("/api/v1/budgets/", [1, 2], format="json").status_code == 400
    assert client.post("/api/v1/budgets/").status_code == 400


def test_read_only_cannot_create_change_or_delete_budgets_but_finance_can(org) -> None:
    budget = a_budget(org)
    read_only = token_client(org, "read_only")
    assert read_only.get(f"/api/v1/budgets/{budget.pk}/").status_code == 200
    refused = read_only.post("/api/v1/budgets/", {"scope": "org", "limit_usd": "1"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert read_only.patch(f"/api/v1/budgets/{budget.pk}/", {}, format="json").status_code == 403
    assert read_only.delete(f"/api/v1/budgets/{budget.pk}/").status_code == 403
    assert Budget.objects.count() == 1

    finance = token_client(org, "finance")
    changed = finance.patch(f"/api/v1/budgets/{budget.pk}/", {"limit_nanos": 5}, format="json")
    assert changed.status_code == 200 and changed.json()["limit_nanos"] == 5
    assert finance.delete(f"/api/v1/budgets/{budget.pk}/").status_code == 204
    assert not Budget.objects.exists()


def test_patch_changes_only_what_it_is_sent_and_never_the_target(org, team) -> None:
    budget = a_budget(org, 10, team=team, enforcement="soft", soft_thresholds=[90])
    client = token_client(org)

    changed = client.patch(f"/api/v1/budgets/{budget.pk}/", {"limit_usd": 20}, format="json")
    retarget = client.patch(f"/api/v1/budgets/{budget.pk}/", {"scope": "org"}, format="json")

    assert changed.status_code == 200, changed.json()
    assert changed.json()["limit_usd"] == "20.000000000"
    assert changed.json()["enforcement"] == "soft" and changed.json()["soft_thresholds"] == [90]
    assert retarget.status_code == 400 and retarget.json()["error"]["param"] == "scope"
    budget.refresh_from_db()
    assert (budget.scope, budget.team_id, budget.limit_nanos) == ("team", team.pk, 20 * USD)


def test_a_stale_etag_is_refused_with_412_and_nothing_changes(org) -> None:
    budget = a_budget(org)
    client = token_client(org)
    first_read = client.get(f"/api/v1/budgets/{budget.pk}/")["ETag"]
    assert (
        client.patch(
            f"/api/v1/budgets/{budget.pk}/", {"limit_usd": "11"}, format="json",
            HTTP_IF_MATCH=first_read,
        ).status_code
        == 200
    )  # fmt: skip

    late = client.patch(
        f"/api/v1/budgets/{budget.pk}/", {"limit_usd": "99"}, format="json",
        HTTP_IF_MATCH=first_read,
    )  # fmt: skip
    late_delete = client.delete(f"/api/v1/budgets/{budget.pk}/", HTTP_IF_MATCH=first_read)

    assert late.status_code == 412 and late_delete.status_code == 412
    assert late.json()["error"]["type"] == "precondition_failed_error"
    budget.refresh_from_db()
    assert budget.limit_nanos == 11 * USD
