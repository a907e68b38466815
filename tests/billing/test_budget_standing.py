"""Budget forecasts: the spend at the period's end and the day the money runs out,
at the burn rate so far (integer arithmetic: no float holds money)."""

from datetime import UTC, datetime, timedelta

from billing.budget_standing import budget_forecast

JUNE_1 = datetime(2025, 6, 1, tzinfo=UTC)
JULY_1 = datetime(2025, 7, 1, tzinfo=UTC)
HALF_WAY = datetime(2025, 6, 16, tzinfo=UTC)  # 15 of June's 30 days
USD = 10**9


def forecast(spent: int, limit: int = 100 * USD, *, at: datetime = HALF_WAY, **kw):  # type: ignore[no-untyped-def]
    return budget_forecast(
        spent_nanos=spent, limit_nanos=limit, measured_from=kw.get("measured_from", JUNE_1),
        period_end=kw.get("period_end", JULY_1), at=at,
    )  # fmt: skip


def test_half_the_month_gone_doubles_the_spend_and_a_slow_burn_never_runs_out() -> None:
    slow = forecast(40 * USD)
    assert slow.projected_nanos == 80 * USD and slow.exhausted_at is None


def test_a_fast_burn_runs_out_before_the_month_ends() -> None:
    fast = forecast(60 * USD)  # $4 a day: the last $40 last 10 days
    assert fast.projected_nanos == 120 * USD
    assert fast.exhausted_at == HALF_WAY + timedelta(days=10)


def test_a_spent_budget_is_exhausted_now_and_an_idle_one_projects_nothing_more() -> None:
    assert forecast(100 * USD).exhausted_at == HALF_WAY
    idle = forecast(0)
    assert idle.projected_nanos == 0 and idle.exhausted_at is None


def test_the_first_minutes_of_a_period_are_too_short_to_extrapolate() -> None:
    early = forecast(5 * USD, at=JUNE_1 + timedelta(minutes=5))
    assert early.projected_nanos == 5 * USD and early.exhausted_at is None


def test_a_lifetime_budget_has_no_period_end_only_a_run_out_date() -> None:
    created = datetime(2025, 1, 1, tzinfo=UTC)
    at = created + timedelta(days=10)
    lifetime = forecast(10 * USD, at=at, measured_from=created, period_end=None)
    assert lifetime.projected_nanos is None
    assert lifetime.exhausted_at == at + timedelta(days=90)
    # A trickle that would take centuries reads as never.
    trickle = forecast(1, 10**15, at=at, measured_from=created, period_end=None)
    assert trickle.exhausted_at is None
