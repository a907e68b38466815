"""Budgets pages: standings from the counters with forecasts, settings for admins only.

The pages read standings through async code that hands its database connection
back, so these tests commit (transaction=True) like a real request would.
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.models import AuditLog, Budget, Organization, Team
from tenants.services import budget_create, virtual_key_issue
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.dashboard import signed_in_as
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db(transaction=True)
USD = 10**9


def url(org: Organization, suffix: str = "") -> str:
    return f"/dashboard/budgets/{suffix}?org={org.slug}"


def page(response) -> str:  # type: ignore[no-untyped-def]
    return response.content.decode()


@pytest.fixture
def acme(db: None) -> Organization:
    return OrganizationFactory(slug="acme", name="Acme", time_zone="Europe/Berlin")


@pytest.fixture
def search(acme: Organization) -> Team:
    return TeamFactory(org=acme, name="Search")


@pytest.fixture
def ads(acme: Organization) -> Team:
    return TeamFactory(org=acme, name="Ads")


def budget(org: Organization, limit_usd: int = 10, **fields) -> Budget:  # type: ignore[no-untyped-def]
    scope = "team" if "team" in fields else "key" if "key" in fields else "org"
    return budget_create(
        org=org, scope=scope, limit_nanos=limit_usd * USD, actor=TEST_ACTOR, **fields
    )


# ------------------------------------------------------------------ list


def test_the_list_shows_settled_spend_remaining_and_reset_in_the_orgs_time_zone(
    acme: Organization, search: Team
) -> None:
    budget(acme, 10)
    budget(acme, 4, team=search, period="lifetime", enforcement="soft")
    record_usage(acme, timezone.now() - timedelta(seconds=30), 3 * USD, team=search)
    html = page(signed_in_as("finance", acme).get(url(acme)))
    assert 'id="budgets-table"' in html and "Organization" in html and "Team Search" in html
    assert "Settled $3.00" in html and "Reserved $0.00" in html
    assert "$7.00" in html and "$1.00" in html  # remaining of $10 and of $4
    assert "75.0% of $4.00" in html and 'style="width: 30.0%"' in html
    assert "CET" in html or "CEST" in html  # the monthly reset, in Berlin time
    assert "Never (lifetime)" in html and "Soft" in html and "Hard" in html
    assert "New budget" not in html


def test_a_budget_past_its_limit_says_so_in_words(acme: Organization) -> None:
    budget(acme, 1)
    record_usage(acme, timezone.now() - timedelta(seconds=30), 2 * USD)
    html = page(signed_in_as("owner", acme).get(url(acme)))
    assert "Limit reached" in html and 'style="width: 100.0%"' in html and "Runs out" in html


def test_a_member_sees_the_orgs_and_their_teams_budgets_read_only(
    acme: Organization, search: Team, ads: Team
) -> None:
    budget(acme, 100)
    budget(acme, 5, team=search)
    budget(acme, 6, team=ads)
    own_key = virtual_key_issue(org=acme, name="mine", team=search, actor=TEST_ACTOR).key
    their_key = virtual_key_issue(org=acme, name="theirs", team=ads, actor=TEST_ACTOR).key
    budget(acme, 7, key=own_key)
    hidden = budget(acme, 8, key=their_key)
    client = signed_in_as("member", acme, team=search)
    html = page(client.get(url(acme)))
    assert "$100.00" in html and "Team Search" in html and "Key mine" in html
    assert "Team Ads" not in html and "theirs" not in html
    assert "New budget" not in html and "Delete budget" not in html
    assert client.get(url(acme, f"{hidden.pk}/")).status_code == 404


def test_no_budgets_yet_tells_an_admin_what_to_do(acme: Organization) -> None:
    html = page(signed_in_as("admin", acme).get(url(acme)))
    assert "No budgets yet" in html and "New budget" in html
    other = OrganizationFactory()
    budget(other, 3)
    assert "No budgets yet" in page(signed_in_as("owner", acme).get(url(acme)))


# ------------------------------------------------------------------ create


def test_an_admin_creates_a_team_budget_with_an_exact_limit(
    acme: Organization, search: Team
) -> None:
    client = signed_in_as("admin", acme)
    form = page(client.get(url(acme, "new/")))
    for label in ("Scope", "Period", "Limit (USD)", "Enforcement", "Alert thresholds"):
        assert f">{label}</label>" in form
    assert "Create budget" in form and "Settings" in form
    response = client.post(
        url(acme, "new/"),
        {
            "scope": "team", "team": search.pk, "period": "weekly", "limit_usd": "12.345678901",
            "enforcement": "soft", "thresholds": "80, 50 ,100",
        },
    )  # fmt: skip
    created = Budget.objects.get()
    assert response.status_code == 302 and response.url == url(acme, f"{created.pk}/")
    assert (created.scope, created.team, created.period, created.enforcement) == (
        "team", search, "weekly", "soft",
    )  # fmt: skip
    assert created.limit_nanos == 12_345_678_901 and created.soft_thresholds == [50, 80, 100]
    assert AuditLog.objects.filter(action="budget.create", target_id=str(created.pk)).exists()
    assert "Team Search" in page(client.get(response.url))


def test_bad_budget_input_is_shown_on_the_fields(acme: Organization) -> None:
    other_team = TeamFactory(org=OrganizationFactory())
    client = signed_in_as("owner", acme)
    cases = [
        ({"limit_usd": "0"}, "greater than or equal to"),
        ({"limit_usd": "1.0000000001"}, "no more than 9 decimal places"),
        ({"thresholds": "50, 120"}, "Give whole percentages from 1 to 100"),
        ({"scope": "team"}, "Pick the team this budget limits."),
        ({"scope": "key"}, "Pick the key this budget limits."),
        ({"scope": "team", "team": other_team.pk}, "Select a valid choice."),
    ]
    for change, error in cases:
        data = {"scope": "org", "period": "monthly", "limit_usd": "5", "enforcement": "hard"}
        response = client.post(url(acme, "new/"), {**data, **change})
        assert response.status_code == 400 and error in page(response), change
        assert 'aria-invalid="true"' in page(response)
    assert not Budget.objects.exists()


def test_finance_and_members_may_not_create_edit_or_delete(
    acme: Organization, search: Team
) -> None:
    existing = budget(acme, 5)
    data = {"scope": "org", "period": "monthly", "limit_usd": "1", "enforcement": "hard"}
    for client in (signed_in_as("finance", acme), signed_in_as("member", acme, team=search)):
        assert client.get(url(acme, "new/")).status_code == 403
        assert client.post(url(acme, "new/"), data).status_code == 403
        assert client.post(url(acme, f"{existing.pk}/edit/"), data).status_code == 403
        assert client.post(url(acme, f"{existing.pk}/delete/")).status_code == 403
        detail = page(client.get(url(acme, f"{existing.pk}/")))
        assert "Save budget" not in detail and "Delete budget" not in detail
    assert Budget.objects.get().limit_nanos == 5 * USD


# ------------------------------------------------------------------ detail, edit, delete


def test_an_admin_edits_a_budget_and_it_is_audited(acme: Organization) -> None:
    existing = budget(acme, 5)
    client = signed_in_as("admin", acme)
    assert "Save budget" in page(client.get(url(acme, f"{existing.pk}/")))
    response = client.post(
        url(acme, f"{existing.pk}/edit/"),
        {"period": "daily", "limit_usd": "2.5", "enforcement": "soft", "thresholds": "90"},
    )
    existing.refresh_from_db()
    assert response.status_code == 302
    assert (existing.period, existing.limit_nanos, existing.soft_thresholds) == (
        "daily", 2_500_000_000, [90],
    )  # fmt: skip
    entry = AuditLog.objects.get(action="budget.update")
    assert entry.before["limit_nanos"] == 5 * USD and entry.after["limit_nanos"] == 2_500_000_000


def test_an_invalid_edit_changes_nothing(acme: Organization) -> None:
    existing = budget(acme, 5)
    response = signed_in_as("owner", acme).post(
        url(acme, f"{existing.pk}/edit/"),
        {"period": "daily", "limit_usd": "-1", "enforcement": "hard", "thresholds": ""},
    )
    assert response.status_code == 400 and 'aria-invalid="true"' in page(response)
    assert Budget.objects.get().limit_nanos == 5 * USD


def test_an_admin_deletes_a_budget(acme: Organization) -> None:
    existing = budget(acme, 5)
    response = signed_in_as("owner", acme).post(url(acme, f"{existing.pk}/delete/"))
    assert response.status_code == 302 and response.url == url(acme)
    assert not Budget.objects.exists()
    assert AuditLog.objects.filter(action="budget.delete").exists()


def test_another_orgs_budget_is_not_found(acme: Organization) -> None:
    foreign = budget(OrganizationFactory(), 5)
    client = signed_in_as("owner", acme)
    assert client.get(url(acme, f"{foreign.pk}/")).status_code == 404
    assert client.post(url(acme, f"{foreign.pk}/delete/")).status_code == 404
    assert client.post(url(acme, f"{foreign.pk}/edit/"), {"limit_usd": "1"}).status_code == 404
    assert Budget.objects.get().limit_nanos == 5 * USD


def test_the_detail_page_shows_the_forecast(acme: Organization) -> None:
    # A lifetime budget created long ago burns at its average rate since creation.
    existing = budget(acme, 100, period="lifetime")
    Budget.objects.filter(pk=existing.pk).update(created_at=timezone.now() - timedelta(days=10))
    record_usage(acme, timezone.now() - timedelta(days=5), 10 * USD)
    html = page(signed_in_as("finance", acme).get(url(acme, f"{existing.pk}/")))
    assert "Runs out" in html and "Settled" in html and "$10.000000" in html
