"""Cost reports: any period in the org's time zone, grouped, exact to the nano in CSV."""

import csv
import io
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from billing.contracts import TokenUsage, UsageRecord
from billing.ingest import usage_events_write
from billing.rollups import rollups_refresh
from tenants.models import Membership
from tests.factories import OrganizationFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = "/dashboard/reports/"
MARCH = {"since": "2025-03-01", "until": "2025-03-31"}


def record(org, when: datetime, cost_nanos: int, *, team=None, model="gpt-4o-mini", **fields):
    usage = TokenUsage(input_tokens=fields.pop("input_tokens", 100), output_tokens=10)
    usage_events_write([
        UsageRecord(
            event_id=uuid.uuid4(), org_id=org.pk, team_id=team.pk if team else None, key_id=None,
            endpoint="chat.completions", model=model, started_at=when, finished_at=when,
            provider_kind="openai", usage=usage, cost_nanos=cost_nanos,
            **{"outcome": "success", "status_code": 200, "latency_ms": 120, **fields},
        )
    ])  # fmt: skip


def viewer(org, role=Membership.Role.FINANCE) -> Client:
    user = UserFactory()
    Membership.objects.create(user=user, org=org, role=role)
    client = Client()
    client.force_login(user)
    return client


def parse_csv(response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body(response).decode())))


def body(response) -> bytes:
    """The response's bytes; a streamed export is read as the ASGI server reads it."""
    if not response.streaming:
        return response.content

    async def read() -> bytes:
        return b"".join([part async for part in response.streaming_content])

    return async_to_sync(read)()


@pytest.fixture
def paris_march():
    """An org in Paris with March usage in two teams, edges of the local month, and
    another org's usage that must never show up."""
    org = OrganizationFactory(slug="acme", name="Acme", time_zone="Europe/Paris")
    search, ads = TeamFactory(org=org, name="Search"), TeamFactory(org=org, name="Ads")
    # 1 March 00:00 in Paris is 28 February 23:00 UTC: in; a minute before: out.
    record(org, datetime(2025, 2, 28, 23, 0, tzinfo=UTC), 1_234_567_891, team=search)
    record(org, datetime(2025, 2, 28, 22, 59, tzinfo=UTC), 10**12, team=search)
    record(org, datetime(2025, 3, 10, 12, tzinfo=UTC), 3, team=search, input_tokens=7)
    record(org, datetime(2025, 3, 11, 9, tzinfo=UTC), 987_654_321, team=ads,
           outcome="upstream_error", status_code=502)  # fmt: skip
    record(org, datetime(2025, 3, 31, 21, 59, tzinfo=UTC), 5, team=ads, model="gpt-4o")
    record(org, datetime(2025, 3, 31, 22, 0, tzinfo=UTC), 10**12, team=ads)  # April in Paris
    other = OrganizationFactory(slug="globex", name="Globex")
    record(other, datetime(2025, 3, 15, tzinfo=UTC), 555_000_000_000, model="their-model")
    rollups_refresh()
    return org, search, ads


def test_figures_on_the_page_and_in_the_csv_equal_the_sums_of_the_events(
    paris_march, django_assert_max_num_queries
) -> None:
    org, search, ads = paris_march
    client = viewer(org)
    with django_assert_max_num_queries(8):
        response = client.get(URL, {"org": "acme", **MARCH, "by": "team"})
    assert response.status_code == 200
    page = response.content.decode()
    assert "$1.234567894" in page  # Search: 1_234_567_891 + 3 nanos, shown exactly
    assert "$0.987654326" in page  # Ads: 987_654_321 + 5
    assert "$2.222222220" in page  # the total row
    assert "their-model" not in page and "$555" not in page
    assert "Covers 2025-03-01 00:00 to 2025-04-01 00:00 (Europe/Paris)" in page
    totals = response.context["total"]
    assert (totals.requests, totals.errors, totals.input_tokens) == (4, 1, 307)
    # The spend-per-day chart (UTC days) adds up to the same total, to the nano-dollar.
    chart = response.context["chart"]
    assert (sum(chart["spend_nanos"]), sum(chart["requests"])) == (2_222_222_220, 4)
    assert 'id="report-chart"' in page and "Share of cost" in page

    response = client.get(URL, {"org": "acme", **MARCH, "by": "team", "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == (
        'attachment; filename="tollgate-acme-costs-by-team-2025-03-01-to-2025-03-31.csv"'
    )
    rows = {row["team"]: row for row in parse_csv(response)}
    assert rows["Search"]["cost_nanos"] == "1234567894"
    assert rows["Search"]["cost_usd"] == "1.234567894"
    assert rows["Search"]["group_id"] == str(search.pk)
    assert rows["Ads"]["cost_nanos"] == "987654326"
    assert (rows["Ads"]["requests"], rows["Ads"]["errors"]) == ("2", "1")
    assert rows["TOTAL"]["cost_nanos"] == "2222222220"
    assert rows["TOTAL"]["cost_usd"] == "2.222222220"
    assert int(rows["Search"]["cost_nanos"]) + int(rows["Ads"]["cost_nanos"]) == 2_222_222_220


def test_grouping_by_model_and_provider(paris_march) -> None:
    org, _, _ = paris_march
    client = viewer(org, Membership.Role.ADMIN)
    rows = parse_csv(client.get(URL, {"org": "acme", **MARCH, "by": "model", "format": "csv"}))
    assert {row["model"]: row["cost_nanos"] for row in rows} == {
        "gpt-4o-mini": "2222222215", "gpt-4o": "5", "TOTAL": "2222222220",
    }  # fmt: skip
    page = client.get(URL, {"org": "acme", **MARCH, "by": "provider"}).content.decode()
    assert "openai" in page and "$2.222222220" in page


def test_the_requests_behind_a_report_add_up_to_its_total(paris_march) -> None:
    org, _, _ = paris_march
    response = viewer(org).get(URL, {"org": "acme", **MARCH, "format": "requests"})
    assert response.status_code == 200
    assert "attachment" in response["Content-Disposition"]
    rows = parse_csv(response)
    assert len(rows) == 4
    assert sum(int(row["cost_nanos"]) for row in rows) == 2_222_222_220
    assert sum(Decimal(row["cost_usd"]) for row in rows) == Decimal("2.222222220")
    assert {row["team"] for row in rows} == {"Search", "Ads"}
    assert {row["local_month"] for row in rows} == {"2025-03"}


def test_the_requests_export_pages_through_events_that_started_at_the_same_instant(
    monkeypatch,
) -> None:
    monkeypatch.setattr("dashboard.finance.LEDGER_PAGE_SIZE", 2)
    org = OrganizationFactory(slug="busy")
    when = datetime(2025, 3, 5, 10, tzinfo=UTC)
    for cost in (1, 10, 100, 1_000, 10_000):
        record(org, when, cost)
    rows = parse_csv(viewer(org).get(URL, {"org": "busy", **MARCH, "format": "requests"}))
    assert len({row["event_id"] for row in rows}) == 5
    assert sum(int(row["cost_nanos"]) for row in rows) == 11_111


@pytest.mark.django_db(transaction=True)
def test_the_requests_export_streams_through_the_asgi_server(gateway) -> None:
    org = OrganizationFactory(slug="served", time_zone="Europe/Paris")
    record(org, datetime(2025, 3, 5, 10, tzinfo=UTC), 1_234_567_891, end_user="u-1")
    session = viewer(org).cookies["sessionid"].value
    response = httpx.get(
        f"{gateway.base_url}{URL}",
        params={"org": "served", **MARCH, "format": "requests"},
        cookies={"sessionid": session},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("attachment;")
    (row,) = csv.DictReader(io.StringIO(response.text))
    assert (row["cost_nanos"], row["cost_usd"], row["end_user"]) == (
        "1234567891", "1.234567891", "u-1"
    )  # fmt: skip
    page = httpx.get(
        f"{gateway.base_url}{URL}", params={"org": "served", "since": "nope"},
        cookies={"sessionid": session}, timeout=10,
    )  # fmt: skip
    assert page.status_code == 400 and "must be a date" in page.text


def test_tag_groups_overlap_and_do_not_add_up_to_the_total() -> None:
    org = OrganizationFactory(slug="tagged")
    when = datetime(2025, 3, 5, 10, tzinfo=UTC)
    record(org, when, 100, tags=("feature:search", "env:prod"))
    record(org, when, 20, tags=("feature:search",))
    record(org, when, 3)
    rollups_refresh()
    client = viewer(org)
    response = client.get(URL, {"org": "tagged", **MARCH, "by": "tag"})
    page = response.content.decode()
    assert "Tag groups overlap" in page
    rows = {row.label: row for row in response.context["rows"]}
    assert (rows["feature:search"].requests, rows["feature:search"].cost_nanos) == (2, 120)
    assert (rows["env:prod"].requests, rows["env:prod"].cost_nanos) == (1, 100)
    assert response.context["total"].cost_nanos == 123  # not 220: no double counting

    csv_rows = parse_csv(client.get(URL, {"org": "tagged", **MARCH, "by": "tag", "format": "csv"}))
    by_tag = {row["tag"]: row["cost_nanos"] for row in csv_rows}
    assert by_tag["feature:search"] == "120" and by_tag["env:prod"] == "100"
    assert by_tag["TOTAL (all requests; tag groups overlap)"] == "123"


def test_grouping_by_end_user_reads_the_raw_events() -> None:
    org = OrganizationFactory(slug="saas")
    when = datetime(2025, 3, 5, 10, tzinfo=UTC)
    record(org, when, 700, end_user="customer-1")
    record(org, when, 50, end_user="customer-1")
    record(org, when, 9, end_user="=cmd()")  # a client-chosen id that looks like a formula
    record(org, when, 1)
    rollups_refresh()
    client = viewer(org)
    page = client.get(URL, {"org": "saas", **MARCH, "by": "end_user"}).content.decode()
    assert "customer-1" in page and "Requests without an end-user id" in page
    rows = parse_csv(client.get(URL, {"org": "saas", **MARCH, "by": "end_user", "format": "csv"}))
    by_user = {row["end_user"]: row["cost_nanos"] for row in rows}
    assert {row["end_user"]: row["cost_usd"] for row in rows}["'=cmd()"] == "0.000000009"
    assert by_user == {"customer-1": "750", "'=cmd()": "9"} | {
        "TOTAL (all requests, with or without an end user)": "760"
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"since": "2025-13-01"}, "must be a date"),
        ({"since": "yesterday", "until": "2025-03-01"}, "must be a date"),
        ({"since": "2025-03-10", "until": "2025-03-01"}, "is before"),
        ({"since": "2020-01-01", "until": "2025-01-01"}, "at most two years"),
        ({"since": "0001-01-01", "until": "0001-01-02"}, "must be between"),
        ({**MARCH, "by": "colour"}, "Unknown grouping"),
        ({**MARCH, "format": "xlsx"}, "Unknown format"),
    ],
)
def test_bad_input_gets_a_clear_400(params, message) -> None:
    org = OrganizationFactory(slug="strict")
    response = viewer(org).get(URL, {"org": "strict", **params})
    assert response.status_code == 400
    assert message in response.content.decode()


def test_roles_finance_and_admins_read_members_are_refused_outsiders_see_nothing() -> None:
    org = OrganizationFactory(slug="roles")
    other = OrganizationFactory(slug="other")
    for role in (Membership.Role.OWNER, Membership.Role.ADMIN, Membership.Role.FINANCE):
        assert viewer(org, role).get(URL, {"org": "roles"}).status_code == 200
    member = viewer(org, Membership.Role.MEMBER)
    assert member.get(URL, {"org": "roles"}).status_code == 403
    assert member.get(URL, {"org": "roles", "format": "csv"}).status_code == 403
    assert viewer(org).get(URL, {"org": other.slug, "format": "csv"}).status_code == 404
    assert Client().get(URL).status_code == 302  # sign in first


def test_an_empty_period_says_what_to_do() -> None:
    org = OrganizationFactory(slug="quiet")
    response = viewer(org).get(URL, {"org": "quiet", **MARCH})
    assert response.status_code == 200
    page = response.content.decode()
    assert "No requests in this period" in page
    assert "Last month" in page and "This month" in page and "Last 7 days" in page
    assert 'href="/dashboard/reports/' in page and 'href="/dashboard/statements/' in page  # nav
