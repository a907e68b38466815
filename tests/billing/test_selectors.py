"""Usage reads for screens: one org's events, in a half-open window, as integers."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from billing.models import UsageEvent
from billing.selectors import ModelSpend, UsageTotals, spend_by_model, usage_totals
from tenants.models import Organization
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

SINCE = datetime(2025, 5, 1, tzinfo=UTC)
UNTIL = datetime(2025, 6, 1, tzinfo=UTC)
INSIDE = SINCE + timedelta(days=10)


def event(
    org: Organization,
    *,
    started_at: datetime = INSIDE,
    model: str = "gpt-a",
    cost_nanos: int = 0,
    outcome: str = UsageEvent.Outcome.SUCCESS,
    **fields: Any,
) -> UsageEvent:
    return UsageEvent.objects.create(
        id=uuid.uuid4(),
        org=org,
        endpoint="chat.completions",
        model=model,
        outcome=outcome,
        status_code=200 if outcome == UsageEvent.Outcome.SUCCESS else 502,
        started_at=started_at,
        finished_at=started_at + timedelta(milliseconds=400),
        cost_nanos=cost_nanos,
        **fields,
    )


@pytest.fixture
def other_org(db: None) -> Organization:
    """An org with costly usage in the same window, which must never show up."""
    other = OrganizationFactory()
    event(other, model="gpt-a", cost_nanos=10**12, input_tokens=10**6, output_tokens=10**6)
    event(other, model="gpt-other", cost_nanos=10**12, outcome=UsageEvent.Outcome.UPSTREAM_ERROR)
    return other


def test_usage_totals_count_only_the_orgs_events_in_the_window(
    org: Organization, other_org: Organization
) -> None:
    event(org, started_at=SINCE, cost_nanos=150_000, input_tokens=1_000, output_tokens=10)
    event(org, cost_nanos=75, input_tokens=1, output_tokens=0)
    event(org, started_at=UNTIL - timedelta(microseconds=1), cost_nanos=3, input_tokens=2,
          outcome=UsageEvent.Outcome.UPSTREAM_ERROR)  # fmt: skip
    event(org, started_at=SINCE - timedelta(microseconds=1), cost_nanos=10**9, input_tokens=9)
    event(org, started_at=UNTIL, cost_nanos=10**9, input_tokens=9)

    totals = usage_totals(org_id=org.pk, since=SINCE, until=UNTIL)

    assert totals == UsageTotals(
        requests=3, errors=1, input_tokens=1_003, output_tokens=10, cost_nanos=150_078
    )


def test_usage_totals_are_integers(org: Organization, other_org: Organization) -> None:
    event(org, cost_nanos=5_000_000_000, input_tokens=7, output_tokens=3)

    totals = usage_totals(org_id=org.pk, since=SINCE, until=UNTIL)

    for name in ("requests", "errors", "input_tokens", "output_tokens", "cost_nanos"):
        assert type(getattr(totals, name)) is int, name


def test_usage_totals_of_an_org_without_usage_are_zero(
    org: Organization, other_org: Organization
) -> None:
    assert usage_totals(org_id=org.pk, since=SINCE, until=UNTIL) == UsageTotals(0, 0, 0, 0, 0)


def test_spend_by_model_counts_only_the_orgs_events_in_the_window_costliest_first(
    org: Organization, other_org: Organization
) -> None:
    event(org, model="gpt-a", started_at=SINCE, cost_nanos=100)
    event(org, model="gpt-a", cost_nanos=200)
    event(org, model="gpt-b", cost_nanos=1_000)
    event(org, model="gpt-c", started_at=UNTIL, cost_nanos=10**9)
    event(org, model="gpt-a", started_at=SINCE - timedelta(microseconds=1), cost_nanos=10**9)

    spend = spend_by_model(org_id=org.pk, since=SINCE, until=UNTIL)

    assert spend == [
        ModelSpend(model="gpt-b", requests=1, cost_nanos=1_000),
        ModelSpend(model="gpt-a", requests=2, cost_nanos=300),
    ]


def test_spend_by_model_returns_integers(org: Organization, other_org: Organization) -> None:
    event(org, model="gpt-a", cost_nanos=7_500_000_000)

    (row,) = spend_by_model(org_id=org.pk, since=SINCE, until=UNTIL)

    assert type(row.requests) is int
    assert type(row.cost_nanos) is int
    assert row.cost_nanos == 7_500_000_000


def test_spend_by_model_of_an_org_without_usage_is_empty(
    org: Organization, other_org: Organization
) -> None:
    assert spend_by_model(org_id=org.pk, since=SINCE, until=UNTIL) == []
