"""Where each budget stands in its current period, and where it is heading.

A standing is read from the budget counters (what the hot path enforces), not
from the ledger, which lags by the requests in flight. The forecast is a pure
function of a standing: the burn rate is the period's spend so far over the time
elapsed in it (since the budget was created, for a lifetime budget).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from django.conf import settings

from billing.budget_counters import (
    BudgetCounters,
    BudgetLine,
    InProcessBudgetCounters,
    redis_budget_counters,
)
from billing.budget_ledger import abudget_counters_seed, budget_line_at, in_thread
from tenants.models import Budget

# A burn rate measured over less than this is noise (the first minutes of a day).
_MIN_ELAPSED = timedelta(minutes=10)
_MICROSECOND = timedelta(microseconds=1)
# Further away than this, a lifetime budget "never" runs out at the current rate.
_NEVER = timedelta(days=100 * 365)
_NEVER_US = _NEVER // _MICROSECOND


@dataclass(frozen=True, slots=True)
class BudgetForecast:
    # Spend at the end of the period at the current burn rate (None: lifetime).
    projected_nanos: int | None
    # When the limit will be reached at that rate; None if not before the period ends.
    exhausted_at: datetime | None


@dataclass(frozen=True, slots=True)
class BudgetStanding:
    """One budget in its current period, as the counters have it."""

    budget_id: int
    org_id: int
    period_id: str
    period_start: datetime
    period_end: datetime | None  # None: lifetime
    limit_nanos: int
    hard: bool
    # None: no counter yet this period (no request since it began, or Redis lost
    # it); the reconcile job seeds it from the ledger.
    settled_nanos: int | None
    reserved_nanos: int
    # A request was refused on this budget during the period (hard budgets only).
    refused: bool
    # When the burn rate starts counting: the period start, or the budget's creation.
    measured_from: datetime

    @property
    def remaining_nanos(self) -> int:
        return max(0, self.limit_nanos - (self.settled_nanos or 0) - self.reserved_nanos)

    def forecast(self, at: datetime) -> BudgetForecast:
        return budget_forecast(
            spent_nanos=self.settled_nanos or 0,
            limit_nanos=self.limit_nanos,
            measured_from=self.measured_from,
            period_end=self.period_end,
            at=at,
        )


def budget_forecast(
    *,
    spent_nanos: int,
    limit_nanos: int,
    measured_from: datetime,
    period_end: datetime | None,
    at: datetime,
) -> BudgetForecast:
    """Linear projection of the spend since `measured_from` to the period's end."""
    elapsed = at - measured_from
    if elapsed < _MIN_ELAPSED or spent_nanos <= 0:
        projected = None if period_end is None else spent_nanos
        exhausted_at = at if spent_nanos >= limit_nanos else None
        return BudgetForecast(projected_nanos=projected, exhausted_at=exhausted_at)
    # Integer arithmetic on microseconds: no float ever holds money.
    elapsed_us = elapsed // _MICROSECOND
    projected = None
    if period_end is not None:
        left_us = max(0, (period_end - at) // _MICROSECOND)
        projected = spent_nanos + spent_nanos * left_us // elapsed_us
    if spent_nanos >= limit_nanos:
        exhausted_at: datetime | None = at
    else:
        to_limit = timedelta(
            microseconds=min(_NEVER_US, (limit_nanos - spent_nanos) * elapsed_us // spent_nanos)
        )
        exhausted_at = at + to_limit if to_limit < _NEVER else None
        if period_end is not None and exhausted_at is not None and exhausted_at >= period_end:
            exhausted_at = None
    return BudgetForecast(projected_nanos=projected, exhausted_at=exhausted_at)


def _budgets_with_lines(at: datetime, org_id: int | None) -> list[tuple[Budget, BudgetLine]]:
    budgets = Budget.objects.select_related("org").order_by("pk")
    if org_id is not None:
        budgets = budgets.filter(org_id=org_id)
    return [(budget, budget_line_at(budget, at)) for budget in budgets]


def _standing(budget: Budget, line: BudgetLine, settled: int | None, reserved: int,
              refused: bool) -> BudgetStanding:  # fmt: skip
    window = line.window
    measured_from = window.start_at if window.end_at is not None else budget.created_at
    return BudgetStanding(
        budget_id=budget.pk,
        org_id=budget.org_id,
        period_id=line.period_id,
        period_start=window.start_at,
        period_end=window.end_at,
        limit_nanos=budget.limit_nanos,
        hard=line.hard,
        settled_nanos=settled,
        reserved_nanos=reserved,
        refused=refused,
        measured_from=measured_from,
    )


async def abudget_standings(
    *, counters: BudgetCounters, at: datetime, org_id: int | None = None
) -> list[BudgetStanding]:
    """Every budget's standing at `at` (one DB query, one counter read)."""
    pairs = await in_thread(_budgets_with_lines, at, org_id)
    spends = await counters.spent([line for _, line in pairs])
    return [
        _standing(budget, line, spend.settled_nanos, spend.reserved_nanos, spend.refused)
        for (budget, line), spend in zip(pairs, spends, strict=True)
    ]


async def _abudget_standings_seeded(
    counters: BudgetCounters, budgets: dict[int, Budget], at: datetime, org_id: int
) -> dict[int, BudgetStanding]:
    standings = await abudget_standings(counters=counters, at=at, org_id=org_id)
    # No counter yet this period: seed it from the ledger, as the proxy's first request would.
    missing = [
        budget_line_at(budgets[s.budget_id], at)
        for s in standings
        if s.settled_nanos is None and s.budget_id in budgets
    ]
    if missing:
        await abudget_counters_seed(counters=counters, lines=missing)
        standings = await abudget_standings(counters=counters, at=at, org_id=org_id)
    return {standing.budget_id: standing for standing in standings}


async def _abudget_standings_read(
    budgets: dict[int, Budget], at: datetime, org_id: int
) -> dict[int, BudgetStanding]:
    if settings.REDIS_URL:
        async with redis_budget_counters(settings.REDIS_URL) as counters:
            return await _abudget_standings_seeded(counters, budgets, at, org_id)
    # The embedded default's counters live in the proxy's event loop, out of a web
    # view's reach: read a fresh in-process copy seeded from the ledger instead (what a
    # restarted process does): settled spend as ingested, nothing in flight.
    return await _abudget_standings_seeded(InProcessBudgetCounters(), budgets, at, org_id)


def budget_standings_read(
    *, budgets: dict[int, Budget], at: datetime, org_id: int
) -> dict[int, BudgetStanding]:
    """The org's budget standings at `at` by budget id, for sync code (pages, the API).

    `budgets` (with `org` loaded) are the ones whose missing counters get seeded from
    the ledger first. Call it outside a transaction: the ORM work runs in a helper
    that hands its connection back.
    """
    if not budgets:
        return {}
    return async_to_sync(_abudget_standings_read)(budgets, at, org_id)
