"""Budget periods: which calendar window an instant falls in, in an org's time zone.

Pure functions, no I/O. A period is a half-open window [start, end) of aware UTC
instants, plus a stable id (`d2025-03-30`, `w2025-W13`, `m2025-03`, `lifetime`)
that names the budget counters of that window in Redis and in process.

Boundaries are local midnights, found as "the first instant of the local date":
on a day whose midnight falls in a DST gap (e.g. America/Santiago springs from
00:00 to 01:00) that is the transition instant, and where midnight repeats the
first occurrence counts. So a daily period is 23, 24 or 25 hours long, never a
fixed 86,400 seconds.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAILY = "daily"
WEEKLY = "weekly"
MONTHLY = "monthly"
LIFETIME = "lifetime"
PERIODS = (DAILY, WEEKLY, MONTHLY, LIFETIME)

# Where a lifetime budget starts counting: before any usage event can exist.
LIFETIME_START = datetime(1970, 1, 1, tzinfo=UTC)
LIFETIME_ID = "lifetime"


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    """One budget period: [start_at, end_at) in UTC; `end_at` is None for lifetime."""

    period_id: str
    start_at: datetime
    end_at: datetime | None

    def contains(self, instant: datetime) -> bool:
        return self.start_at <= instant and (self.end_at is None or instant < self.end_at)


def local_midnight(day: date, time_zone: str) -> datetime:
    """The first instant (UTC) whose local date in `time_zone` is `day`.

    `fold=0` reads an ambiguous midnight as its first occurrence and a midnight
    inside a DST gap with the offset before the gap, which is the transition
    instant itself: in both cases the start of the local day.
    """
    return datetime.combine(day, time(0), tzinfo=ZoneInfo(time_zone)).astimezone(UTC)


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def budget_window(period: str, time_zone: str, at: datetime) -> BudgetWindow:
    """The period of kind `period` that contains the instant `at`, in `time_zone`.

    Daily starts at local midnight, weekly at Monday's local midnight (ISO weeks),
    monthly at the local 1st; lifetime spans from LIFETIME_START on, with no end.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("Give an aware datetime: a naive one has no place in time.")
    if period == LIFETIME:
        return BudgetWindow(period_id=LIFETIME_ID, start_at=LIFETIME_START, end_at=None)
    today = at.astimezone(ZoneInfo(time_zone)).date()
    if period == DAILY:
        first, following = today, today + timedelta(days=1)
        period_id = f"d{today.isoformat()}"
    elif period == WEEKLY:
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
        iso_year, iso_week, _ = first.isocalendar()
        period_id = f"w{iso_year:04d}-W{iso_week:02d}"
    elif period == MONTHLY:
        first = today.replace(day=1)
        following = _next_month(first)
        period_id = f"m{first:%Y-%m}"
    else:
        raise ValueError(f"Unknown budget period {period!r}; expected one of {PERIODS}.")
    return BudgetWindow(
        period_id=period_id,
        start_at=local_midnight(first, time_zone),
        end_at=local_midnight(following, time_zone),
    )
