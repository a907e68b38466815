"""Keys pages: who sees and changes which keys, and a secret shown exactly once."""

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from billing.models import UsageEvent
from billing.rollups import rollups_refresh
from tenants.keys import key_matches
from tenants.models import AuditLog, Budget, Organization, Team, VirtualKey
from tenants.services import virtual_key_issue, virtual_key_revoke
from tests.conftest import TEST_ACTOR
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.dashboard import signed_in_as
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db
SECRET = re.compile(r'<code id="new-key-secret">(tgk_[0-9A-Za-z_]+)</code>')


def url(org: Organization, suffix: str = "") -> str:
    return f"/dashboard/keys/{suffix}?org={org.slug}"


def issue(org: Organization, name: str = "ci", **fields) -> VirtualKey:  # type: ignore[no-untyped-def]
    return virtual_key_issue(org=org, name=name, actor=TEST_ACTOR, **fields).key


def page(response) -> str:  # type: ignore[no-untyped-def]
    return response.content.decode()


@pytest.fixture
def acme(db: None) -> Organization:
    return OrganizationFactory(slug="acme", name="Acme")


@pytest.fixture
def search(acme: Organization) -> Team:
    return TeamFactory(org=acme, name="Search")


@pytest.fixture
def ads(acme: Organization) -> Team:
    return TeamFactory(org=acme, name="Ads")


# ------------------------------------------------------------------ list


def test_admins_and_finance_see_every_key_with_status_and_limits(
    acme: Organization, search: Team, ads: Team
) -> None:
    issue(acme, "search-bot", team=search, rpm_limit=60, tpm_limit=9000, allowed_models=["m1"])
    issue(acme, "ads-bot", team=ads, expires_at=timezone.now() + timedelta(seconds=1))
    virtual_key_revoke(key=issue(acme, "old-bot"), actor=TEST_ACTOR)
    VirtualKey.objects.filter(name="ads-bot").update(expires_at=timezone.now() - timedelta(days=1))
    for role in ("owner", "admin", "finance"):
        html = page(signed_in_as(role, acme).get(url(acme)))
        assert 'id="keys-table"' in html
        assert all(name in html for name in ("search-bot", "ads-bot", "old-bot"))
        assert ">Active<" in html and ">Expired<" in html and ">Revoked<" in html
        assert "60 / 9000" in html and "m1" in html
        assert ("New key" in html) is (role != "finance")


def test_a_member_sees_only_their_teams_keys(acme: Organization, search: Team, ads: Team) -> None:
    issue(acme, "search-bot", team=search)
    issue(acme, "ads-bot", team=ads)
    html = page(signed_in_as("member", acme, team=search).get(url(acme)))
    assert "search-bot" in html and "ads-bot" not in html and "New key" in html


def test_a_member_without_a_team_sees_no_keys_and_is_told_to_ask_an_admin(
    acme: Organization, search: Team
) -> None:
    issue(acme, "search-bot", team=search)
    client = signed_in_as("member", acme)
    html = page(client.get(url(acme)))
    assert "search-bot" not in html and "Ask an admin" in html and "New key" not in html
    assert client.get(url(acme, "new/")).status_code == 403


def test_another_orgs_keys_never_show(acme: Organization) -> None:
    other = OrganizationFactory()
    issue(other, "their-bot")
    html = page(signed_in_as("owner", acme).get(url(acme)))
    assert "their-bot" not in html and "No keys yet" in html


def test_the_list_filters_by_status_and_team(acme: Organization, search: Team, ads: Team) -> None:
    issue(acme, "search-bot", team=search)
    issue(acme, "ads-bot", team=ads)
    virtual_key_revoke(key=issue(acme, "old-bot", team=search), actor=TEST_ACTOR)
    client = signed_in_as("admin", acme)
    revoked = page(client.get(url(acme) + "&status=revoked"))
    assert "old-bot" in revoked and "search-bot" not in revoked
    by_team = page(client.get(url(acme) + f"&team={search.pk}&status=active"))
    assert "search-bot" in by_team and "ads-bot" not in by_team and "old-bot" not in by_team


def test_the_list_shows_this_months_spend_per_key_from_the_rollups(
    acme: Organization,
) -> None:
    key = issue(acme, "search-bot")
    record_usage(acme, timezone.now() - timedelta(minutes=5), 1_250_000_000)
    # record_usage writes no key: attribute the event to ours, then roll it up.
    UsageEvent.objects.update(key_id=key.pk)
    rollups_refresh()
    html = page(signed_in_as("finance", acme).get(url(acme)))
    assert "$1.25" in html


def test_the_list_pages_by_fifty_in_a_fixed_number_of_queries(
    acme: Organization, search: Team, django_assert_max_num_queries
) -> None:
    for number in range(120):
        issue(acme, f"bot-{number:03}", team=search)
    client = signed_in_as("owner", acme)
    client.get(url(acme))  # warm the session
    # Session, user, membership, teams (filter), count, one page of keys, their spend.
    with django_assert_max_num_queries(7):
        first = page(client.get(url(acme)))
    assert first.count("data-key-id=") == 50 and "Page 1 of 3" in first
    last = page(client.get(url(acme) + "&page=3"))
    assert last.count("data-key-id=") == 20 and "bot-000" in last


# ------------------------------------------------------------------ create, secret once


def test_creating_a_key_shows_its_secret_once_with_a_copy_button(
    acme: Organization, search: Team
) -> None:
    client = signed_in_as("admin", acme)
    form = page(client.get(url(acme, "new/")))
    assert 'for="id_name">Name<' in form and 'for="id_team">Team<' in form and "Create key" in form
    assert f'<option value="{search.pk}">Search</option>' in form
    response = client.post(
        url(acme, "new/"),
        {"name": "ci", "team": search.pk, "allowed_models": "m1, m2\nm3", "rpm_limit": "30"},
    )
    key = VirtualKey.objects.get()
    assert response.status_code == 302 and response.url == url(acme, f"{key.pk}/")
    shown = client.get(response.url)
    assert shown["Cache-Control"] == "no-store"
    secret = SECRET.search(page(shown)).group(1)
    assert key_matches(secret, key.secret_hash) and secret.startswith(key.prefix)
    assert 'data-copy="#new-key-secret"' in page(shown) and ">Copy<" in page(shown)
    assert "http://testserver/v1" in page(shown)
    assert (key.team, key.allowed_models, key.rpm_limit) == (search, ["m1", "m2", "m3"], 30)
    # Reloaded, the page no longer has it, nor anything else shows it.
    again = page(client.get(response.url))
    assert secret not in again and "new-key-secret" not in again
    assert secret not in page(client.get(url(acme)))
    entry = AuditLog.objects.get(action="virtual_key.issue")
    assert secret not in str(entry.after)


@pytest.mark.django_db(transaction=True)
def test_a_key_created_with_a_monthly_budget_shows_it_on_its_page(acme: Organization) -> None:
    client = signed_in_as("owner", acme)
    response = client.post(url(acme, "new/"), {"name": "ci", "monthly_budget_usd": "12.5"})
    budget = Budget.objects.get()
    assert (budget.scope, budget.period, budget.enforcement) == ("key", "monthly", "hard")
    assert budget.limit_nanos == 12_500_000_000
    html = page(client.get(response.url))
    assert "Key ci" in html and "$12.50" in html


def test_bad_input_is_shown_on_the_fields_and_creates_nothing(acme: Organization) -> None:
    client = signed_in_as("admin", acme)
    past = (timezone.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    response = client.post(
        url(acme, "new/"),
        {"name": " ", "rpm_limit": "0", "expires_at": past, "monthly_budget_usd": "0.0000000001"},
    )
    html = page(response)
    assert response.status_code == 200 and not VirtualKey.objects.exists()
    assert "This field is required." in html or "Give the key a name." in html
    assert "Pick a time in the future" in html and 'aria-invalid="true"' in html
    assert "Ensure that there are no more than 9 decimal places." in html


def test_an_expiry_is_read_in_the_orgs_time_zone(acme: Organization) -> None:
    acme.time_zone = "Asia/Tokyo"
    acme.save()
    signed_in_as("admin", acme).post(
        url(acme, "new/"), {"name": "ci", "expires_at": "2099-01-01T09:00"}
    )
    assert VirtualKey.objects.get().expires_at.isoformat() == "2099-01-01T00:00:00+00:00"


def test_a_members_key_always_goes_to_their_own_team(
    acme: Organization, search: Team, ads: Team
) -> None:
    client = signed_in_as("member", acme, team=search)
    response = client.post(url(acme, "new/"), {"name": "mine", "team": ads.pk})
    assert response.status_code == 302
    assert VirtualKey.objects.get().team == search


def test_finance_may_not_create_edit_rotate_or_revoke(acme: Organization) -> None:
    key = issue(acme)
    client = signed_in_as("finance", acme)
    assert client.get(url(acme, "new/")).status_code == 403
    assert client.post(url(acme, "new/"), {"name": "x"}).status_code == 403
    for action in ("edit", "rotate", "revoke"):
        assert client.post(url(acme, f"{key.pk}/{action}/"), {"name": "x"}).status_code == 403
    detail = page(client.get(url(acme, f"{key.pk}/")))
    assert (
        "Rotate key" not in detail and "Revoke key" not in detail and "Save settings" not in detail
    )
    key.refresh_from_db()
    assert key.name == "ci" and key.revoked_at is None and VirtualKey.objects.count() == 1


# ------------------------------------------------------------------ detail and actions


def test_another_teams_or_orgs_key_is_not_found(
    acme: Organization, search: Team, ads: Team
) -> None:
    theirs = issue(acme, team=ads)
    foreign = issue(OrganizationFactory())
    member = signed_in_as("member", acme, team=search)
    for action in ("", "rotate/", "revoke/", "edit/"):
        call = member.post if action else member.get
        assert call(url(acme, f"{theirs.pk}/{action}")).status_code == 404
        owner_call = signed_in_as("owner", acme).post if action else signed_in_as("owner", acme).get
        assert owner_call(url(acme, f"{foreign.pk}/{action}")).status_code == 404
    assert VirtualKey.objects.filter(revoked_at__isnull=False).count() == 0


def test_the_detail_page_shows_settings_and_recent_usage(acme: Organization, search: Team) -> None:
    key = issue(acme, "search-bot", team=search, rpm_limit=60, allowed_models=["m1"])
    record_usage(acme, timezone.now() - timedelta(minutes=5), 2 * 10**9, team=search)
    UsageEvent.objects.update(key_id=key.pk)
    rollups_refresh()
    html = page(signed_in_as("member", acme, team=search).get(url(acme, f"{key.pk}/")))
    assert key.prefix in html and "60 requests per minute" in html and "m1" in html
    assert 'id="key-usage-table"' in html and "$2.000000" in html
    assert "Rotate key" in html and "Revoke key" in html and "Save settings" not in html
    assert key.secret_hash not in html


def test_an_admin_edits_a_key_and_a_member_may_not(acme: Organization, search: Team) -> None:
    key = issue(acme, "ci", team=search)
    data = {"name": "ci-2", "allowed_models": "a\nb", "rpm_limit": "5", "tpm_limit": ""}
    assert (
        signed_in_as("member", acme, team=search)
        .post(url(acme, f"{key.pk}/edit/"), data)
        .status_code
        == 403
    )
    response = signed_in_as("admin", acme).post(url(acme, f"{key.pk}/edit/"), data)
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.allowed_models, key.rpm_limit) == ("ci-2", ["a", "b"], 5)
    assert AuditLog.objects.filter(action="virtual_key.update").count() == 1


def test_an_invalid_edit_shows_the_errors_and_changes_nothing(acme: Organization) -> None:
    key = issue(acme, "ci")
    response = signed_in_as("owner", acme).post(
        url(acme, f"{key.pk}/edit/"), {"name": "ci", "rpm_limit": "-3"}
    )
    assert response.status_code == 400 and 'aria-invalid="true"' in page(response)
    key.refresh_from_db()
    assert key.rpm_limit is None


def test_rotating_shows_the_new_secret_once_and_the_old_one_stops_matching(
    acme: Organization, search: Team
) -> None:
    old = virtual_key_issue(org=acme, name="ci", team=search, actor=TEST_ACTOR)
    client = signed_in_as("member", acme, team=search)
    response = client.post(url(acme, f"{old.key.pk}/rotate/"))
    shown = page(client.get(response.url))
    secret = SECRET.search(shown).group(1)
    key = VirtualKey.objects.get()
    assert key_matches(secret, key.secret_hash) and not key_matches(old.plaintext, key.secret_hash)
    assert "new-key-secret" not in page(client.get(response.url))
    assert AuditLog.objects.filter(action="virtual_key.rotate", target_id=str(key.pk)).exists()


def test_revoking_a_key_stops_it_and_hides_the_actions(acme: Organization, search: Team) -> None:
    key = issue(acme, "ci", team=search)
    client = signed_in_as("member", acme, team=search)
    response = client.post(url(acme, f"{key.pk}/revoke/"))
    key.refresh_from_db()
    assert response.status_code == 302 and key.revoked_at is not None
    html = page(client.get(response.url))
    assert "revoked" in html and "Rotate key" not in html and "Revoke key" not in html
    assert client.post(url(acme, f"{key.pk}/rotate/")).status_code == 302
    assert VirtualKey.objects.get().secret_hash == key.secret_hash  # not rotated


def test_changes_need_a_post(acme: Organization) -> None:
    key = issue(acme)
    client = signed_in_as("owner", acme)
    assert client.get(url(acme, f"{key.pk}/revoke/")).status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None


def test_signed_out_visitors_are_sent_to_sign_in(acme: Organization) -> None:
    response = Client().get(url(acme))
    assert response.status_code == 302 and "/sign-in/" in response.url
