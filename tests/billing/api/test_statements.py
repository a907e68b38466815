"""Statements over the management API: closed ones frozen with their lines, the open
month previewed, and nothing of another org's."""

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from billing.statements import statement_close
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.api import token_client
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db
SEPTEMBER, OCTOBER = date(2026, 9, 1), date(2026, 10, 1)
BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 11, 20, 12, tzinfo=BERLIN)


def closed_october(org):  # type: ignore[no-untyped-def]
    search = TeamFactory(org=org, name="Search")
    record_usage(org, datetime(2026, 10, 1, 0, 30, tzinfo=BERLIN), 4_000_000, team=search)
    record_usage(org, datetime(2026, 10, 15, tzinfo=BERLIN), 4_000_000, team=search)
    record_usage(org, datetime(2026, 10, 20, tzinfo=BERLIN), 4_999_999, model="gpt-4o")
    return statement_close(org=org, month=OCTOBER, grace=timedelta(hours=6), now=NOW)


def test_a_closed_statement_is_listed_and_read_with_exact_lines_and_cents() -> None:
    org = OrganizationFactory(time_zone="Europe/Berlin")
    statement = closed_october(org)
    client = token_client(org, "read_only")

    listed = client.get("/api/v1/statements/").json()
    detail = client.get(f"/api/v1/statements/{statement.pk}/")

    assert listed["total"] == 1
    assert listed["data"][0] == {
        "id": statement.pk, "month": "2026-10", "time_zone": "Europe/Berlin",
        "period_start": "2026-09-30T22:00:00Z", "period_end": "2026-10-31T23:00:00Z",
        "closed_at": "2026-11-20T11:00:00Z", "total_nanos": 12_999_999,
        "total_usd": "0.012999999", "total_cents": 1,
    }  # fmt: skip
    assert detail.status_code == 200 and detail["ETag"]
    body = detail.json()
    assert (body["id"], body["closed"], body["total_nanos"]) == (statement.pk, True, 12_999_999)
    lines = [
        (ln["kind"], ln["team_name"], ln["provider"], ln["model"], ln["requests"],
         ln["cost_nanos"], ln["cost_cents"])
        for ln in body["lines"]
    ]  # fmt: skip
    assert lines == [
        ("usage", "", "openai", "gpt-4o", 1, 4_999_999, 0),
        ("usage", "Search", "openai", "gpt-4o-mini", 2, 8_000_000, 1),
    ]
    assert body["rounding_cents"] == 0  # 1 cent total, 0 + 1 on the lines
    assert body["lines"][1]["input_tokens"] == 200


def test_another_orgs_statement_is_a_404_and_never_listed(org) -> None:
    other = closed_october(OrganizationFactory(time_zone="Europe/Berlin"))
    client = token_client(org)
    response = client.get(f"/api/v1/statements/{other.pk}/")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert client.get("/api/v1/statements/").json()["total"] == 0
    for method in ("patch", "delete"):  # statements are frozen: no method changes them
        assert getattr(client, method)(f"/api/v1/statements/{other.pk}/").status_code == 405


def test_the_open_month_is_previewed_with_only_its_own_usage(org) -> None:
    now = timezone.now()
    local_month = now.astimezone(ZoneInfo(org.time_zone)).date().replace(day=1)
    # An earlier month still open: its usage is previewed there, not on this month's.
    record_usage(org, now - timedelta(days=62), 7)
    record_usage(org, now, 2_000_000)
    client = token_client(org, "read_only")

    preview = client.get("/api/v1/statements/preview/")

    assert preview.status_code == 200, preview.json()
    body = preview.json()
    assert (body["id"], body["closed"], body["closed_at"]) == (None, False, None)
    assert body["month"] == f"{local_month:%Y-%m}"
    assert body["total_nanos"] == 2_000_000 and body["adjustment_nanos"] == 0
    assert [line["kind"] for line in body["lines"]] == ["usage"]


def test_a_preview_of_a_closed_future_or_malformed_month_is_refused() -> None:
    org = OrganizationFactory(time_zone="Europe/Berlin")
    statement = closed_october(org)
    client = token_client(org)

    closed = client.get("/api/v1/statements/preview/", {"month": "2026-10"})
    future = client.get("/api/v1/statements/preview/", {"month": "2100-01"})
    before = client.get("/api/v1/statements/preview/", {"month": "2026-09"})
    malformed = client.get("/api/v1/statements/preview/", {"month": "2026-13"})

    assert closed.status_code == 409
    assert f"/api/v1/statements/{statement.pk}/" in closed.json()["error"]["message"]
    assert future.status_code == 404 and before.status_code == 404
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "month"
