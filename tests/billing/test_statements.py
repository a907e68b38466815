"""Monthly statements: exact lines, frozen once closed, late usage as adjustments."""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from billing.models import Statement, StatementLine, UsageEvent
from billing.statements import (
    StatementNotDue,
    cents,
    month_bounds,
    statement_close,
    statement_preview,
    statement_view,
    statements_close_due,
)
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.ledger import record_usage

pytestmark = pytest.mark.django_db

GRACE = timedelta(hours=6)
OCTOBER, NOVEMBER, DECEMBER = date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)


def test_months_follow_the_org_calendar_and_rounding_happens_once() -> None:
    start, end = month_bounds(NOVEMBER, "America/New_York")
    assert start == datetime(2026, 11, 1, 4, tzinfo=UTC)  # EDT until Nov 1 02:00
    assert end == datetime(2026, 12, 1, 5, tzinfo=UTC)  # EST
    assert [cents(n) for n in (4_999_999, 5_000_000, 123_456_789_000)] == [0, 1, 12_346]


def test_a_month_closes_with_exact_lines_by_team_provider_and_model() -> None:
    org = OrganizationFactory(time_zone="Europe/Berlin")
    search, ads = TeamFactory(org=org, name="Search"), TeamFactory(org=org, name="Ads")
    local = ZoneInfo("Europe/Berlin")
    record_usage(
        org, datetime(2026, 10, 1, 0, 30, tzinfo=local), 4_000_000, team=search
    )  # Oct in Berlin
    record_usage(org, datetime(2026, 10, 15, tzinfo=local), 4_000_000, team=search)
    record_usage(org, datetime(2026, 10, 20, tzinfo=local), 4_000_000, team=ads, model="gpt-4o")
    record_usage(
        org, datetime(2026, 10, 21, tzinfo=local), 0, team=ads, model="mystery", priced=False
    )
    record_usage(org, datetime(2026, 9, 30, 23, 30, tzinfo=local), 7, team=search)  # September
    record_usage(org, datetime(2026, 11, 1, 0, 30, tzinfo=local), 9, team=search)  # November

    with pytest.raises(StatementNotDue):
        statement_close(
            org=org, month=OCTOBER, grace=GRACE, now=datetime(2026, 11, 1, 3, tzinfo=UTC)
        )
    with pytest.raises(StatementNotDue, match="earlier month"):
        statement_close(org=org, month=OCTOBER, grace=GRACE, now=datetime(2026, 12, 5, tzinfo=UTC))

    closed = statements_close_due(grace=GRACE, now=datetime(2026, 11, 1, 12, tzinfo=UTC))
    assert [s.month for s in closed] == [date(2026, 9, 1), OCTOBER]
    view = statement_view(org=org, month=OCTOBER)
    assert view.is_closed
    lines = [(ln.kind, ln.team_name, ln.model, ln.requests, ln.amount_nanos) for ln in view.lines]
    assert lines == [
        ("usage", "Ads", "gpt-4o", 1, 4_000_000),
        ("usage", "Ads", "mystery", 1, 0),
        ("usage", "Search", "gpt-4o-mini", 2, 8_000_000),
    ]
    assert view.unpriced_requests == 1
    # Three lines of 0.4, 0 and 0.8 cents: the total rounds to 1 cent, the lines to 0+0+1.
    assert (view.total_nanos, view.total_cents) == (12_000_000, 1)
    assert [ln.amount_cents for ln in view.lines] == [0, 0, 1]
    assert view.rounding_cents == 0
    assert Statement.objects.get(org=org, month=OCTOBER).total_nanos == 12_000_000
    team_view = statement_view(org=org, month=OCTOBER, team_id=ads.pk)
    assert {ln.team_name for ln in team_view.lines} == {"Ads"}
    assert team_view.total_nanos == 4_000_000


def test_the_rounding_line_shows_what_cents_per_line_lose() -> None:
    org = OrganizationFactory()
    for model in ("a", "b", "c"):
        record_usage(
            org, datetime(2026, 10, 5, tzinfo=UTC), 4_000_000, model=model
        )  # 0.4 cent each
    view = statement_preview(org=org, month=OCTOBER)
    assert [ln.amount_cents for ln in view.lines] == [0, 0, 0]
    assert (view.total_cents, view.rounding_cents) == (1, 1)


def test_a_closed_statement_never_changes_and_late_usage_is_an_adjustment() -> None:
    org = OrganizationFactory()
    record_usage(org, datetime(2026, 10, 10, tzinfo=UTC), 1_000)
    october = statement_close(
        org=org, month=OCTOBER, grace=GRACE, now=datetime(2026, 11, 2, tzinfo=UTC)
    )
    assert statement_close(org=org, month=OCTOBER, grace=GRACE) == october, "closing is idempotent"
    frozen = list(october.lines.values_list("amount_nanos", flat=True))

    record_usage(org, datetime(2026, 10, 31, 23, tzinfo=UTC), 250)  # arrives after October closed
    record_usage(org, datetime(2026, 11, 3, tzinfo=UTC), 5_000)
    assert list(october.lines.values_list("amount_nanos", flat=True)) == frozen
    assert statement_view(org=org, month=OCTOBER).total_nanos == 1_000

    november = statement_preview(org=org, month=NOVEMBER)
    assert [(ln.kind, ln.usage_month, ln.amount_nanos) for ln in november.lines] == [
        ("usage", NOVEMBER, 5_000),
        ("adjustment", OCTOBER, 250),
    ]
    statement_close(org=org, month=NOVEMBER, grace=GRACE, now=datetime(2026, 12, 2, tzinfo=UTC))
    closed = statement_view(org=org, month=NOVEMBER)
    assert closed.adjustment_nanos == 250 and closed.usage_nanos == 5_000
    assert StatementLine.objects.filter(kind="adjustment").count() == 1


def test_every_event_is_billed_on_exactly_one_statement() -> None:
    org = OrganizationFactory(time_zone="Asia/Kolkata")
    moments = [datetime(2026, 9, 1, tzinfo=UTC) + timedelta(hours=7 * i) for i in range(300)]
    for i, moment in enumerate(moments[:200]):
        record_usage(org, moment, 1_000 + i)
    statements_close_due(grace=GRACE, now=datetime(2026, 11, 1, 12, tzinfo=UTC))
    for i, moment in enumerate(moments[200:] + moments[:20], start=200):  # more, some late
        record_usage(org, moment, 1_000 + i)
    statements_close_due(grace=GRACE, now=datetime(2027, 1, 1, 12, tzinfo=UTC))

    billed = sum(s.total_nanos for s in Statement.objects.filter(org=org))
    assert billed == sum(UsageEvent.objects.filter(org=org).values_list("cost_nanos", flat=True))
    assert not UsageEvent.objects.filter(org=org, statement__isnull=True).exists()
    assert (
        sum(ln.amount_nanos for s in Statement.objects.filter(org=org) for ln in s.lines.all())
        == billed
    )


@pytest.mark.django_db(transaction=True)
def test_the_embedded_default_runs_the_periodic_jobs_without_celery(
    mock_url: str, make_route, issue_key
) -> None:
    """No Celery in the embedded default: the web process itself keeps rollups current."""
    from django.conf import settings

    from billing.models import UsageRollup
    from tests.support.gateway import gateway_server, wait_for_key, wait_until

    if settings.REDIS_URL:
        pytest.skip("with Redis, Celery beat runs the jobs (tested with the real stack)")
    org = OrganizationFactory()
    make_route(model="rolled", org=org)
    with gateway_server(TOLLGATE_ROLLUP_SECONDS="1") as server:
        key = issue_key(org)
        wait_for_key(server, key)
        response = httpx.post(
            f"{server.v1}/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "rolled", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 200
        events = UsageEvent.objects.filter(org=org)  # the chat call and wait_for_key's
        hours = UsageRollup.objects.filter(org=org, granularity="hour")
        wait_until(
            lambda: sum(h.requests for h in hours.all()) == events.count() == 2,
            what="the hourly rollup of both requests",
        )
        assert sum(h.cost_nanos for h in hours.all()) == sum(e.cost_nanos for e in events) > 0
