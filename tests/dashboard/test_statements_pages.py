"""Statement pages: frozen closed months, late usage as adjustments, cents only on screen."""

import csv
import io
from datetime import UTC, date, datetime, time, timedelta

import pytest
from django.test import Client
from django.utils import timezone

from billing.statements import next_month, statement_close
from tenants.models import Membership
from tests.dashboard.test_reports import body
from tests.factories import OrganizationFactory, TeamFactory, UserFactory
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db
GRACE = timedelta(hours=6)


def months_ago(count: int) -> date:
    """The first day of the UTC month `count` months before this one."""
    month = timezone.now().date().replace(day=1)
    for _ in range(count):
        month = (month - timedelta(days=1)).replace(day=1)
    return month


def at(month: date, day: int = 10) -> datetime:
    return datetime(month.year, month.month, day, 12, tzinfo=UTC)


def close(org, month: date) -> None:
    statement_close(org=org, month=month, now=timezone.now(), grace=timedelta(0))


def viewer(org, role=Membership.Role.FINANCE) -> Client:
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=role)
    client = Client()
    client.force_login(user)
    return client


def url(month: date) -> str:
    return f"/dashboard/statements/{month:%Y-%m}/"


def csv_rows(response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body(response).decode())))


def test_a_closed_statement_stays_frozen_and_late_usage_is_an_adjustment_next_month(
    django_assert_max_num_queries,
) -> None:
    org = OrganizationFactory(slug="acme", name="Acme")
    search, ads = TeamFactory(org=org, name="Search"), TeamFactory(org=org, name="Ads")
    first, second = months_ago(2), months_ago(1)
    record_usage(org, at(first), 1_500_000_000, team=search)
    record_usage(org, at(first, 11), 1_500_000_000, team=search)
    record_usage(org, at(first), 7, team=ads, model="gpt-4o")
    close(org, first)
    client = viewer(org)

    with django_assert_max_num_queries(8):
        response = client.get(url(first), {"org": "acme"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "Closed" in page and "frozen" in page
    assert "$3.000000000" in page and "$3.00" in page  # Search: exact and in cents
    assert "$0.000000007" in page and "$0.00" in page  # Ads
    assert "Print / save as PDF" in page and "dashboard/print.js" in page

    record_usage(org, at(first, 20), 250_000_000, team=search)  # late: its month is closed
    page = client.get(url(first), {"org": "acme"}).content.decode()
    assert "$3.000000007" in page and "$3.250000007" not in page  # frozen, never edited
    assert "Late usage from" not in page

    preview = client.get(url(second), {"org": "acme"}).content.decode()
    assert "Open — preview, may still change" in preview
    assert f"Late usage from {first:%B %Y}" in preview and "$0.250000000" in preview

    record_usage(org, at(second), 1_000_000_000, team=ads)
    close(org, second)
    response = client.get(url(second), {"org": "acme"})
    page = response.content.decode()
    assert "Closed" in page
    labels = [row.label for row in response.context["rows"]]
    assert labels == ["Usage", f"Late usage from {first:%B %Y}"]  # usage, then adjustments
    assert response.context["view"].total_nanos == 1_250_000_000

    rows = csv_rows(client.get(url(second), {"org": "acme", "format": "csv"}))
    assert [row["kind"] for row in rows] == ["usage", "adjustment", "total", "rounding"]
    assert rows[1]["label"] == f"Late usage from {first:%B %Y}"
    assert rows[1]["usage_month"] == f"{first:%Y-%m}"

    listing = client.get("/dashboard/statements/", {"org": "acme"})
    assert listing.status_code == 200
    page = listing.content.decode()
    assert page.index("open — preview, may still change") < page.index(f"{second:%B %Y}")
    assert page.index(f"{second:%B %Y}") < page.index(f"{first:%B %Y}")  # newest first
    assert "$3.000000007" in page and "$1.250000000" in page


def test_csv_total_is_the_sum_of_the_lines_and_rounding_is_shown() -> None:
    org = OrganizationFactory(slug="pennies")
    month = months_ago(1)
    for model in ("model-a", "model-b", "model-c"):
        record_usage(org, at(month), 4_000_000, model=model)  # 0.4 cents each
    close(org, month)
    client = viewer(org)

    response = client.get(url(month), {"org": "pennies", "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Disposition"] == (
        f'attachment; filename="tollgate-pennies-statement-{month:%Y-%m}.csv"'
    )
    rows = csv_rows(response)
    lines = [row for row in rows if row["kind"] == "usage"]
    (total,) = [row for row in rows if row["kind"] == "total"]
    (rounding,) = [row for row in rows if row["kind"] == "rounding"]
    assert [row["amount_cents"] for row in lines] == ["0", "0", "0"]
    assert int(total["amount_nanos"]) == sum(int(row["amount_nanos"]) for row in lines)
    assert total["amount_nanos"] == "12000000" and total["amount_usd"] == "0.012000000"
    assert total["amount_cents"] == "1"
    assert rounding["amount_cents"] == "1"  # 1 cent total - 0 cents of lines
    assert int(total["amount_cents"]) == (
        sum(int(row["amount_cents"]) for row in lines) + int(rounding["amount_cents"])
    )

    page = client.get(url(month), {"org": "pennies"}).content.decode()
    assert "Rounding" in page and "+$0.01" in page
    assert "Sum of the rounded lines" in page


def test_the_requests_behind_a_statement_add_up_to_it() -> None:
    org = OrganizationFactory(slug="traced")
    team = TeamFactory(org=org, name="Search")
    month = months_ago(1)
    record_usage(org, at(month), 123_456_789, team=team)
    record_usage(org, at(month, 12), 1, model="other")
    record_usage(org, at(next_month(month)), 10**12)  # this month: on no closed statement yet
    close(org, month)
    client = viewer(org)

    rows = csv_rows(client.get(url(month), {"org": "traced", "format": "requests"}))
    assert sum(int(row["cost_nanos"]) for row in rows) == 123_456_790
    team_rows = csv_rows(
        client.get(url(month), {"org": "traced", "team": team.pk, "format": "requests"})
    )
    assert [row["cost_nanos"] for row in team_rows] == ["123456789"]


def test_chargeback_view_shows_one_teams_lines() -> None:
    org = OrganizationFactory(slug="charge")
    search, ads = TeamFactory(org=org, name="Search"), TeamFactory(org=org, name="Ads")
    month = months_ago(1)
    record_usage(org, at(month), 2_000_000_000, team=search)
    record_usage(org, at(month), 30_000_000, team=ads)
    record_usage(org, at(month), 5)
    close(org, month)
    client = viewer(org, Membership.Role.ADMIN)

    response = client.get(url(month), {"org": "charge", "team": ads.pk})
    page = response.content.decode()
    assert response.status_code == 200
    assert "Ads" in page and "chargeback" in page
    assert response.context["view"].total_nanos == 30_000_000
    assert "$0.03" in page and "$2.000000000" not in page
    rows = csv_rows(client.get(url(month), {"org": "charge", "team": ads.pk, "format": "csv"}))
    assert [row["team"] for row in rows if row["kind"] == "usage"] == ["Ads"]

    unassigned = client.get(url(month), {"org": "charge", "team": "none"})
    assert unassigned.context["view"].total_nanos == 5

    foreign = TeamFactory(org=OrganizationFactory(), name="Not yours")
    assert client.get(url(month), {"org": "charge", "team": foreign.pk}).status_code == 404
    assert client.get(url(month), {"org": "charge", "team": "ads"}).status_code == 400


def test_late_usage_is_previewed_on_the_oldest_open_month_only() -> None:
    org = OrganizationFactory(slug="pending")
    closed, previous, current = months_ago(2), months_ago(1), months_ago(0)
    record_usage(org, at(closed), 1_000)
    close(org, closed)
    record_usage(org, at(closed, 20), 300)  # late: billed when `previous` closes
    record_usage(org, at(previous), 40_000_000)
    record_usage(org, at(current, 1), 2_000_000, priced=False, model="mystery")
    client = viewer(org)

    response = client.get(url(previous), {"org": "pending"})
    assert "Open — preview" in response.content.decode()
    assert [row.label for row in response.context["rows"]] == [
        "Usage",
        f"Late usage from {closed:%B %Y}",
    ]
    assert response.context["view"].total_nanos == 40_000_300
    response = client.get(url(current), {"org": "pending"})
    assert response.context["view"].total_nanos == 2_000_000  # nothing of earlier months
    page = response.content.decode()
    assert "Late usage from" not in page
    assert "1 request used a model with no known price" in page and "1 unpriced" in page

    requests = csv_rows(client.get(url(previous), {"org": "pending", "format": "requests"}))
    assert sorted(int(row["cost_nanos"]) for row in requests) == [300, 40_000_000]
    requests = csv_rows(client.get(url(current), {"org": "pending", "format": "requests"}))
    assert [row["cost_nanos"] for row in requests] == ["2000000"]

    listing = client.get("/dashboard/statements/", {"org": "pending"}).content.decode()
    assert listing.count("open — preview, may still change") == 2
    assert "$0.040000300" in listing and "$0.002000000" in listing
    assert "$0.000001000" in listing  # the closed month, unchanged by its late usage


def test_the_period_and_closing_time_follow_the_statements_time_zone() -> None:
    org = OrganizationFactory(slug="nyc", time_zone="America/New_York")
    month = months_ago(1)
    record_usage(org, at(month), 1)
    statement_close(
        org=org, month=month, now=datetime.combine(months_ago(0), time(12), UTC), grace=GRACE
    )
    page = viewer(org).get(url(month), {"org": "nyc"}).content.decode()
    end = next_month(month)
    assert f"1 {month:%B %Y} 00:00 to 1 {end:%B %Y} 00:00 (America/New_York)" in page
    assert f"Closed {months_ago(0):%-d %B %Y} 0" in page  # 12:00 UTC is 07:00 or 08:00 there


def test_roles_and_months_without_a_statement() -> None:
    org = OrganizationFactory(slug="roles")
    other = OrganizationFactory(slug="other")
    month = months_ago(1)
    record_usage(other, at(month), 10**9)
    close(other, month)
    for role in (Membership.Role.OWNER, Membership.Role.ADMIN, Membership.Role.FINANCE):
        assert viewer(org, role).get("/dashboard/statements/", {"org": "roles"}).status_code == 200
    member = viewer(org, Membership.Role.MEMBER)
    assert member.get("/dashboard/statements/", {"org": "roles"}).status_code == 403
    assert member.get(url(month), {"org": "roles", "format": "csv"}).status_code == 403
    finance = viewer(org)
    assert finance.get(url(month), {"org": "other"}).status_code == 404  # another org's
    assert finance.get(url(date(2019, 1, 1)), {"org": "roles"}).status_code == 404
    assert finance.get(url(next_month(months_ago(0))), {"org": "roles"}).status_code == 404
    assert finance.get("/dashboard/statements/2025-13/", {"org": "roles"}).status_code == 404
