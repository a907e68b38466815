"""Budget spend from the usage ledger: seeding counters and reconciling them.

The ledger (`UsageEvent`) is the system of record; the budget counters
(`billing.budget_counters`) are the fast copy the hot path checks. A request is
counted in the period its `started_at` falls in (the period it reserved in).

Reconciliation policy, per budget and current period:
- counter missing (Redis lost it, or nobody used the budget this period yet):
  seed it from the ledger;
- counter *behind* the ledger: something was lost (a Redis restart from an old
  snapshot, a settle that found no counter). Raise it to the ledger figure and
  log a warning;
- counter *ahead* of the ledger: normal in small amounts. A request is settled
  in the counter when it finishes and reaches the ledger seconds later, through
  the usage stream, so the ledger lags by the requests in flight. Report it and
  change nothing: lowering the counter would let concurrent requests overspend.
  A gap that persists across runs means lost usage events, for a human to look at.

The ledger is read before the counter, and every event is settled before it is
emitted, so an intact counter is never seen behind the ledger. Seeding only ever
raises a counter (see `BudgetCounters.seed`), so a race with live settles can
under-count by the requests in flight at worst, until the next run.
"""

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import Sum
from django.utils import timezone

from billing.budget_counters import BudgetCounters, BudgetLine, budget_line
from billing.models import UsageEvent
from tenants.models import Budget

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ORM code in a worker thread and hand its connection back afterwards.

    Callers are async and outside Django's request cycle, so nothing else would
    close the connection (and a restarted database would leave it dead).
    """

    def run() -> T:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()

    return await sync_to_async(run)()


def budget_spent_from_ledger(
    budget: Budget, period_start: datetime, period_end: datetime | None
) -> int:
    """Total cost (nano-USD) of the budget's scope for events started in [start, end)."""
    events = UsageEvent.objects.filter(org_id=budget.org_id, started_at__gte=period_start)
    if period_end is not None:
        events = events.filter(started_at__lt=period_end)
    if budget.scope == Budget.Scope.TEAM:
        events = events.filter(team_id=budget.team_id)
    elif budget.scope == Budget.Scope.KEY:
        events = events.filter(key_id=budget.key_id)
    total = events.order_by().aggregate(total=Sum("cost_nanos"))["total"]
    return int(total or 0)


def budget_line_at(budget: Budget, at: datetime) -> BudgetLine:
    """The budget's line for the period containing `at`, in its org's time zone."""
    return budget_line(
        budget_id=budget.pk,
        period=budget.period,
        time_zone=budget.org.time_zone,
        limit_nanos=budget.limit_nanos,
        hard=budget.enforcement == Budget.Enforcement.HARD,
        at=at,
    )


def _ledger_figures(lines: Sequence[BudgetLine]) -> list[tuple[BudgetLine, int]]:
    budgets = Budget.objects.in_bulk({line.budget_id for line in lines})
    figures = []
    for line in lines:
        budget = budgets.get(line.budget_id)
        # A budget deleted meanwhile has nothing to hold against: zero is harmless.
        nanos = (
            0
            if budget is None
            else budget_spent_from_ledger(budget, line.window.start_at, line.window.end_at)
        )
        figures.append((line, nanos))
    return figures


async def abudget_counters_seed(*, counters: BudgetCounters, lines: Sequence[BudgetLine]) -> None:
    """Seed the given lines (a reserve's `missing`) from the ledger; then reserve again.

    Seeding never lowers a counter, so replicas seeding the same line at once agree.
    """
    for line, nanos in await in_thread(_ledger_figures, lines):
        await counters.seed(line, nanos)


@dataclass(frozen=True, slots=True)
class BudgetDrift:
    """A current-period counter that differed from the ledger, and what was done."""

    budget_id: int
    period_id: str
    ledger_nanos: int
    counter_nanos: int | None  # before any fix; None: the counter was missing
    action: Literal["seeded", "raised", "reported"]

    @property
    def difference_nanos(self) -> int:
        """Counter minus ledger: positive when the counter is ahead."""
        return (self.counter_nanos or 0) - self.ledger_nanos


def _current_figures(
    at: datetime, budget_ids: Iterable[int] | None
) -> list[tuple[BudgetLine, int]]:
    budgets = Budget.objects.select_related("org").order_by("pk")
    if budget_ids is not None:
        budgets = budgets.filter(pk__in=list(budget_ids))
    figures = []
    for budget in budgets:
        line = budget_line_at(budget, at)
        figures.append(
            (line, budget_spent_from_ledger(budget, line.window.start_at, line.window.end_at))
        )
    return figures


async def abudget_counters_reconcile(
    *,
    counters: BudgetCounters,
    at: datetime | None = None,
    budget_ids: Iterable[int] | None = None,
) -> list[BudgetDrift]:
    """Compare every budget's current-period counter with the ledger; seed or raise it.

    Returns one entry per budget that differed (see the module docstring for the
    policy). Meant for a periodic task; it queries the DB once per budget.
    """
    at = at or timezone.now()
    figures = await in_thread(_current_figures, at, budget_ids)
    drifts = []
    for line, ledger_nanos in figures:
        (spend,) = await counters.spent([line])
        counter_nanos = spend.settled_nanos
        if counter_nanos == ledger_nanos:
            continue
        action: Literal["seeded", "raised", "reported"] = "reported"
        if counter_nanos is None or counter_nanos < ledger_nanos:
            await counters.seed(line, ledger_nanos)
            action = "seeded" if counter_nanos is None else "raised"
        drift = BudgetDrift(line.budget_id, line.period_id, ledger_nanos, counter_nanos, action)
        if action == "raised":
            logger.warning(
                "Budget %s counter for %s was behind the ledger (%s < %s nano-USD): raised",
                line.budget_id, line.period_id, counter_nanos, ledger_nanos,
            )  # fmt: skip
        drifts.append(drift)
    return drifts
