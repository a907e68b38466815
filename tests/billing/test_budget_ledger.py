"""Budget spend from the ledger: the figure counters are seeded from and reconciled with."""

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async

from billing.budget_counters import BudgetLine, ReserveStatus
from billing.budget_ledger import (
    abudget_counters_reconcile,
    abudget_counters_seed,
    budget_line_at,
    budget_spent_from_ledger,
)
from billing.models import UsageEvent
from tenants.models import Budget, Organization, Team, VirtualKey
from tenants.services import Actor, virtual_key_issue
from tests.factories import OrganizationFactory, TeamFactory
from tests.support.budgets import HARNESS_KINDS, START, Harness, budget_harness

JUNE = datetime(2025, 6, 1, tzinfo=UTC)
JULY = datetime(2025, 7, 1, tzinfo=UTC)


def event(org: Organization, cost_nanos: int, *, at: datetime = START, **scope: object) -> None:
    UsageEvent.objects.create(
        id=uuid.uuid4(), org=org, endpoint="chat.completions", model="m", outcome="success",
        status_code=200, started_at=at, finished_at=at + timedelta(seconds=1),
        cost_nanos=cost_nanos, **scope,
    )  # fmt: skip


def budget(org: Organization, limit_nanos: int = 10**9, **fields: object) -> Budget:
    fields.setdefault("scope", Budget.Scope.ORG)
    return Budget.objects.create(org=org, limit_nanos=limit_nanos, **fields)


@dataclass
class Scene:
    org: Organization
    team: Team
    other_team: Team
    key: VirtualKey


@pytest.fixture
def scene(transactional_db: None) -> Scene:
    """An org in UTC with usage in June 2025 by two teams, and noise around it."""
    org = OrganizationFactory()
    team, other_team = TeamFactory(org=org), TeamFactory(org=org)
    actor = Actor.system("tests")
    key = virtual_key_issue(org=org, name="a", actor=actor, team=team).key
    other_key = virtual_key_issue(org=org, name="b", actor=actor, team=other_team).key
    event(org, 100, team=team, key=key)
    event(org, 200, team=other_team, key=other_key)
    event(org, 50)  # no team, no key
    event(org, 1_000, at=JUNE - timedelta(microseconds=1))  # May
    event(org, 2_000, at=JULY)  # July
    event(OrganizationFactory(), 5_000)  # another org
    return Scene(org, team, other_team, key)


def test_ledger_spend_counts_the_budgets_scope_in_the_period_only(scene: Scene) -> None:
    org_budget = budget(scene.org)
    team_budget = budget(scene.org, scope=Budget.Scope.TEAM, team=scene.other_team)
    key_budget = budget(scene.org, scope=Budget.Scope.KEY, key=scene.key)
    assert budget_spent_from_ledger(org_budget, JUNE, JULY) == 350
    assert budget_spent_from_ledger(team_budget, JUNE, JULY) == 200
    assert budget_spent_from_ledger(key_budget, JUNE, JULY) == 100
    assert budget_spent_from_ledger(org_budget, JUNE, None) == 2_350  # lifetime: no end
    assert budget_spent_from_ledger(key_budget, JULY, None) == 0


def test_a_budgets_line_uses_its_orgs_time_zone(scene: Scene) -> None:
    scene.org.time_zone = "Asia/Tokyo"
    scene.org.save()
    daily = budget(scene.org, period=Budget.Period.DAILY, enforcement=Budget.Enforcement.SOFT)
    daily.refresh_from_db()
    line = budget_line_at(daily, datetime(2025, 6, 15, 15, tzinfo=UTC))
    assert line.period_id == "d2025-06-16" and not line.hard
    assert line.window.start_at == datetime(2025, 6, 15, 15, tzinfo=UTC)


@pytest_asyncio.fixture(params=HARNESS_KINDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async with budget_harness(request.param) as built:
        yield built


def lines_of(*budgets: Budget) -> list[BudgetLine]:
    """Each budget's line for START (as the hot path would build it from its snapshot)."""
    with_orgs = Budget.objects.select_related("org").in_bulk([b.pk for b in budgets])
    return [budget_line_at(with_orgs[b.pk], START) for b in budgets]


def rebuilt_scene_budgets(scene: Scene) -> list[BudgetLine]:
    org_budget = budget(scene.org, 1_000)
    team_budget = budget(scene.org, 300, scope=Budget.Scope.TEAM, team=scene.other_team)
    return lines_of(org_budget, team_budget)


@pytest.mark.asyncio
async def test_lost_counters_are_rebuilt_from_the_ledger(scene: Scene, harness: Harness) -> None:
    lines = await sync_to_async(rebuilt_scene_budgets)(scene)
    org_line, team_line = lines
    await abudget_counters_seed(counters=harness.counters, lines=lines)
    await harness.counters.reserve("r1", lines, 40, ttl_s=60)
    await harness.counters.settle("r1", lines, 40)

    await harness.lose_counters()
    lost = await harness.counters.reserve("r2", lines, 60, ttl_s=60)
    assert lost.status is ReserveStatus.MISSING and set(lost.missing) == set(lines)

    # The ledger has June's events (the 40 settled above was never ingested here).
    await abudget_counters_seed(counters=harness.counters, lines=lost.missing)
    spends = await harness.counters.spent(lines)
    assert [s.settled_nanos for s in spends] == [350, 200]
    refused = await harness.counters.reserve("r2", lines, 101, ttl_s=60)
    assert [s.line for s in refused.spends] == [team_line]
    assert (await harness.counters.reserve("r2", lines, 100, ttl_s=60)).admitted


def drifting_budgets(scene: Scene) -> list[Budget]:
    return [
        budget(scene.org),  # missing in the counters
        budget(scene.org, scope=Budget.Scope.TEAM, team=scene.team),  # behind
        budget(scene.org, scope=Budget.Scope.TEAM, team=scene.other_team),  # ahead
        budget(scene.org, scope=Budget.Scope.KEY, key=scene.key),  # exact
    ]


@pytest.mark.asyncio
async def test_reconciling_seeds_missing_raises_behind_and_leaves_ahead(
    scene: Scene, harness: Harness
) -> None:
    budgets = await sync_to_async(drifting_budgets)(scene)
    missing, behind, ahead, exact = await sync_to_async(lines_of)(*budgets)
    await harness.counters.seed(behind, 60)  # the ledger says 100
    await harness.counters.seed(ahead, 260)  # the ledger says 200: 60 still in flight
    await harness.counters.seed(exact, 100)

    drifts = await abudget_counters_reconcile(
        counters=harness.other, at=harness.clock.at, budget_ids=[b.pk for b in budgets]
    )

    assert {(d.budget_id, d.counter_nanos, d.ledger_nanos, d.action) for d in drifts} == {
        (missing.budget_id, None, 350, "seeded"),
        (behind.budget_id, 60, 100, "raised"),
        (ahead.budget_id, 260, 200, "reported"),
    }
    spends = await harness.counters.spent([missing, behind, ahead, exact])
    assert [s.settled_nanos for s in spends] == [350, 100, 260, 100]
