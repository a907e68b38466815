"""Admission on the proxy's budgets with a controlled clock: periods roll over exactly
at the org's local midnight and month start, and start again from the ledger."""

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from routing.errors import LimitExceeded
from routing.proxy.limits import Admission, admit, budget_lines
from tenants.contracts import BudgetSpec, KeyContext
from tenants.models import Budget, Organization
from tenants.selectors import virtual_key_contexts
from tenants.services import Actor, virtual_key_issue
from tests.factories import OrganizationFactory
from tests.support.budgets import HARNESS_KINDS, Harness, budget_harness
from tests.support.ledger import record_usage

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

COST = 1_000  # nano-USD a request
LIMIT = 3 * COST


@pytest_asyncio.fixture(params=HARNESS_KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with budget_harness(request.param) as built:
        yield built


@sync_to_async
def key_under_budget(time_zone: str, period: str) -> tuple[Organization, KeyContext]:
    org = OrganizationFactory(time_zone=time_zone)
    Budget.objects.create(org=org, scope=Budget.Scope.ORG, period=period, limit_nanos=LIMIT)
    issued = virtual_key_issue(org=org, name="k", actor=Actor.system("tests"))
    (context,) = [c for c in virtual_key_contexts() if c.key_id == issued.key.pk]
    return org, context


async def spend(harness: Harness, key: KeyContext, request_id: str) -> Admission | None:
    """Admit one request at the clock's time and settle it at its full cost."""
    admission = await admit(
        counters=harness.counters, key=key, request_id=request_id,
        lines=budget_lines(key.budgets, harness.clock.at), amount_nanos=COST, ttl_s=60,
        charges=(), fail_open=False,
    )  # fmt: skip
    assert admission is not None
    await admission.settle(cost_nanos=COST, tokens_used=0)
    return admission


async def refused_until(harness: Harness, key: KeyContext, request_id: str) -> str:
    with pytest.raises(LimitExceeded) as raised:
        await spend(harness, key, request_id)
    assert raised.value.code == "budget_exceeded"
    return raised.value.headers["x-tollgate-budget-reset"]


@pytest.mark.parametrize(
    ("time_zone", "period", "last_instant", "reset"),
    [
        # 23:59:59.999 in Kolkata (+05:30) is 18:29:59.999 UTC.
        ("Asia/Kolkata", "daily", datetime(2025, 6, 15, 18, 29, 59, 999000, tzinfo=UTC),
         "2025-06-15T18:30:00Z"),
        # New York's June ends at 04:00 UTC on July 1st (EDT, -04:00).
        ("America/New_York", "monthly", datetime(2025, 7, 1, 3, 59, 59, 999000, tzinfo=UTC),
         "2025-07-01T04:00:00Z"),
        # A Sunday night in Auckland (+12:00): the week starts at Monday's midnight.
        ("Pacific/Auckland", "weekly", datetime(2025, 6, 15, 11, 59, 59, 999000, tzinfo=UTC),
         "2025-06-15T12:00:00Z"),
    ],
)  # fmt: skip
async def test_spend_resets_exactly_when_the_local_period_ends(
    harness: Harness, time_zone: str, period: str, last_instant: datetime, reset: str
) -> None:
    _, key = await key_under_budget(time_zone, period)
    harness.clock.now = (last_instant - timedelta(hours=1)).timestamp()
    for index in range(3):
        await spend(harness, key, f"early-{index}")
    harness.clock.now = last_instant.timestamp()
    assert await refused_until(harness, key, "last-moment") == reset
    harness.clock.now = datetime.fromisoformat(reset).timestamp()
    await spend(harness, key, "first-of-the-new-period")


async def test_a_new_period_starts_from_the_ledger_not_from_the_old_counter(
    harness: Harness,
) -> None:
    org, key = await key_under_budget("Europe/Berlin", "daily")
    midnight = datetime(2025, 6, 15, 22, tzinfo=UTC)  # 00:00 on the 16th in Berlin (CEST)
    # Spend the web processes never saw (another region, a lost counter): in the ledger.
    await sync_to_async(record_usage)(org, midnight - timedelta(seconds=1), 2 * COST)
    await sync_to_async(record_usage)(org, midnight + timedelta(minutes=5), 2 * COST)
    harness.clock.now = (midnight + timedelta(minutes=10)).timestamp()
    # Seeded with the 2,000 of the new day (not the old day's): one request of 1,000 fits.
    await spend(harness, key, "fits")
    await sync_to_async(record_usage)(org, harness.clock.at, COST)  # its event, as emitted
    await refused_until(harness, key, "no-room")
    await harness.lose_counters()  # rebuilt from the ledger at the next request
    await refused_until(harness, key, "still-no-room-after-the-counters-were-lost")


async def test_a_refusal_takes_nothing_and_names_every_figure(harness: Harness) -> None:
    _, key = await key_under_budget("UTC", "monthly")
    harness.clock.now = datetime(2025, 6, 30, 12, tzinfo=UTC).timestamp()
    await spend(harness, key, "a")
    await spend(harness, key, "b")
    with pytest.raises(LimitExceeded) as raised:
        await admit(
            counters=harness.counters, key=key, request_id="too-big",
            lines=budget_lines(key.budgets, harness.clock.at), amount_nanos=COST + 1, ttl_s=60,
            charges=(), fail_open=False,
        )  # fmt: skip
    message = raised.value.message
    assert "monthly budget ($0.000003)" in message and "$0.000001 left" in message
    assert "resets at 2025-07-01 00:00 UTC" in message
    await spend(harness, key, "exactly-the-rest")


async def test_a_budgets_line_is_reused_within_its_period_and_follows_it_across_boundaries() -> (
    None
):
    spec = BudgetSpec(
        budget_id=7, scope="org", label="Organization 'acme' monthly budget", period="monthly",
        time_zone="Europe/Paris", limit_nanos=LIMIT, hard=True,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    june = datetime(2025, 6, 30, 21, 59, 59, tzinfo=UTC)  # 23:59:59 in Paris
    (first,) = budget_lines([spec], june)
    (again,) = budget_lines([spec], june - timedelta(days=3))
    (july,) = budget_lines([spec], june + timedelta(seconds=1))  # midnight in Paris
    (late,) = budget_lines([spec], june)  # a request that started in June settles late

    assert again is first and first.period_id == "m2025-06"
    assert july.period_id == "m2025-07" and late.period_id == "m2025-06"
    # A changed budget (a new snapshot's spec) gets its own line, with its own limit.
    raised = dataclasses.replace(spec, limit_nanos=2 * LIMIT)
    (line,) = budget_lines([raised], june)
    assert line.limit_nanos == 2 * LIMIT and first.limit_nanos == LIMIT
