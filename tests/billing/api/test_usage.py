"""Usage and cost reports over the management API: figures are the ledger's, summed by the
rollups, for the window asked (rounded to whole hours) and the caller's org only."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from billing.rollups import rollups_refresh
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.api import token_client
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db
OCT_5 = datetime(2026, 10, 5, tzinfo=UTC)


def test_the_month_summary_equals_the_sum_of_the_months_ledger_events() -> None:
    org = OrganizationFactory(time_zone="America/New_York")
    team = TeamFactory(org=org)
    now = timezone.now()
    local_now = now.astimezone(ZoneInfo(org.time_zone))
    month_start = local_now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    record_usage(org, month_start, 1_250_000, team=team)
    record_usage(org, max(month_start, now - timedelta(seconds=1)), 3_000_007)
    record_usage(org, month_start, 0, model="mystery", priced=False)
    record_usage(org, month_start - timedelta(hours=1), 5_000_000)  # last month, in New York
    record_usage(OrganizationFactory(), now, 9_000_000)  # another org's
    rollups_refresh()

    response = token_client(org, "read_only").get("/api/v1/usage/summary/")

    assert response.status_code == 200, response.json()
    summary = response.json()
    assert summary["cost_nanos"] == 1_250_000 + 3_000_007
    assert summary["cost_usd"] == "0.004250007"
    assert summary["requests"] == 3 and summary["errors"] == 0
    assert summary["unpriced_requests"] == 1
    assert summary["input_tokens"] == 300 and summary["output_tokens"] == 30
    assert datetime.fromisoformat(summary["since"]) == month_start
    assert datetime.fromisoformat(summary["until"]) > now
    # Says how fresh the rollups are: complete up to the hour before the last refresh.
    complete_until = datetime.fromisoformat(summary["complete_until"])
    assert now - timedelta(hours=1, minutes=5) <= complete_until <= now


def test_a_window_is_rounded_out_to_whole_hours_and_says_so(org) -> None:
    for minutes, nanos in ((-1, 1), (5, 10), (179, 100), (180, 1000)):  # from 10:00
        record_usage(org, OCT_5.replace(hour=10) + timedelta(minutes=minutes), nanos)
    rollups_refresh()

    summary = (
        token_client(org)
        .get(
            "/api/v1/usage/summary/",
            {"since": "2026-10-05T10:30:00Z", "until": "2026-10-05T12:10:00+00:00"},
        )
        .json()
    )

    assert (summary["since"], summary["until"]) == ("2026-10-05T10:00:00Z", "2026-10-05T13:00:00Z")
    assert summary["cost_nanos"] == 110 and summary["requests"] == 2


def test_a_breakdown_groups_by_team_with_names_and_a_total(org) -> None:
    search, ads = TeamFactory(org=org, name="Search"), TeamFactory(org=org, name="Ads")
    record_usage(org, OCT_5, 300, team=search)
    record_usage(org, OCT_5, 200, team=search)
    record_usage(org, OCT_5, 400, team=ads, model="gpt-4o")
    record_usage(org, OCT_5, 50)
    rollups_refresh()
    client = token_client(org)
    window = {"since": "2026-10-05T00:00:00Z", "until": "2026-10-06T00:00:00Z"}

    by_team = client.get("/api/v1/usage/breakdown/", {**window, "by": "team"}).json()
    by_model = client.get("/api/v1/usage/breakdown/", {**window, "by": "model"}).json()

    assert [(g["key"], g["label"], g["cost_nanos"], g["requests"]) for g in by_team["groups"]] == [
        (str(search.pk), "Search", 500, 2),
        (str(ads.pk), "Ads", 400, 1),
        (None, "(none)", 50, 1),
    ]
    assert by_team["total"]["cost_nanos"] == 950 and by_team["by"] == "team"
    assert {g["key"]: g["cost_nanos"] for g in by_model["groups"]} == {
        "gpt-4o-mini": 550,
        "gpt-4o": 400,
    }


def test_a_series_has_one_point_per_day_oldest_first(org) -> None:
    record_usage(org, OCT_5 + timedelta(hours=3), 7)
    record_usage(org, OCT_5 + timedelta(days=2, hours=1), 11)
    record_usage(org, OCT_5 + timedelta(days=2, hours=2), 13, model="gpt-4o")
    rollups_refresh()
    client = token_client(org)
    window = {"since": "2026-10-05T12:00:00Z", "until": "2026-10-08T00:00:00Z"}

    daily = client.get("/api/v1/usage/series/", window).json()
    hourly = client.get(
        "/api/v1/usage/series/", {**window, "granularity": "hour", "model": "gpt-4o"}
    ).json()

    assert daily["since"] == "2026-10-05T00:00:00Z"  # whole UTC days
    assert [(p["bucket_start"], p["cost_nanos"]) for p in daily["points"]] == [
        ("2026-10-05T00:00:00Z", 7),
        ("2026-10-07T00:00:00Z", 24),
    ]
    assert [(p["bucket_start"], p["cost_nanos"]) for p in hourly["points"]] == [
        ("2026-10-07T02:00:00Z", 13)
    ]
    assert hourly["model"] == "gpt-4o" and daily["model"] is None


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("summary", {"since": "2026-10-05T00:00Z", "until": "2026-10-05T00:00Z"}, "until"),
        ("summary", {"since": "2026-10-06T00:00Z", "until": "2026-10-05T00:00Z"}, "until"),
        ("summary", {"since": "yesterday"}, "since"),
        ("summary", {"since": "1990-01-01T00:00Z", "until": "1990-01-02T00:00Z"}, "since"),
        ("summary", {"since": "2024-01-01T00:00Z", "until": "2025-02-05T00:00Z"}, "since"),
        ("summary", {"until": "9999-12-31T23:59:59+14:00"}, "until"),
        ("breakdown", {"since": "2026-10-01T00:00Z", "until": "2026-10-02T00:00Z"}, "by"),
        ("breakdown", {"by": "planet"}, "by"),
        ("series", {"granularity": "minute"}, "granularity"),
        (
            "series",
            {"since": "2026-08-01T00:00Z", "until": "2026-10-01T00:00Z", "granularity": "hour"},
            "since",
        ),
        ("series", {"model": "m" * 201}, "model"),
    ],
)
def test_bad_usage_parameters_get_a_400_naming_the_parameter(org, path, params, param) -> None:
    response = token_client(org).get(f"/api/v1/usage/{path}/", params)
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param


def test_the_cost_report_covers_whole_days_in_the_orgs_time_zone() -> None:
    org = OrganizationFactory(time_zone="Europe/Berlin")
    search = TeamFactory(org=org, name="Search")
    berlin = ZoneInfo("Europe/Berlin")
    record_usage(org, datetime(2026, 9, 30, 23, 30, tzinfo=berlin), 1)  # September
    record_usage(org, datetime(2026, 10, 1, 0, 30, tzinfo=berlin), 20, team=search)
    record_usage(org, datetime(2026, 10, 31, 23, 30, tzinfo=berlin), 300)
    record_usage(org, datetime(2026, 11, 1, 0, 30, tzinfo=berlin), 4000)  # November
    rollups_refresh()

    response = token_client(org, "read_only").get(
        "/api/v1/reports/costs/", {"since": "2026-10-01", "until": "2026-10-31"}
    )

    assert response.status_code == 200, response.json()
    report = response.json()
    assert (report["since"], report["until"], report["by"]) == ("2026-10-01", "2026-10-31", "team")
    assert report["covers_since"] == "2026-09-30T22:00:00Z"  # CEST
    assert report["covers_until"] == "2026-10-31T23:00:00Z"  # CET
    assert [(row["label"], row["cost_nanos"]) for row in report["rows"]] == [
        ("(none)", 300),
        ("Search", 20),
    ]
    assert report["total"]["cost_nanos"] == 320 and report["total"]["cost_usd"] == "0.000000320"
    assert report["truncated"] is False


def test_the_cost_report_by_end_user_lists_only_requests_that_name_one(org) -> None:
    record_usage(org, OCT_5, 5)
    rollups_refresh()
    report = (
        token_client(org)
        .get(
            "/api/v1/reports/costs/",
            {"since": "2026-10-05", "until": "2026-10-05", "by": "end_user"},
        )
        .json()
    )
    assert report["rows"] == [] and report["total"]["cost_nanos"] == 5
    assert report["total"]["unpriced_requests"] == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"since": "2026-10-05", "until": "2026-10-04"}, "until"),
        ({"since": "2024-01-01", "until": "2026-01-01"}, "since"),
        ({"since": "1999-12-31"}, "since"),
        ({"since": "2026-10-05T10:00"}, "since"),
        ({"by": "weather"}, "by"),
    ],
)
def test_bad_cost_report_parameters_get_a_400_naming_the_parameter(org, params, param) -> None:
    response = token_client(org).get("/api/v1/reports/costs/", params)
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["param"] == param


def test_usage_is_only_ever_the_callers_orgs(org) -> None:
    record_usage(OrganizationFactory(), OCT_5, 999)
    rollups_refresh()
    client = token_client(org)
    window = {"since": "2026-10-05T00:00:00Z", "until": "2026-10-06T00:00:00Z"}
    assert client.get("/api/v1/usage/summary/", window).json()["cost_nanos"] == 0
    assert client.get("/api/v1/usage/breakdown/", {**window, "by": "model"}).json()["groups"] == []
    assert client.get("/api/v1/usage/series/", window).json()["points"] == []
