"""The overview: today's and this month's spend against budgets, charts over a period,
the costliest models, teams and keys, budget forecasts and the live request feed.

Owners, admins and finance see the whole organization; a member sees their own
team's figures only (and nothing but guidance without a team).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from billing.budget_periods import budget_window
from billing.overview import UsageOverview, live_feed_requests, usage_overview
from billing.rollups import day_floor, hour_floor
from dashboard.access import Viewer, org_page, render_page
from dashboard.budgets import BudgetRow, budget_rows, budgets_visible
from tenants.models import Budget


@dataclass(frozen=True, slots=True)
class ChartPeriod:
    slug: str
    label: str
    buckets: int
    daily: bool

    def since(self, now: datetime) -> datetime:
        """Start of the oldest bucket: the chart ends with the current hour or UTC day."""
        if self.daily:
            return day_floor(now) - timedelta(days=self.buckets - 1)
        return hour_floor(now) - timedelta(hours=self.buckets - 1)


PERIODS = (
    ChartPeriod("24h", "24 hours", 24, daily=False),
    ChartPeriod("7d", "7 days", 7 * 24, daily=False),
    ChartPeriod("30d", "30 days", 30, daily=True),
)
# The feed keeps this many rows as requests arrive; the page starts with the latest few.
LIVE_FEED_ROWS = 50
LIVE_FEED_FIRST_ROWS = 10


def _period(request: HttpRequest) -> ChartPeriod:
    asked = request.GET.get("period")
    return next((period for period in PERIODS if period.slug == asked), PERIODS[0])


def _ms(value: float | None) -> int | None:
    return None if value is None else round(value)


def _chart_data(usage: UsageOverview, period: ChartPeriod, time_zone: str) -> dict[str, Any]:
    """The series for charts.js: epoch seconds and one list per line (nulls for gaps)."""
    series = usage.series
    return {
        "daily": period.daily,
        "time_zone": "UTC" if period.daily else time_zone,
        "t": [int(bucket.start.timestamp()) for bucket in series],
        "requests": [bucket.figures.requests for bucket in series],
        "errors": [bucket.figures.errors for bucket in series],
        "spend_nanos": [bucket.figures.cost_nanos for bucket in series],
        "latency_p50_ms": [_ms(bucket.figures.latency_p50_ms) for bucket in series],
        "latency_p95_ms": [_ms(bucket.figures.latency_p95_ms) for bucket in series],
        "ttft_p50_ms": [_ms(bucket.figures.ttft_p50_ms) for bucket in series],
    }


def _budget_for(rows: list[BudgetRow], viewer: Viewer, period: str) -> BudgetRow | None:
    """The budget a tile is measured against: the org's, or a member's team's."""
    scope = Budget.Scope.TEAM if viewer.is_member else Budget.Scope.ORG
    return next(
        (
            row
            for row in rows
            if row.budget.scope == scope
            and row.budget.period == period
            and (scope == Budget.Scope.ORG or row.budget.team_id == viewer.team_id)
        ),
        None,
    )


@org_page()
def overview(request: HttpRequest, viewer: Viewer) -> HttpResponse:
    """Usage of one of the viewer's organizations (a member: of their team)."""
    org, now = viewer.org, timezone.now()
    day = budget_window(Budget.Period.DAILY, org.time_zone, now)
    month = budget_window(Budget.Period.MONTHLY, org.time_zone, now)
    period = _period(request)
    team_id = viewer.team_id if viewer.is_member else None
    teamless = viewer.is_member and team_id is None
    usage = None
    if not teamless:
        usage = usage_overview(
            org_id=org.pk,
            team_id=team_id,
            today_since=day.start_at,
            month_since=month.start_at,
            period_since=period.since(now),
            daily=period.daily,
            until=now,
        )
    # Key budgets are many and on the Budgets page; the overview shows org and team ones.
    budgets = budget_rows(budgets_visible(viewer).exclude(scope=Budget.Scope.KEY), org=org, at=now)
    context = {
        "usage": usage,
        "teamless": teamless,
        "today": usage.today if usage else None,
        "period": period,
        "periods": PERIODS,
        "chart": _chart_data(usage, period, org.time_zone) if usage else None,
        "budgets": budgets,
        "today_budget": _budget_for(budgets, viewer, Budget.Period.DAILY),
        "month_budget": _budget_for(budgets, viewer, Budget.Period.MONTHLY),
        "day": day,
        "month": month,
        "feed": [] if teamless else live_feed_requests(
            org_id=org.pk, team_id=team_id, limit=LIVE_FEED_FIRST_ROWS
        ),
        "feed_limit": LIVE_FEED_ROWS,
    }  # fmt: skip
    return render_page(request, viewer, "dashboard/overview.html", context)
